"""The evaluate stage: a baseline and the freshly trained model on the same labels, with
structure-level intervals, paired differences and every plot.

Two sets of labels, never trained on: the campaign's *evaluation set* (drawn at random from
all valid candidates, stratified by sampler and amplitude) is what every figure, decision and
report rests on; the *held-out picks* (score-selected like the training labels, so they
measure the regime pestle chose) are shown beside it. Below ``min_structures`` a figure says
"not enough structures (n = ...)" instead of a number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pestle.stages.split import pooled
from pestle.store import ROLE_HOLDOUT, StoredLabel

if TYPE_CHECKING:
    from pestle.evaluation.evaluate import Evaluation
    from pestle.potentials import Potential
    from pestle.stages.context import RunContext


def evaluation_set_labels(
    ctx: RunContext, systems: list[str] | None = None, part: str = "judging"
) -> list[StoredLabel]:
    """The stored labels of the campaign's evaluation set (each system at its level of
    theory). With ``finetune.stopping_fraction``, a stable part of each system's set is
    where fine-tuning also chooses its epoch: ``part`` ``"judging"`` (every figure and
    decision) leaves it out, ``"stopping"`` is that part alone, ``"all"`` both."""
    from pestle.stages.evaluation_set import stopping_split

    if part not in ("judging", "stopping", "all"):
        raise ValueError(f"part must be judging, stopping or all, not {part!r}")
    members = ctx.store.structures.evaluation_set(ctx.config.name, systems)
    fraction = ctx.config.finetune.stopping_fraction
    if part != "all" and fraction > 0:
        split = stopping_split(members, fraction, ctx.config.seed)
        stop = {i for ids in split.values() for i in ids}
        members = {
            system: [i for i in ids if (i in stop) == (part == "stopping")]
            for system, ids in members.items()
        }
    elif part == "stopping":
        return []
    out: list[StoredLabel] = []
    # A label's system is its structure's: the structure ids and the level of theory say it.
    for lot_hash, group in ctx.systems_by_lot_hash(members).items():
        ids = [i for system in group for i in members[system]]
        out += ctx.store.labels.labelled({"structure_id": {"$in": ids}, "lot_hash": lot_hash})
    return sorted(out, key=lambda s: s.label_id)


def evaluate_on(
    ctx: RunContext, models: dict[str, Potential], stored: list[StoredLabel], baseline: str
) -> Evaluation | None:
    """``pestle.evaluation.evaluate`` of these models on these labels (None without labels)."""
    from pestle.evaluation.evaluate import evaluate

    if not stored:
        return None
    return evaluate(
        models,
        [s.labelled() for s in stored],
        samplers={s.structure_id: s.sampler for s in stored},
        baseline=baseline,
        min_structures=ctx.config.evaluation.evaluation_set.min_structures,
    )


def compared_models(
    ctx: RunContext, baseline: str, model_id: str | None
) -> dict[str, tuple[str, Potential]]:
    """{result name: (label for plots, potential)}, the baseline first. ``baseline``:
    ``"pretrained"`` (pretrained / fine-tuned) or ``"promoted"`` (incumbent / candidate:
    the promoted model, or the pretrained one before any promotion)."""
    if baseline == "pretrained":
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


class EvaluateStage:
    """``baseline``: ``"pretrained"`` (a campaign run: the configured potential, results named
    pretrained / fine-tuned) or ``"promoted"`` (the daemon: the promoted model, or the
    pretrained one before any promotion; results named incumbent / candidate)."""

    name = "evaluate"
    requires = ("split", "model_id")
    provides = ("evaluation", "holdout_evaluation")

    def __init__(self, baseline: str = "pretrained") -> None:
        if baseline not in ("pretrained", "promoted"):
            raise ValueError(f"baseline must be pretrained or promoted, not {baseline!r}")
        self.baseline = baseline

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pestle.evaluation.plots import evaluation_plots

        model_id = ctx.outputs["model_id"]
        split = ctx.outputs["split"]
        models = compared_models(ctx, self.baseline, model_id)
        potentials = {name: potential for name, (_, potential) in models.items()}
        labels = {name: label for name, (label, _) in models.items()}
        baseline = next(iter(models))
        candidate = next((name for name in models if name != baseline), None)
        sets = {
            "evaluation_set": evaluation_set_labels(ctx, sorted(split)),
            "holdout": list(
                ctx.store.labels.labelled({"_id": {"$in": pooled(split, ROLE_HOLDOUT)}})
            ),
        }
        outcome: dict[str, Any] = {
            "baseline": baseline,
            "candidate": candidate,
            "labels": labels,
            "models": {name: potential.describe() for name, potential in potentials.items()},
            "min_structures": ctx.config.evaluation.evaluation_set.min_structures,
        }
        evaluations: dict[str, Evaluation | None] = {}
        for which, stored in sets.items():
            evaluation = evaluate_on(ctx, potentials, stored, baseline)
            evaluations[which] = evaluation
            label_ids = sorted(s.label_id for s in stored)
            entry: dict[str, Any] = {"label_ids": label_ids}
            if evaluation is None:
                entry["note"] = f"no {which.replace('_', ' ')} labels"
            else:
                entry["evaluation"] = evaluation.as_dict()
                written = evaluation_plots(evaluation, ctx.run_dir / which, labels=labels)
                entry["plots"] = {
                    group: {
                        kind: str(path.relative_to(ctx.run_dir)) for kind, path in kinds.items()
                    }
                    for group, kinds in written.items()
                }
                if candidate is not None:
                    source = ctx.run_id if which == "evaluation_set" else f"{ctx.run_id}:{which}"
                    ctx.store.models.record_evaluation(
                        model_id, source, label_ids, evaluation.model_summary(candidate)
                    )
            outcome[which] = entry
        ctx.record("evaluate", outcome)
        return {"evaluation": evaluations["evaluation_set"],
                "holdout_evaluation": evaluations["holdout"]}  # fmt: skip
