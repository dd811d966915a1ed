"""The run report: markdown with PNG parity plots, written into the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


METRIC_HEADER = [
    "labels",
    "system",
    "model",
    "structures",
    "softening scale [95% structure-level CI]",
    "force MAE (eV/Å) [95% CI]",
]


def write_report(
    run: dict[str, Any], evaluation: dict[str, Any], model_id: str | None, run_dir: Path
) -> Path:
    stages = run.get("stages", {})
    sample = stages.get("sample", {})
    label = stages.get("label", {})
    select = stages.get("select", {})
    lines = [
        f"# pestle run `{run['_id']}`",
        "",
        f"Campaign **{run.get('campaign')}** from `{run.get('config_file')}`; store `{run.get('store')}`.",
        "",
        "## Softening on reference labels the models never trained on",
        "",
        "Softening scale: slope of the least-squares line through the origin of model force",
        "components against reference force components (below 1: the model is softer than the",
        "reference). The evaluation set is drawn at random from every valid candidate; the",
        "held-out picks were selected by score like the training labels. Intervals are 95%",
        "structure-level (components of one structure are not independent).",
        "",
    ]
    from pestle.engine.run import summary_rows

    rows = summary_rows(stages)
    if rows:
        lines += _table(METRIC_HEADER, [[r["labels"], r["system"], r["model"], r["n"],
                                         r["softening"], r["force_mae"]] for r in rows])  # fmt: skip
    else:
        lines.append("No labels to evaluate on (raise the per-system budgets).")
    lines.append("")
    plots = (evaluation.get("evaluation_set") or {}).get("plots", {})
    for system, kinds in plots.items():
        if "forces" in kinds:
            lines += [f"### {system}", "", f"![force parity {system}]({kinds['forces']})", ""]

    lines += ["## Dataset", ""]
    counts = sample.get("counts", {})
    lines += _table(
        [
            "seeds",
            "candidates new",
            "already stored",
            "rejected",
            "selected",
            "labels dispatched",
            "already labelled",
            "failed",
        ],
        [
            [
                len(stages.get("seed", {}).get("seeds", [])),
                counts.get("new", 0),
                counts.get("already_stored", 0),
                counts.get("rejected", 0),
                len(select.get("selected", [])),
                label.get("dispatched"),
                label.get("already_labelled"),
                len(label.get("failed", [])),
            ]
        ],
    )
    lines += [
        "",
        "Candidates per sampler: "
        + ", ".join(
            f"{k.split(':', 1)[1]} {v}" for k, v in counts.items() if k.startswith("sampler:")
        ),
        "",
    ]
    for sampler, reasons in sample.get("rejected", {}).items():
        lines.append(f"- rejected by validity checks ({sampler}): " + "; ".join(reasons[:5]))
    lines += [
        "",
        "## Level of theory",
        "",
        "```json",
        json.dumps(label.get("level_of_theory", {}), indent=2, default=str),
        "```",
        "",
    ]

    finetune = stages.get("finetune", {})
    lines += ["## Fine-tuning", ""]
    if model_id:
        lines.append(
            f"Model `{model_id}` trained on {finetune.get('n_train')} labelled structures; "
            f"{finetune.get('n_validation', 0)} more chose the best epoch (none: the "
            "training loss chose it)."
        )
    else:
        lines.append(f"No fine-tuning: {finetune.get('skipped', 'disabled')}.")
    lines += ["", "## Selected candidates", ""]
    lines += _table(
        ["structure", "rank", "why"],
        [[s["id"][:12], s["rank"], s["reason"]] for s in select.get("selected", [])],
    )
    lines += [
        "",
        "## Code versions",
        "",
        ", ".join(f"{k} {v}" for k, v in (run.get("code_versions") or {}).items()),
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
