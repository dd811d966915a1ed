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


def metrics_rows(metrics: dict[str, dict[str, dict]]) -> list[list[Any]]:
    """One row per (chemical system, model) from ``evaluate`` metrics."""
    rows = []
    systems = sorted({s for per_model in metrics.values() for s in per_model})
    for system in systems:
        for model, per_system in metrics.items():
            m = per_system.get(system)
            if m is None:
                continue
            fit = m["softening"]
            rows.append(
                [
                    system,
                    model,
                    m["n_structures"],
                    m["n_force_components"],
                    f"{fit['slope']:.3f} [{fit['ci_low']:.3f}, {fit['ci_high']:.3f}]",
                    m["force_mae"],
                    m["force_rmse"],
                    m.get("energy_mae_per_atom"),
                    m.get("energy_mae_per_atom_offset_removed"),
                ]
            )
    return rows


METRIC_HEADER = [
    "system",
    "model",
    "held-out structures",
    "force components",
    "softening scale [95% CI]",
    "force MAE (eV/Å)",
    "force RMSE (eV/Å)",
    "energy MAE (eV/atom)",
    "energy MAE, mean offset removed (eV/atom)",
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
        "## Softening on held-out reference labels",
        "",
        "Softening scale: slope of the least-squares line through the origin of model force",
        "components against reference force components (below 1: the model is softer than the",
        "reference). Held-out structures were never used for fine-tuning.",
        "",
    ]
    metrics = evaluation.get("metrics", {})
    if metrics:
        lines += _table(METRIC_HEADER, metrics_rows(metrics))
    else:
        lines.append("No held-out labels: nothing to evaluate (raise the per-system budget).")
    lines.append("")
    for system, png in evaluation.get("plots", {}).items():
        lines += [f"### {system}", "", f"![force parity {system}]({png})", ""]

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
