"""The fine-tune stage: the configured pretrained potential fine-tuned on the split's training
labels (validation labels choose the epoch, with the stopping part of the evaluation set when
``finetune.stopping_fraction`` is set) as a Dask job that asks for a GPU when a worker offers
one; the campaign's seeds go with it (replay). A model with the same trainer, labels and
parent is never trained twice."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pestle.stages.split import pooled
from pestle.store import ROLE_HOLDOUT, ROLE_TRAIN, ROLE_VALIDATION
from pestle.structures import settings_hash

if TYPE_CHECKING:
    from pestle.stages.context import RunContext


def train_model(
    ctx: RunContext, train_ids: list[str], val_ids: list[str], holdout_ids: list[str]
) -> str:
    """Fine-tune on these labels and store the model version; returns its id."""
    from pestle.dispatch.training import train_model as dispatch
    from pestle.stages.evaluate import evaluation_set_labels
    from pestle.structures import atoms_to_dict

    spec = ctx.config.finetune.trainer
    parent = ctx.base_potential.describe()
    left_out = unconverged(ctx, ctx.store.labels.systems_of(train_ids + val_ids).values())
    systems = sorted(set(ctx.store.labels.systems_of(train_ids).values()))
    # The part of the evaluation set the epoch is also chosen on (never judged on).
    stopping_ids = sorted(s.label_id for s in evaluation_set_labels(ctx, systems, "stopping"))
    # The seeds go to the trainer for replay (near-equilibrium structures it labels itself).
    seeds = list({seed.id: seed for seed in ctx.outputs.get("seeds") or []}.values())
    identity = {"trainer": spec.model_dump(), "train": train_ids, "validation": val_ids,
                "parent": parent}  # fmt: skip
    if left_out:  # the same labels without their stress train another model
        identity["left_out"] = left_out
    if stopping_ids:
        identity["stopping"] = stopping_ids
    if seeds and (spec.params.get("replay_weight") or 0) > 0:
        identity["seeds"] = sorted(seed.id for seed in seeds)
    model_id = "model-" + settings_hash(identity)
    if not ctx.store.models.exists(model_id):
        record = {
            "family": spec.name,
            "trainer": spec.model_dump(),
            "parent": parent,
            "training": {
                "label_ids": train_ids,
                "validation_label_ids": val_ids,
                "query": {"_id": {"$in": train_ids}},
                "holdout_label_ids": holdout_ids,
                "stopping_label_ids": stopping_ids,
                "seed_ids": sorted(seed.id for seed in seeds),
            },
            "level_of_theory_hash": ctx.lot_hash,
            "level_of_theory": ctx.level_of_theory,
            "levels_of_theory": {
                system: {"hash": ctx.labelling(system).lot_hash,
                         "theory": ctx.labelling(system).level_of_theory}
                for system in sorted(set(ctx.store.labels.systems_of(train_ids).values()))
            },
            "left_out": left_out,
            "run_id": ctx.run_id,
            "campaign": ctx.config.name,
        }  # fmt: skip
        dispatch(
            ctx.client,
            store_uri=ctx.store_uri,
            database=ctx.store.database,
            model_id=model_id,
            trainer=spec.model_dump(),
            train_label_ids=train_ids,
            val_label_ids=val_ids + stopping_ids,
            workdir=str(ctx.run_dir / "training" / model_id),
            record=record,
            leave_out=sorted(left_out),
            seeds=[atoms_to_dict(seed.atoms) for seed in seeds],
        )
    return model_id


def unconverged(ctx: RunContext, systems: Iterable[str]) -> dict[str, list[str]]:
    """Quantities the convergence gate found unconverged (and ``convergence.leave_out``
    allowed), per quantity the systems: fine-tuning leaves them out of every label, since the
    trainers take a quantity for all structures or none."""
    out: dict[str, list[str]] = {}
    for system in sorted(set(systems)):
        for quantity in (ctx.gate(system) or {}).get("unconverged_quantities") or []:
            out.setdefault(quantity, []).append(system)
    return out


class FinetuneStage:
    name = "finetune"
    requires = ("split",)
    provides = ("model_id",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        split = ctx.outputs["split"]
        if not ctx.config.finetune.enabled:
            ctx.record("finetune", {"skipped": "finetune.enabled is false"})
            return {"model_id": None}
        train_ids = pooled(split, ROLE_TRAIN)
        if not train_ids:
            ctx.record("finetune", {"skipped": "no training labels"})
            return {"model_id": None}
        val_ids = pooled(split, ROLE_VALIDATION)
        ctx.progress("finetune", 0, 1)
        model_id = train_model(ctx, train_ids, val_ids, pooled(split, ROLE_HOLDOUT))
        ctx.progress("finetune", 1, 1)
        ctx.record(
            "finetune",
            {"model_id": model_id, "n_train": len(train_ids), "n_validation": len(val_ids),
             "left_out": ctx.store.models.require(model_id).model_dump().get("left_out") or {}},
        )  # fmt: skip
        return {"model_id": model_id}
