"""The run and store reports: rendered in a real headless browser (Debian's chromium) from a
cheap real campaign (EMT potential and labeller, a two-epoch CHGNet fine-tune, the store over
TCP), every image must load and every section be there; and, without a campaign, what the
report makes of recorded convergence and equation-of-state checks, trainers' histories and
hostile text."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from pestle.config import CampaignConfig
from pestle.reports import figures, sections
from pestle.reports.document import Document, Figure, Section, Table, Text
from pestle.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

RUN_SECTIONS = ["softening", "accuracy", "holdout", "convergence", "eos", "finetune", "labels",
                "dataset", "cost", "appendix"]  # fmt: skip
STORE_SECTIONS = ["softening", "labels", "accuracy", "finetune", "dataset", "cost", "jobs",
                  "decisions", "promoted", "convergence", "eos", "appendix"]  # fmt: skip

# Appended to a copy of the page: once everything has loaded, what each <img> did and which
# sections exist, as JSON in a <pre> that --dump-dom prints.
CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var images = Array.from(document.images).map(function (img) {
    return {src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth};
  });
  var ids = Array.from(document.querySelectorAll('section[id]')).map(function (s) { return s.id; });
  var pre = document.createElement('pre');
  pre.id = 'pestle-check';
  pre.textContent = JSON.stringify({images: images, sections: ids, title: document.title});
  document.body.appendChild(pre);
});
</script>"""


def render_in_browser(page: Path, tmp_path: Path) -> dict:
    """Load ``page`` in headless chromium and return what the check script recorded."""
    copy = page.with_name(page.stem + ".browser-check.html")
    copy.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    profile = tmp_path / f"chromium-{uuid.uuid4().hex[:6]}"
    try:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--no-first-run",
             "--disable-sync", f"--user-data-dir={profile}", "--dump-dom", copy.as_uri()],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        copy.unlink()
    found = re.search(r'<pre id="pestle-check">(.*?)</pre>', result.stdout, re.S)
    assert found, (
        f"chromium printed no check result:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    )
    return json.loads(html.unescape(found.group(1)))


def assert_page(page: Path, tmp_path: Path, expected_sections: list[str]) -> dict:
    checked = render_in_browser(page, tmp_path)
    images = checked["images"]
    assert images, "the report has no images"
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert checked["sections"] == expected_sections
    # Every figure is a file beside the report, referenced relatively (the folder can move).
    for image in images:
        assert not image["src"].startswith(("/", "file:")), image["src"]
        assert (page.parent / image["src"]).is_file()
    return checked


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, mongo_uri):
    from pestle.dispatch.cluster import make_client
    from pestle.engine.run import run_campaign

    tmp_path = tmp_path_factory.mktemp("report")
    database = f"pestle_report_{uuid.uuid4().hex[:8]}"
    config = CampaignConfig.model_validate(
        {
            "name": "metals", "seed": 4, "work_dir": str(tmp_path / "work"),
            "seeds": [{"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True},
                      {"name": "Al", "bulk": "Al", "crystalstructure": "fcc", "a": 4.05, "cubic": True}],
            "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05, 0.15], "per_amplitude": 4}},
                         {"name": "strain", "params": {"max_strain": 0.04, "count": 3, "rattle": 0.02}}],
            "potential": {"name": "emt"}, "labeller": {"name": "emt"},
            "selection": {"per_system": 5},
            "evaluation": {"holdout_fraction": 0.34,
                           "evaluation_set": {"per_system": 5, "min_structures": 5}},
            "finetune": {"trainer": {"name": "chgnet", "params": {"epochs": 2}}},
            "store": {"uri": mongo_uri, "database": database},
            "dask": {"n_workers": 1, "threads_per_worker": 1},
        }
    )  # fmt: skip
    store = Store(mongo_uri, database)
    with make_client(config.dask) as client:
        result = run_campaign(config, store, mongo_uri, client)
    yield {"result": result, "store": store, "tmp": tmp_path, "work": tmp_path / "work",
           "config": config}  # fmt: skip
    store.drop()
    store.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(scripts/bootstrap.sh installs it)")  # fmt: skip
def test_run_report_renders_in_a_browser(campaign, tmp_path) -> None:
    report = campaign["result"].report
    assert report.name == "report.html" and report.parent == campaign["result"].run_dir
    checked = assert_page(report, tmp_path, RUN_SECTIONS)
    assert checked["title"] == "pestle run report — campaign metals"
    sources = {i["src"] for i in checked["images"]}
    for system in ("Al", "Cu"):  # the evaluate stage's plots, per system, are shown
        for kind in ("parity-forces", "parity-energy", "parity-stress", "force-error",
                     "softening-by-force"):  # fmt: skip
            assert f"evaluation_set/{kind}-{system}.png" in sources
        assert f"report/distribution-{system}.png" in sources
    for name in ("learning-curves", "softening-vs-labels", "cost-per-label"):
        assert f"report/{name}.png" in sources
    text = report.read_text()
    # Headed by campaign, date, store, level of theory and code versions.
    for fact in ("<dt>campaign</dt>", "<dt>date</dt>", "<dt>store</dt>", "<dt>level of theory</dt>",
                 "<dt>code versions</dt>", "ase-emt", "chgnet"):  # fmt: skip
        assert fact in text
    # Five evaluation structures per system: figures with intervals; the held-out picks (2
    # per system) and every system x sampler group are too few, and the report says so.
    assert "Al (n = 5): softening scale pretrained 1.000" in text and "Force MAE changed by" in text
    assert "not enough structures (n = 2)" in text
    assert "Too few structures for an interval" in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(scripts/bootstrap.sh installs it)")  # fmt: skip
def test_store_report_renders_in_a_browser(campaign, tmp_path) -> None:
    from pestle.reports.store_report import write_store_report

    out = campaign["tmp"] / "store-report"
    page = write_store_report(campaign["store"], campaign["work"], out)
    checked = assert_page(page, tmp_path, STORE_SECTIONS)
    # Titled by the campaign, not the database; the store is shown with its password masked.
    assert checked["title"] == "pestle store report — campaign metals"
    text = page.read_text()
    assert campaign["store"].database in text and "No job failed (" in text
    assert "failures by error" not in text  # no empty failures panel
    sources = {i["src"] for i in checked["images"]}
    assert {"figures/softening-by-model.png", "figures/dataset-growth.png", "figures/jobs.png",
            "figures/learning-curves.png", "figures/softening-vs-labels.png"} <= sources  # fmt: skip
    assert any(s.endswith("parity-forces-Cu.png") for s in sources)


def test_markdown_reports_link_existing_figures(campaign) -> None:
    from pestle.reports.run_report import write_run_report
    from pestle.reports.store_report import write_store_report

    run_id = campaign["result"].run_id
    pages = [write_run_report(campaign["store"], run_id, campaign["tmp"] / "run-md", fmt="md"),
             write_store_report(campaign["store"], campaign["work"], campaign["tmp"] / "md", "md")]  # fmt: skip
    for page in pages:
        text = page.read_text()
        assert text.startswith("# pestle ")
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        assert links and all((page.parent / link).is_file() for link in links)
    assert "## Softening before and after: evaluation set" in pages[0].read_text()


def test_pestle_report_writes_a_run_report_again(campaign, tmp_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from pestle.cli import app

    config = tmp_path / "metals.yaml"
    config.write_text(yaml.safe_dump(campaign["config"].model_dump(mode="json")))
    run_id = campaign["result"].run_id
    out = tmp_path / "again"
    result = CliRunner().invoke(app, ["report", "--run", run_id, "-c", str(config), "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert f"run {run_id}" in page and "evaluation_set/" not in page  # plots copied beside it
    assert all((out / src).is_file() for src in re.findall(r"<img src='([^']+)'", page))
    missing = CliRunner().invoke(app, ["report", "--run", "nope", "-c", str(config)])
    assert missing.exit_code == 3 and "no run nope" in missing.output  # bad input


def test_convergence_and_equation_of_state_are_shown_when_recorded(tmp_path) -> None:
    place = sections.Place(tmp_path, tmp_path / "figures")
    convergence = {  # as the convergence stage records it
        "F-Li": {"passed": False, "status": "not_converged", "unconverged_quantities": ["stress"],
                 "recommended_fields": {"labeller.params.ecut": 460.0},
                 "message": "F-Li: largest stress component by 104.23 GPa; raise ecut"},
        "Si": {"passed": True, "status": "converged", "message": "converged",
               "recommended_fields": {}},
    }  # fmt: skip
    blocks = sections.convergence_blocks(convergence)
    assert isinstance(blocks[0], Text) and blocks[0].kind == "warning" and "F-Li" in blocks[0].text
    rows = blocks[1].rows
    assert rows[0][:4] == ["F-Li", "FAILED (not_converged)", "ecut 460", "stress"]
    assert rows[1][:3] == ["Si", "passed (converged)", "as configured"]
    assert sections.convergence_blocks({"skipped": "off"})[0].text == "Gate skipped: off."
    estimate = {"value": 160.0, "low": 150.0, "high": 170.0, "n_structures": 7, "n_values": 7,
                "min_structures": 5}  # fmt: skip
    eos = {"tolerance": 0.1, "seeds": {"Cu-fcc": {  # as the eos stage records it
        "reference": {"status": "ok", "bulk_modulus_gpa": {**estimate, "value": 140.0}},
        "models": {
            "pretrained": {"status": "ok", "bulk_modulus_gpa": estimate,
                           "b0_ratio": {**estimate, "value": 1.143, "low": 1.06, "high": 1.23},
                           "v0_difference_percent": 1.5, "v0_difference_interval": [0.5, 2.5]},
        },
        "verdicts": {"pretrained": "outside"},
    }}}  # fmt: skip
    blocks = sections.eos_blocks(eos, place, "eos")
    assert isinstance(blocks[0], Figure) and (tmp_path / blocks[0].src).is_file()
    rows = blocks[-1].rows
    assert ["Cu-fcc", "pretrained", "160.0 [150.0, 170.0]", "1.143 [1.060, 1.230]",
            "+1.50 [+0.50, +2.50]", "outside"] in rows  # fmt: skip
    assert sections.eos_blocks({}, place, "none") == []


def test_learning_curves_of_every_family(tmp_path) -> None:
    chgnet = {"epochs": [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
                          "train_mae": {"f": 0.2 - 0.01 * e}, "val_mae": {"f": 0.25 - 0.01 * e}}
                         for e in range(4)], "best_epoch": 3, "selection": "lowest validation loss",
              "val_source": "val_set"}  # fmt: skip
    mace = {"epochs": [{"epoch": e, "train_loss": 2.0 - e, "val_loss": 2.1 - e,
                        "val_mae_f": 0.3 - 0.05 * e} for e in range(3)], "best_epoch": 1}  # fmt: skip
    matgl = {"epochs": [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.0, "val_mae": {"Force": 0.2}}],
             "best_epoch": -1, "val_source": "train_set (val_set was empty)"}  # fmt: skip
    c = figures.curves_from_metrics("chgnet", chgnet)
    assert c.train_force_mae[0] == 0.2 and c.best_epoch == 3 and not c.validation_is_training
    m = figures.curves_from_metrics("mace", mace)
    assert m.val_force_mae == [0.3, 0.25, pytest.approx(0.2)] and m.train_force_mae == [None] * 3
    g = figures.curves_from_metrics("matgl", matgl)
    assert g.best_epoch is None and g.validation_is_training and g.val_force_mae == [0.2]
    assert figures.curves_from_metrics("linear", {"mode": "linear_correction"}).empty
    path = figures.learning_curves_plot([c, m, g], tmp_path / "curves.png")
    assert path.stat().st_size > 10_000


def test_the_page_escapes_what_the_store_holds(tmp_path) -> None:
    doc = Document("a <script>alert(1)</script> campaign", meta=[("store", "<b>x</b>")],
                   sections=[Section("s", [Text("<img src=x onerror=alert(1)>"),
                                           Table(["<th>"], [["<td>"]])], anchor="s")])  # fmt: skip
    page = doc.write(tmp_path / "report.html").read_text()
    assert "<script>" not in page and "<img" not in page and "<b>x" not in page
    assert "&lt;script&gt;" in page


def test_a_run_report_without_its_store_says_what_it_leaves_out(campaign, tmp_path) -> None:
    from pestle.reports.run_report import write_report

    result = campaign["result"]
    run = campaign["store"].runs.require(result.run_id).model_dump(by_alias=True)
    run["config"]["store"] = {"uri": None, "uri_file": None, "database": "gone"}
    run["config"]["work_dir"] = str(tmp_path)  # no store runs here: it cannot be reopened
    out = tmp_path / "run"
    shutil.copytree(result.run_dir / "evaluation_set", out / "evaluation_set")
    shutil.copytree(result.run_dir / "holdout", out / "holdout")
    page = write_report(run, run["stages"]["evaluate"], run["stages"]["finetune"]["model_id"], out)
    text = page.read_text()
    assert "Written without the store" in text and "Softening before and after" in text
    assert all((out / src).is_file() for src in re.findall(r"<img src='([^']+)'", text))
