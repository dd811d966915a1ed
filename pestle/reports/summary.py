"""The few lines a finished run prints: per labelled set, system and model, the softening
scale and force MAE with their structure-level intervals."""

from __future__ import annotations

from typing import Any


def summary_rows(stages: dict[str, Any]) -> list[dict[str, str]]:
    """What a finished run prints: per labelled set (evaluation set first), chemical system
    and model, the softening scale and force MAE with their structure-level 95% intervals,
    or "not enough structures (n = ...)"."""
    from pestle.evaluation.intervals import Estimate, format_estimate

    rows = []
    evaluate = stages.get("evaluate", {})
    for which in ("evaluation_set", "holdout"):
        stored = (evaluate.get(which) or {}).get("evaluation")
        if not stored:
            continue
        for system, entry in stored["levels"].get("chemical_system", {}).items():
            for model, figures in entry["models"].items():
                rows.append({
                    "labels": which.replace("_", " "),
                    "system": system,
                    "model": model,
                    "n": str(entry["n_structures"]),
                    "softening": format_estimate(Estimate.from_dict(figures["softening"])),
                    "force_mae": format_estimate(Estimate.from_dict(figures["force_mae"])),
                })  # fmt: skip
    return rows
