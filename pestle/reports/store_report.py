"""The store's report (``pestle report``): what the dataset, the models and the jobs did.

Four PNG figures, each drawn only from stored documents:

* dataset growth: cumulative labels over time per chemical system, and labels per sampler;
* softening scale per chemical system across model versions (each model's held-out scale
  with its 95% interval, in the order the versions were evaluated; 1 = no softening);
* parity plots already drawn by runs and daemon decisions (copied next to the report);
* job throughput (jobs finished per time bin) and failures (counts per error).

Written as HTML (PNG files beside it) or markdown.
"""

from __future__ import annotations

import html
import shutil
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pestle.store import Store


def _figure(width: float = 7.0, height: float = 4.0):
    # Figure + Agg canvas, not pyplot: no global state, headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def growth_plot(store: Store, path: Path) -> tuple[Path, dict[str, Any]]:
    """Cumulative labels per chemical system over time (left); labels per system and
    sampler (right, stacked)."""
    labels = sorted(
        (
            label.model_dump()
            for label in store.labels.find({}, ["chemical_system", "sampler", "created_at"])
        ),
        key=lambda label: _utc(label["created_at"]),
    )
    fig = _figure(11, 4.2)
    left, right = fig.subplots(1, 2)
    times: dict[str, list[datetime]] = defaultdict(list)
    per_sampler: dict[str, Counter] = defaultdict(Counter)
    for label in labels:
        times[label["chemical_system"]].append(_utc(label["created_at"]))
        per_sampler[label["chemical_system"]][label.get("sampler") or "seed"] += 1
    for system, moments in sorted(times.items()):
        left.step(moments, np.arange(1, len(moments) + 1), where="post", label=system)
    left.set_xlabel("time (UTC)")
    left.set_ylabel("labels stored (cumulative)")
    left.set_title("dataset growth")
    left.grid(alpha=0.3)
    if times:
        left.legend(fontsize="small")
    fig.autofmt_xdate()
    systems = sorted(per_sampler)
    samplers = sorted({s for counts in per_sampler.values() for s in counts})
    bottom = np.zeros(len(systems))
    for sampler in samplers:
        heights = np.array([per_sampler[s][sampler] for s in systems], dtype=float)
        right.bar(systems, heights, bottom=bottom, label=sampler)
        bottom += heights
    right.set_ylabel("labels")
    right.set_title("labels per chemical system and sampler")
    if samplers:
        right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    summary = {s: dict(per_sampler[s]) for s in systems}
    return path, summary


def softening_history(store: Store) -> list[dict[str, Any]]:
    """Softening scales on the evaluation set in the order they were measured: one row per
    (model, system), from campaign runs (pretrained and fine-tuned) and daemon retrainings
    (incumbent and candidate on the same structures), with structure-level intervals."""
    from pestle.evaluation.evaluate import stored_softening

    outcomes = {d.model_dump().get("run_id"): d.model_dump().get("outcome")
                for d in store.decisions.find("retrain")}  # fmt: skip
    rows: list[dict[str, Any]] = []
    for run in store.runs.with_stage("evaluate"):
        evaluate = run.stages["evaluate"]
        stored = (evaluate.get("evaluation_set") or {}).get("evaluation")
        if not stored:
            continue
        model_id = (run.stages.get("finetune") or {}).get("model_id")
        for name in stored["models"]:
            if name in ("fine-tuned", "candidate"):
                outcome = outcomes.get(run.id)
                model = f"{model_id} ({outcome})" if outcome else model_id
            elif name == "incumbent":  # the promoted model, or the pretrained one before any
                label = evaluate.get("labels", {}).get(name, "")
                model = f"{label} (promoted)" if label.startswith("model-") else "pretrained"
            else:
                model = "pretrained"
            for system, estimate in stored_softening(stored, model=name).items():
                figures = stored["levels"]["chemical_system"][system]["models"][name]
                rows.append({"at": run.started_at, "model": model, "system": system,
                             "slope": estimate.value, "ci_low": estimate.low,
                             "ci_high": estimate.high,
                             "force_mae": (figures.get("force_mae") or {}).get("value"),
                             "n_structures": estimate.n_structures})  # fmt: skip
    rows.sort(key=lambda r: _utc(r["at"]) if r["at"] else datetime.min.replace(tzinfo=timezone.utc))
    return rows


def _short(model: str) -> str:
    """``model-0123456789abcdef (promoted)`` -> ``model-01234567 (promoted)``."""
    name, _, outcome = model.partition(" ")
    return name[:14] + (" " + outcome if outcome else "") if name.startswith("model-") else model


def softening_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Softening scale per system (one line each) over model versions in evaluation order."""
    fig = _figure(8, 4.2)
    ax = fig.subplots()
    order: list[str] = []
    for row in rows:
        if row["model"] not in order:  # a model's first measurement fixes its place
            order.append(row["model"])
    order.sort(key=lambda m: m != "pretrained")
    by_system: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if row["slope"] is not None:
            by_system[row["system"]][row["model"]] = row  # the latest measurement wins
    for index, (system, per_model) in enumerate(sorted(by_system.items())):
        xs = [order.index(m) for m in per_model]
        ys = np.array([r["slope"] for r in per_model.values()])
        low = ys - np.array(
            [r["ci_low"] if r["ci_low"] is not None else r["slope"] for r in per_model.values()]
        )
        high = (
            np.array(
                [
                    r["ci_high"] if r["ci_high"] is not None else r["slope"]
                    for r in per_model.values()
                ]
            )
            - ys
        )
        ax.errorbar(np.array(xs) + 0.05 * index, ys, yerr=[low, high], marker="o", capsize=3,
                    label=system)  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=1, label="1 = no softening")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([_short(m) for m in order], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("softening scale (held out, 95% CI)")
    ax.set_title("softening scale per chemical system across model versions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path


def jobs_plot(store: Store, path: Path) -> tuple[Path, dict[str, Any]]:
    """Jobs finished per time bin, by final state (left); failures per error (right)."""
    jobs = [job.model_dump() for job in store.jobs.finished()]
    fig = _figure(11, 4.2)
    left, right = fig.subplots(1, 2)
    finished = [j for j in jobs if j.get("finished_at")]
    if finished:
        moments = [_utc(j["finished_at"]).timestamp() for j in finished]
        span = max(moments) - min(moments)
        width = 60.0 if span <= 6 * 3600 else 3600.0  # per minute for short campaigns
        first = np.floor(min(moments) / width) * width  # bins on whole minutes/hours
        edges = np.arange(first, max(moments) + width, width)
        if len(edges) < 2:
            edges = np.array([first, first + width])
        states = sorted({j["state"] for j in finished})
        stacked = [
            [_utc(j["finished_at"]).timestamp() for j in finished if j["state"] == s]
            for s in states
        ]
        left.hist(stacked, bins=edges, stacked=True, label=states)
        ticks = edges[:: max(1, len(edges) // 6)]
        left.set_xticks(ticks)
        left.set_xticklabels(
            [datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M") for t in ticks]
        )
        left.legend(fontsize="small")
        left.set_xlabel(f"time (UTC), bins of {'1 min' if width == 60 else '1 h'}")
    left.set_ylabel("jobs finished")
    left.set_title("job throughput")
    failures = Counter(
        (j.get("error") or "unknown").splitlines()[0][:60] for j in jobs if j["state"] == "failed"
    )
    if failures:
        names, counts = zip(*failures.most_common(8), strict=True)
        right.barh(range(len(names)), counts, color="C3")
        right.set_yticks(range(len(names)))
        right.set_yticklabels(names, fontsize="x-small")
        right.invert_yaxis()
    else:
        right.text(0.5, 0.5, "no failed jobs", ha="center", va="center", transform=right.transAxes)
        right.set_xticks([])
        right.set_yticks([])
    right.set_xlabel("failed jobs")
    right.set_title("failures by error")
    fig.tight_layout()
    fig.savefig(path)
    return path, {"states": store.jobs.counts(), "failures": dict(failures)}


def _parity_plots(store: Store, work_dir: Path, out: Path) -> list[tuple[str, str]]:
    """Parity PNGs of the latest run evaluations and daemon decisions, copied beside the report."""
    found: list[tuple[str, Path]] = []
    for run in store.runs.with_stage("evaluate")[::-1][:3]:  # the latest three
        plots = (run.stages["evaluate"].get("evaluation_set") or {}).get("plots", {})
        for system, kinds in plots.items():
            if "forces" in kinds:
                found.append((f"{system}: run {run.id}, evaluation set",
                              work_dir / "runs" / run.id / kinds["forces"]))  # fmt: skip
    copied = []
    for caption, source in found:
        if source.is_file():
            target = out / f"parity-{len(copied):02d}-{source.name}"
            shutil.copyfile(source, target)
            copied.append((caption, target.name))
    return copied


def write_store_report(store: Store, work_dir: Path, out: Path, fmt: str = "html") -> Path:
    if fmt not in ("html", "md"):
        raise ValueError(f"report format must be html or md, not {fmt!r}")
    out.mkdir(parents=True, exist_ok=True)
    growth, per_sampler = growth_plot(store, out / "dataset-growth.png")
    rows = softening_history(store)
    softening = softening_plot(rows, out / "softening-by-model.png")
    jobs, job_summary = jobs_plot(store, out / "jobs.png")
    parity = _parity_plots(store, Path(work_dir), out)
    decisions = [d.model_dump() for d in store.decisions.find()]
    promoted = store.models.promoted_all()
    sections: list[tuple[str, list[str], list[list[Any]] | None, list[tuple[str, str]]]] = [
        ("Dataset growth", ["system", "labels per sampler"],
         [[s, ", ".join(f"{k} {v}" for k, v in c.items())] for s, c in per_sampler.items()],
         [("labels over time and per sampler", growth.name)]),
        ("Softening scale across model versions", ["measured", "model", "system", "slope", "95% CI", "force MAE eV/Å"],
         [[r["at"], r["model"], r["system"], _num(r["slope"]), f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]", _num(r["force_mae"])] for r in rows],
         [("held-out softening scale per model version", softening.name)]),
        ("Parity plots", [], None, parity),
        ("Jobs", ["state", "jobs"], [[k, v] for k, v in sorted(job_summary["states"].items())],
         [("throughput and failures", jobs.name)]),
        ("Decisions", ["at", "kind", "campaign", "reason"],
         [[d["at"], d["kind"], d.get("campaign", ""), d.get("reason", "")] for d in decisions[-30:]], []),
        ("Promoted models", ["family", "model", "since", "reason"],
         [[p["family"], p["model_id"], p["at"], p.get("reason", "")] for p in promoted], []),
    ]  # fmt: skip
    counts = store.counts()
    title = f"pestle store report: {store.database}"
    intro = ", ".join(f"{n} {k}" for k, n in counts.items())
    if fmt == "md":
        lines = [f"# {title}", "", intro, ""]
        for heading, header, table, images in sections:
            lines += [f"## {heading}", ""]
            if table is not None and header:
                lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table]
                lines.append("")
            lines += [f"![{caption}]({name})\n" for caption, name in images]
        path = out / "report.md"
        path.write_text("\n".join(lines))
        return path
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
             "font-size:small}img{max-width:100%}</style>",
             f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"]  # fmt: skip
    for heading, header, table, images in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if table is not None and header:
            parts.append(
                "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            )
            parts += [
                "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                for row in table
            ]
            parts.append("</table>")
        parts += [f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
                  f"<figcaption>{html.escape(caption)}</figcaption></figure>" for caption, name in images]  # fmt: skip
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return f"{_utc(value):%Y-%m-%d %H:%M:%S}"
    return "" if value is None else str(value)
