"""The score stage: the scoring potential's forces and energies for every candidate of the
run (committee spread and descriptors when configured), stored under the identity of what
scored them, so a rerun with the same models recomputes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms

from pestle.potentials import Prediction

if TYPE_CHECKING:
    from pestle.stages.context import RunContext

# Candidates per chunk: bounds the driver's memory; the potential bounds each forward pass.
CHUNK = 32


def force_scores(atoms: Atoms, prediction: Prediction) -> dict[str, float]:
    """How hard the model pushes the atoms: the first-order proxy for how far from
    equilibrium (and how softened) a structure is."""
    norms = np.linalg.norm(prediction.forces, axis=1)
    return {
        "max_force": float(norms.max()),
        "mean_force": float(norms.mean()),
        "energy_per_atom": float(prediction.energy) / len(atoms),
    }


class ScoreStage:
    name = "score"
    requires = ("sampled",)
    provides = ("scored",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pestle.scoring import committee_disagreement

        key = ctx.model_key
        scoring = ctx.config.scoring
        potential = ctx.potential
        if scoring.embeddings and not potential.supports_embeddings:
            raise ValueError(f"scoring.embeddings: potential {potential.name} has no embeddings")
        todo = [d for d in ctx.store.structures.run_candidates(ctx.run_id) if key not in d.scores]
        total, done = len(todo), 0
        for start in range(0, total, CHUNK):
            chunk = todo[start : start + CHUNK]
            atoms_list = [ctx.store.structures.atoms_of(d) for d in chunk]
            predictions = potential.predict(atoms_list, stress=False)
            spread = self._committee(ctx, atoms_list, predictions, committee_disagreement)
            scores = {
                d.id: {**force_scores(atoms, prediction), **extra}
                for d, atoms, prediction, extra in zip(
                    chunk, atoms_list, predictions, spread, strict=True
                )
            }
            ctx.store.structures.set_scores(scores, key)
            if scoring.embeddings:
                vectors = potential.embed(atoms_list)
                ctx.store.structures.set_embeddings(
                    {d.id: v for d, v in zip(chunk, vectors, strict=True)}, key
                )
            done += len(chunk)
            ctx.progress("score", done, total)
        outcome = {
            "model": potential.describe(),
            "committee": [m.describe() for m in ctx.committee],
            "model_key": key,
            "scored": total,
        }
        ctx.record("score", outcome)
        return {"scored": outcome}

    @staticmethod
    def _committee(
        ctx: RunContext, atoms_list: Sequence[Atoms], predictions: list[Prediction], disagreement
    ) -> list[dict[str, float]]:
        if not ctx.committee:
            return [{}] * len(atoms_list)
        others = [m.predict(atoms_list, stress=False) for m in ctx.committee]
        return disagreement(atoms_list, [predictions, *others])
