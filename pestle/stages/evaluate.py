"""The evaluate stage: a baseline and the freshly trained model on the same held-out labels
(errors and softening scale per chemical system), parity plots of both, and the candidate's
evaluation recorded on its model version."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pestle.stages.split import pooled
from pestle.store import ROLE_HOLDOUT

if TYPE_CHECKING:
    from pestle.potentials import Potential
    from pestle.stages.context import RunContext


def strip_arrays(results: Mapping[str, dict]) -> dict[str, dict]:
    """Per-system metrics without the arrays kept for plots (what is stored)."""
    return {s: {k: v for k, v in m.items() if k != "arrays"} for s, m in results.items()}


class EvaluateStage:
    """``baseline``: ``"pretrained"`` (a campaign run: the configured potential, results named
    pretrained / fine-tuned) or ``"promoted"`` (the daemon: the promoted model, or the
    pretrained one before any promotion; results named incumbent / candidate)."""

    name = "evaluate"
    requires = ("split", "model_id")
    provides = ("evaluation",)

    def __init__(self, baseline: str = "pretrained") -> None:
        if baseline not in ("pretrained", "promoted"):
            raise ValueError(f"baseline must be pretrained or promoted, not {baseline!r}")
        self.baseline = baseline

    def _models(self, ctx: RunContext, model_id: str | None) -> dict[str, tuple[str, Potential]]:
        """{result name: (label for plots, potential)}: the baseline first."""
        if self.baseline == "pretrained":
            models = {"pretrained": ("pretrained", ctx.base_potential)}
            if model_id is not None:
                models["fine-tuned"] = ("fine-tuned", ctx.stored_potential(model_id))
            return models
        incumbent = ctx.store.models.promoted(ctx.config.finetune.trainer.name)
        models = {
            "incumbent": (
                incumbent or "the pretrained model",
                ctx.stored_potential(incumbent) if incumbent else ctx.base_potential,
            )
        }
        if model_id is not None:
            models["candidate"] = (model_id, ctx.stored_potential(model_id))
        return models

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pestle.evaluation.metrics import evaluate_potential
        from pestle.evaluation.plots import parity_plot

        model_id = ctx.outputs["model_id"]
        holdout_ids = pooled(ctx.outputs["split"], ROLE_HOLDOUT)
        holdout = [s.labelled() for s in ctx.store.labels.labelled({"_id": {"$in": holdout_ids}})]
        models = self._models(ctx, model_id)
        results = (
            {
                name: evaluate_potential(potential, holdout)
                for name, (_, potential) in models.items()
            }
            if holdout
            else {}
        )
        plots: dict[str, str] = {}
        for system in sorted({s for r in results.values() for s in r}):
            arrays = {name: r[system]["arrays"] for name, r in results.items() if system in r}
            path = parity_plot(
                next(iter(arrays.values()))["reference"],
                {models[name][0]: a["predicted"] for name, a in arrays.items()},
                ctx.run_dir / f"parity-forces-{system}.png",
                title=f"{system}: held-out forces vs {ctx.labeller.name}",
            )
            plots[system] = path.name
        summary = {name: strip_arrays(r) for name, r in results.items()}
        candidate = "fine-tuned" if self.baseline == "pretrained" else "candidate"
        ctx.record(
            "evaluate",
            {
                "holdout_label_ids": holdout_ids,
                "metrics": summary,
                "plots": plots,
                "models": {name: potential.describe() for name, (_, potential) in models.items()},
                "baseline": models[next(iter(models))][0],
            },
        )
        if model_id is not None and candidate in summary:
            ctx.store.models.record_evaluation(
                model_id, ctx.run_id, holdout_ids, summary[candidate]
            )
        return {"evaluation": results}
