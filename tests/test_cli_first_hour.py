"""A user's first hour with the command line (issue 14), against a real store: every listed
collection queries, errors are messages with their own exit codes, read-only commands never
create a store, relative paths follow the config file, ``--json`` everywhere, ``jobs show``
and ``jobs retry ID``, ``run --dry-run``, the next step after ``status``, the config
reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pymongo
import pytest
import yaml
from ase.build import bulk
from typer.testing import CliRunner

from pestle.cli import app
from pestle.store import NewStructure, Store

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_config(path: Path, database: str, **extra: object) -> Path:
    config = {
        "name": "first-hour",
        "seed": 1,
        "work_dir": "work",
        "seeds": [
            {"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.61},
            {"name": "Al", "bulk": "Al", "crystalstructure": "fcc", "a": 4.05},
        ],
        "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05, 0.1], "per_amplitude": 3}}],
        "potential": {"name": "emt"},
        "labeller": {"name": "emt"},
        "selection": {"per_system": 2},
        "finetune": {"enabled": False},
        "store": {"database": database},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def uri_env(mongo_uri: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI finds the test server through PESTLE_MONGODB_URI; tables are wide enough."""
    monkeypatch.setenv("PESTLE_MONGODB_URI", mongo_uri)
    monkeypatch.setenv("COLUMNS", "250")
    return mongo_uri


@pytest.fixture
def config(tmp_path: Path, store: Store, uri_env: str) -> Path:
    """A campaign config whose database exists (the ``store`` fixture made it)."""
    return write_config(tmp_path / "campaign" / "c.yaml", store.database)


def add_candidates(store: Store, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        items.append(NewStructure(atoms, "candidate", {"sampler": "rattle", "campaign": "t"}))
    return [sid for sid, _ in store.structures.add_many(items)]


def failed_job(store: Store, job_id: str = "label-abc123-lot") -> str:
    store.jobs.enqueue(job_id, "label", {"structure_id": "abc123"}, max_attempts=1)
    assert store.jobs.claim(job_id, "node7:4242", 60)
    store.jobs.fail(
        job_id,
        "node7:4242",
        "KohnShamConvergenceError: did not converge",
        'Traceback (most recent call last):\n  File "gpaw.py", line 1\n'
        "KohnShamConvergenceError: did not converge",
        retryable=False,
    )
    return job_id


# -- the defects of the first half of the issue ------------------------------------------
def test_query_decisions_collection(config: Path, store: Store) -> None:
    store.decisions.record({"kind": "retrain", "campaign": "t", "reason": "4 new labels"})
    result = cli("query", "--collection", "decisions", "-c", config)
    assert result.exit_code == 0, result.output
    assert "retrain" in result.output and "4 new labels" in result.output


def test_query_says_when_it_truncates(config: Path, store: Store) -> None:
    add_candidates(store, 54)
    result = cli("query", "-c", config)
    assert result.exit_code == 0, result.output
    assert "50 of 54" in result.output and "--limit 0" in result.output
    everything = cli("query", "-c", config, "--limit", "0")
    assert "54 of 54" in everything.output
    lines = cli("query", "-c", config, "--json")
    assert len(lines.stdout.splitlines()) == 50
    assert "50 of 54" in lines.stderr  # the note stays out of the JSON lines


def test_export_to_a_missing_directory_is_a_message(config: Path, tmp_path: Path) -> None:
    target = tmp_path / "missing" / "dir" / "x.extxyz"
    result = cli("export", "-c", config, "-o", target)
    assert result.exit_code == 3, result.output
    assert str(target.parent) in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.output and not target.parent.exists()


def test_jobs_with_an_unknown_state_is_a_usage_error(config: Path) -> None:
    result = cli("jobs", "--state", "bogus", "-c", config)
    assert result.exit_code == 2
    assert "bogus" in result.output and "failed" in result.output


READ_ONLY = [
    ["status"],
    ["query"],
    ["query", "--collection", "labels", "--json"],
    ["export", "-o", "x.extxyz"],
    ["report"],
    ["jobs"],
    ["jobs", "show", "label-x"],
    ["jobs", "retry", "--failed"],
    ["models"],
    ["models", "promote", "model-x"],
    ["explain", "abc"],
    ["evaluate", "model-x"],
    ["daemon", "status"],
]


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_a_work_directory_without_a_store_is_an_error(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PESTLE_MONGODB_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "typo-work"
    result = cli(*command, "-w", "typo-work")
    assert result.exit_code == 3, result.output
    assert str(typo) in result.stderr
    assert "pestle db start" in result.stderr and "pestle run" in result.stderr
    assert not typo.exists()  # no folder, no server


def test_commands_that_find_nothing_to_stop_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PESTLE_MONGODB_URI", raising=False)
    typo = tmp_path / "typo-work"
    assert cli("db", "status", "-w", typo).exit_code == 1
    assert "not running" in cli("db", "stop", "-w", typo).output
    assert "no daemon is running" in cli("daemon", "stop", "-w", typo).output
    # A dry run before the first run: the campaign has no store yet, and still none after.
    config = write_config(tmp_path / "c.yaml", "pestle", work_dir="typo-work")
    planned = cli("run", "--dry-run", "-c", config)
    assert planned.exit_code == 0, planned.output
    assert "there is no store yet" in planned.output
    assert not typo.exists()


def test_a_missing_database_is_not_created_by_reading(
    tmp_path: Path, uri_env: str, database_name: str
) -> None:
    config = write_config(tmp_path / "c.yaml", database_name)
    result = cli("status", "-c", config)
    assert result.exit_code == 3, result.output
    assert database_name in result.stderr and "pestle run" in result.stderr
    client = pymongo.MongoClient(uri_env)
    try:
        assert database_name not in client.list_database_names()
    finally:
        client.close()


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, store: Store, mongo_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pestle.config import load_config

    monkeypatch.delenv("PESTLE_MONGODB_URI", raising=False)
    folder = tmp_path / "campaign"
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "uri.txt").write_text(mongo_uri + "\n")
    (folder / "models").mkdir()
    (folder / "models" / "tuned.pth").write_bytes(b"")  # a model file must exist to be named
    write_config(
        folder / "c.yaml",
        store.database,
        store={"database": store.database, "uri_file": "secrets/uri.txt"},
        potential={"name": "chgnet", "params": {"checkpoint": "models/tuned.pth"}},
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("../campaign/c.yaml"))
    assert config.work_dir == folder / "work"
    assert config.store.uri_file == folder / "secrets" / "uri.txt"
    assert config.potential.params["checkpoint"] == str(folder / "models" / "tuned.pth")
    result = cli("status", "-c", "../campaign/c.yaml")
    assert result.exit_code == 0, result.output
    assert not (elsewhere / "work").exists()
    assert "relative to the config file" in (REPO / "README.md").read_text()  # documented


# -- the command line's conventions -------------------------------------------------------
def test_exit_codes_are_distinct_and_documented(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    help_text = cli("--help").output
    assert "Exit codes" in help_text
    for code in ("2", "3", "4", "5"):
        assert f" {code} " in help_text
    assert cli("status", "--no-such-option").exit_code == 2  # usage
    bad = write_config(tmp_path / "bad.yaml", "x", selection={"per_system": 0})
    refused = cli("run", bad)
    assert refused.exit_code == 3 and "selection.per_system" in refused.stderr  # bad input
    assert cli("query", "{nope", "-c", config).exit_code == 3

    # A failure of the work: a daemon that does not stop in time.
    work = tmp_path / "svc"
    (work / "daemon").mkdir(parents=True)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, "
         "signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)", "pestle", "daemon"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        (work / "daemon" / "daemon.pid").write_text(f"{stubborn.pid}\n")
        late = cli("daemon", "stop", "-w", work, "--timeout", "1")
        assert late.exit_code == 4 and "still runs" in late.stderr
        killed = cli("daemon", "stop", "-w", work, "--timeout", "1", "--kill")
        assert killed.exit_code == 0 and "killed" in killed.output
        stubborn.wait(10)
    finally:
        stubborn.kill()
        stubborn.wait()


def test_a_run_that_fails_exits_with_4(tmp_path: Path, uri_env: str, database_name: str) -> None:
    # A MACE model file that is no model: found when scoring loads it (EMT asked for Si,
    # as before, is now refused as bad input before the run starts).
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    path = write_config(
        tmp_path / "c.yaml",
        database_name,
        potential={"name": "mace", "params": {"model_path": str(junk), "device": "cpu",
                                              "trust_model_file": True}},
        dask={"n_workers": 1},
    )  # fmt: skip
    store = Store(uri_env, database_name)
    try:
        result = cli("run", path)
        assert result.exit_code == 4, result.output
        assert "stopped: " in result.stderr and "resumes" in result.stderr
        assert [r.state for r in store.runs.recent()] == ["interrupted"]
    finally:
        store.drop()
        store.close()


def test_run_takes_its_config_either_way(config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    for args in (["run", missing], ["run", "-c", missing], ["run", "--config", missing]):
        result = cli(*args)
        assert result.exit_code == 3 and "no such config file" in result.stderr, args
    assert cli("run").exit_code == 2
    assert cli("run", config, "-c", missing).exit_code == 2


def test_the_old_collection_flag_still_works_with_a_warning(config: Path) -> None:
    result = cli("query", "-C", "labels", "-c", config)
    assert result.exit_code == 0, result.output
    assert "deprecated" in result.stderr and "--collection" in result.stderr
    assert "-C" not in cli("query", "--help").output.replace("-Coll", "")


def test_every_read_command_speaks_json(config: Path, store: Store, tmp_path: Path) -> None:
    [sid] = add_candidates(store, 1)
    job_id = failed_job(store)
    status = json.loads(cli("status", "-c", config, "--json").stdout)
    assert status["counts"]["structures"] == 1 and status["jobs"] == {"failed": 1}
    assert any("pestle jobs retry --failed" in step["command"] for step in status["next"])

    [job] = [json.loads(line) for line in cli("jobs", "-c", config, "--json").stdout.splitlines()]
    assert job["_id"] == job_id and job["state"] == "failed"
    shown = json.loads(cli("jobs", "show", job_id, "-c", config, "--json").stdout)
    assert shown["traceback"].startswith("Traceback")

    checkpoint = tmp_path / "model.bin"
    checkpoint.write_bytes(b"weights")
    store.models.put("model-json", checkpoint, {"family": "emt", "potential": "emt"})
    [model] = [json.loads(x) for x in cli("models", "-c", config, "--json").stdout.splitlines()]
    assert model["id"] == "model-json" and model["current"] is False

    explained = json.loads(cli("explain", sid[:8], "-c", config, "--json").stdout)
    assert explained["structure"]["_id"] == sid and explained["runs"] == []

    kinds = {json.loads(x)["kind"] for x in cli("plugins", "--json").stdout.splitlines()}
    assert kinds == {"samplers", "potentials", "selectors", "labellers", "trainers"}
    samplers = [json.loads(x) for x in cli("samplers", "--json").stdout.splitlines()]
    rattle = next(s for s in samplers if s["name"] == "rattle")
    assert rattle["origin"] == "pestle" and {p["name"] for p in rattle["params"]} >= {"amplitudes"}

    daemon = json.loads(cli("daemon", "status", "-c", config, "--json").stdout)
    assert daemon["pid"] is None and daemon["jobs"] == {"failed": 1}


def test_evaluate_speaks_json(tmp_path: Path) -> None:
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    rng = np.random.default_rng(3)
    images = []
    for _ in range(4):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.positions += rng.normal(0, 0.1, atoms.positions.shape)
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy * 1.01, forces=forces * 1.2)
        images.append(atoms)
    data = tmp_path / "ref.extxyz"
    write(data, images)
    result = cli("evaluate", "emt", "--data", data, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["n_structures"] == 4 and "emt" in found["overall"]


# -- jobs show / retry --------------------------------------------------------------------
def test_jobs_show_and_retry(config: Path, store: Store) -> None:
    job_id = failed_job(store)
    store.jobs.enqueue("label-done-lot", "label", {"structure_id": "s2"})
    assert store.jobs.claim("label-done-lot", "node7:1", 60)
    store.jobs.finish("label-done-lot", "node7:1", {"label_id": "s2-lot"})

    shown = cli("jobs", "show", job_id[:10], "-c", config)
    assert shown.exit_code == 0, shown.output
    for text in ("failed", "node7:4242", "attempts 1/1", "KohnShamConvergenceError",
                 "Traceback (most recent call last)", "label-abc123-lot"):  # fmt: skip
        assert text in shown.output, text
    assert cli("jobs", "-c", config, "show", job_id).exit_code == 0  # -c before the subcommand
    assert cli("jobs", "show", "label-", "-c", config).exit_code == 3  # ambiguous prefix
    assert cli("jobs", "show", "nope", "-c", config).exit_code == 3

    refused = cli("jobs", "retry", job_id, "label-done-lot", "-c", config)
    assert refused.exit_code == 3 and "label-done-lot is done" in refused.stderr
    assert store.jobs.state(job_id) == "failed"  # nothing changed
    retried = cli("jobs", "retry", job_id, "-c", config)
    assert retried.exit_code == 0 and "re-queued 1 job" in retried.output
    assert store.jobs.state(job_id) == "queued"
    assert [h.event for h in store.jobs.get(job_id).history][-1] == "requeued"
    assert "requeued" in cli("jobs", "show", job_id, "-c", config).output
    # Done at last: the failed attempt's error stays in the history, not on the job.
    assert store.jobs.claim(job_id, "node7:2", 60)
    store.jobs.finish(job_id, "node7:2", {"label_id": "abc123-lot"})
    done = store.jobs.get(job_id)
    assert done.error is None and [h.event for h in done.history][-3:] == [
        "failed", "requeued", "done"
    ]  # fmt: skip
    assert cli("jobs", "retry", "-c", config).exit_code == 2  # which jobs?
    assert "re-queued 0 failed jobs" in cli("jobs", "retry", "--failed", "-c", config).output


# -- status says what to do next ----------------------------------------------------------
def test_status_ends_with_the_next_useful_command(
    config: Path, store: Store, tmp_path: Path
) -> None:
    empty = cli("status", "-c", config)
    assert empty.exit_code == 0, empty.output
    assert f"pestle run {config}" in empty.output.splitlines()[-1]

    job_id = failed_job(store)
    failing = cli("status", "-c", config).output
    assert f"pestle jobs show {job_id}" in failing and "pestle jobs retry --failed" in failing

    checkpoint = tmp_path / "model.bin"
    checkpoint.write_bytes(b"weights")
    store.models.put("model-new", checkpoint, {"family": "emt", "potential": "emt"})
    assert "pestle models promote model-new" in cli("status", "-c", config).output
    # Once evaluated, the hint quotes its softening with the interval (status crashed on
    # the stored estimate, a dict, before).
    from pestle.evaluation.intervals import Estimate

    scale = Estimate(0.912, 0.85, 0.97, n_structures=6, n_values=144).as_dict()
    metrics = {"levels": {"chemical_system": {"Cu": {"softening": scale}}}}
    store.models.record_evaluation("model-new", "test", ["a-lot"], metrics)
    evaluated = cli("status", "-c", config)
    assert evaluated.exit_code == 0, evaluated.output
    assert "held-out softening Cu 0.912 [0.850, 0.970]" in evaluated.output


def test_status_tells_a_killed_run_from_a_running_one(config: Path, store: Store) -> None:
    """A run whose process died without a word (SIGKILL, a crash of the machine) stays
    ``running`` in the store; status checks the recorded process and says it is gone."""
    import subprocess
    import sys

    store.runs.start("run-alive", {"campaign": "c"})  # this process: alive
    out = cli("status", "-c", config).output
    assert "run run-alive: running" in out and "process is gone" not in out
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    store.runs.start("run-killed", {"campaign": "c"})
    store.runs.update("run-killed", {"owner.pid": int(dead.stdout)})
    out = cli("status", "-c", config).output
    assert "run run-killed: stopped unfinished (its process is gone: killed?)" in out
    assert "run run-killed stopped unfinished (its process is gone): running it again" in out
    assert "run run-alive: running" in out


# -- run --dry-run ------------------------------------------------------------------------
def test_dry_run_estimates_and_writes_nothing(
    tmp_path: Path, uri_env: str, database_name: str
) -> None:
    from pestle.config import load_config
    from pestle.engine.dry_run import plan_campaign
    from pestle.labellers import LABELLERS
    from pestle.structures import settings_hash

    path = write_config(tmp_path / "c.yaml", database_name)
    result = cli("run", "--dry-run", "-c", path)
    assert result.exit_code == 0, result.output
    # Per system: 2 picks, 4 evaluation-set structures (the other candidates: 6 - 2, below
    # the default 8), 7 equation-of-state volumes; EMT has no settings to converge.
    assert "12 candidates" in result.output and "26 DFT calculations" in result.output
    assert "nothing was written" in result.output
    plan = json.loads(cli("run", "--dry-run", "-c", path, "--json").stdout)
    assert plan["candidates"] == 12 and plan["dft_calculations"] == {"min": 26, "max": 26}
    for system in ("Cu", "Al"):
        figures = plan["systems"][system]
        assert (figures["picks"], figures["evaluation"], figures["checks_min"]) == (2, 4, 7)
    assert set(plan["systems"]) == {"Cu", "Al"} and plan["store"]["exists"] is False
    client = pymongo.MongoClient(uri_env)
    try:
        assert database_name not in client.list_database_names()
    finally:
        client.close()
    assert not (tmp_path / "work").exists()

    # Labels already stored at this level of theory lower the estimate.
    config = load_config(path)
    in_memory = plan_campaign(config)
    cu = [c for c in in_memory.candidates if c.chemical_system == "Cu"]
    store = Store(uri_env, database_name)
    try:
        lot = LABELLERS.build("emt", {}).level_of_theory()
        for candidate in cu:
            [(sid, _)] = store.structures.add_many([NewStructure(candidate.atoms, "candidate", {})])
            store.labels.put(sid, labeller="emt", level_of_theory=lot, lot_hash=settings_hash(lot),
                             energy=-1.0, forces=np.zeros((len(candidate.atoms), 3)),
                             stress=None)  # fmt: skip
        runs_before = store.runs.count()
        again = json.loads(cli("run", "--dry-run", "-c", path, "--json").stdout)
        assert again["systems"]["Cu"]["already_labelled"] == len(cu)
        assert again["dft_calculations"] == {"min": 20, "max": 20}  # Cu: its EOS scan only
        assert store.runs.count() == runs_before == 0
        assert store.structures.count() == len(cu)
    finally:
        store.drop()
        store.close()


# -- the config reference -----------------------------------------------------------------
def test_every_config_key_is_described() -> None:
    """The reference leaves no key unexplained: each row of docs/config.md's tables has a
    description."""
    rows = [line for line in cli("config", "docs").stdout.splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    bare = [row for row in rows if not row.rstrip().rstrip("|").rsplit("|", 1)[-1].strip()]
    assert not bare, bare


def test_config_schema_docs_and_validate(tmp_path: Path) -> None:
    schema = json.loads(cli("config", "schema").stdout)
    assert {"seeds", "samplers", "work_dir", "store"} <= set(schema["properties"])
    assert "source" not in schema["properties"]
    docs = cli("config", "docs")
    assert docs.exit_code == 0
    assert (REPO / "docs" / "config.md").read_text() == docs.stdout, (
        "docs/config.md is stale: run `pestle config docs -o docs/config.md`"
    )
    good = write_config(tmp_path / "good.yaml", "x")
    valid = cli("config", "validate", good)
    assert valid.exit_code == 0 and "valid" in valid.output
    bad = write_config(
        tmp_path / "bad.yaml", "x", samplers=[{"name": "rattle", "params": {"nope": 1}}]
    )
    invalid = cli("config", "validate", bad)
    assert invalid.exit_code == 3
    assert str(bad) in invalid.stderr and "samplers.0.params.nope" in invalid.stderr


def test_plugin_summaries_are_whole_sentences() -> None:
    from pestle.plugins import _summary

    class Wrapped:
        """A summary that is long enough to wrap onto a
        second line of the docstring.

        Details that stay out."""

    assert _summary(Wrapped) == (
        "A summary that is long enough to wrap onto a second line of the docstring."
    )
    # Every built-in: a sentence of its own, not a lead-in to a list ("...:") nor a sibling's.
    listed = [json.loads(line) for line in cli("plugins", "--json").stdout.splitlines()]
    built_in = [p for p in listed if p["origin"] == "pestle"]
    assert len(built_in) >= 20
    for plugin in built_in:
        assert plugin["summary"].endswith((".", ")")), plugin
    for kind in {p["kind"] for p in built_in}:
        summaries = [p["summary"] for p in built_in if p["kind"] == kind]
        assert len(summaries) == len(set(summaries)), kind


def test_a_second_daemon_exits_with_its_own_code(config: Path, store: Store) -> None:
    store.meta.acquire_daemon_lease("elsewhere:1:abc", 60, {})  # held by a live process
    refused = cli("daemon", "start", "--foreground", "-c", config)
    assert refused.exit_code == 5, refused.output
    assert "another pestle daemon holds this store" in refused.stderr
    assert "another pestle daemon" in cli("daemon", "start", "--help").output
    assert "5 another pestle daemon holds the store" in cli("--help").output


def test_the_executable_runs_the_package() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("pestle")), "config", "validate", "/nonexistent.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3 and "no such config file" in done.stderr


def test_candidates_obey_the_configured_limits_and_refusals_are_explained(
    tmp_path: Path, uri_env: str, database_name: str
) -> None:
    """The validity check of candidates takes `limits` (as the seeds' does), and a dry run
    says why candidates were refused."""
    plain = json.loads(cli("run", "--dry-run", "--json", "-c",
                           write_config(tmp_path / "a.yaml", database_name)).stdout)  # fmt: skip
    assert plain["rejected"] == {}
    # Cu's nearest neighbours sit at 0.966 of two covalent radii: rattles push some below 0.95.
    strict = write_config(tmp_path / "b.yaml", database_name,
                          limits={"min_distance_fraction": 0.95})  # fmt: skip
    planned = json.loads(cli("run", "--dry-run", "--json", "-c", strict).stdout)
    refused = planned["rejected"]["rattle"]
    assert 0 < refused < 12
    (note,) = [n for n in planned["notes"] if "refused by the validity check, e.g." in n]
    assert note.startswith(f"{refused} rattle candidates") and "below 0.95 x the sum" in note
