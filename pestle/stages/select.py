"""The select stage: the candidates worth a reference label, per chemical system, by the
configured selector over the stored scores (and the expected softening error, fitted on the
labels already stored). The selection and each pick's reason are stored; a resumed pass
reuses its selection instead of choosing a fresh batch beside it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pestle.selectors import SELECTORS, ScoredCandidate
from pestle.stages.evaluation_set import stratum_key
from pestle.store.documents import Selection, StructureDoc

if TYPE_CHECKING:
    from pestle.scoring import SofteningModel
    from pestle.stages.context import RunContext


def softening_model(ctx: RunContext, systems: Iterable[str]) -> SofteningModel:
    """Softening scales of the scoring potential fitted on the labels already stored for
    these systems at the campaign's level of theory (the prior where there are too few)."""
    from pestle.scoring import SofteningModel

    scoring = ctx.config.scoring
    labelled = [
        (stored.atoms, stored.chemical_system, groups_of(stored.structure))
        for stored in ctx.store.labels.labelled(ctx.labels_filter(systems))
    ]
    if not labelled:
        return SofteningModel({}, scoring.softening_prior, scoring.softening_min_components)
    return SofteningModel.fit(
        ctx.potential, labelled, scoring.softening_prior, scoring.softening_min_components
    )


def groups_of(doc: StructureDoc) -> tuple[str, str]:
    """A structure's softening groups, finest first: sampler and amplitude, then sampler.
    A model can be stiff at small displacements and soft at large ones in one system, so a
    candidate's expected error uses the scale measured at its own amplitude when labels
    there allow."""
    sampler = doc.provenance.sampler or doc.kind
    return stratum_key(sampler, doc.provenance.params), sampler


def taken(ctx: RunContext, systems: Mapping[str, str]) -> set[str]:
    """Structures (id -> chemical system) that already have a label, or a labelling job, at
    their system's level of theory."""
    labels = {ctx.label_id(sid, system): sid for sid, system in systems.items()}
    jobs = {ctx.label_job_id(sid, system): sid for sid, system in systems.items()}
    return {labels[i] for i in ctx.store.labels.existing(labels)} | {
        jobs[j] for j in ctx.store.jobs.existing(jobs)
    }


class SelectStage:
    name = "select"
    requires = ("scored", "evaluation_set")
    # When the evaluation set was labelled first (a campaign run), its labels are already
    # in the softening fit below.
    provides = ("selected",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pestle.scoring import combine, softening_error

        previous = ctx.recorded("select")
        if previous and previous.get("selected"):
            return {"selected": [s["id"] for s in previous["selected"]]}
        key = ctx.model_key
        fields = ["chemical_system", "provenance.sampler", "provenance.params", f"scores.{key}",
                  f"embeddings.{key}", "evaluation_for"]  # fmt: skip
        # An evaluation-set structure (of any campaign) is never picked for training.
        docs = [d for d in ctx.store.structures.run_candidates(ctx.run_id, fields)
                if not d.evaluation_for]  # fmt: skip
        if ctx.round is not None:  # a round never re-picks what earlier rounds labelled
            already = taken(ctx, {d.id: d.chemical_system for d in docs})
            docs = [d for d in docs if d.id not in already]
        scoring = ctx.config.scoring
        softening = None
        if "expected_softening_error" in scoring.weights:
            softening = softening_model(ctx, {d.chemical_system for d in docs})
        estimates: dict[str, dict] = {}
        scored = []
        for d in docs:
            scores = dict(d.scores[key])
            sampler = d.provenance.sampler
            if softening is not None:
                estimate = softening.estimate(d.chemical_system, groups_of(d))
                # max_force is the largest per-atom force norm, so this is the largest error.
                scores["expected_softening_error"] = softening_error(
                    scores["max_force"], estimate.slope
                )
                estimates[f"{d.chemical_system}/{groups_of(d)[0]}"] = estimate.as_dict()
            embedding = d.embeddings.get(key)
            scored.append(
                ScoredCandidate(
                    id=d.id,
                    chemical_system=d.chemical_system,
                    sampler=sampler,
                    scores=scores,
                    extra={"embedding": embedding} if embedding is not None else {},
                )
            )
        if scored:
            names = {name for c in scored for name in c.scores}
            combined = combine(
                {n: [c.scores.get(n, 0.0) for c in scored] for n in names}, scoring.weights
            )
            for candidate, value in zip(scored, combined, strict=True):
                candidate.scores["combined"] = float(value)
        spec = ctx.config.selection.selector
        picks = SELECTORS.build(spec.name, spec.params).select(scored, ctx.per_system)
        by_id = {c.id: c for c in scored}
        ctx.store.structures.record_selection(
            ctx.run_id,
            {p.id: Selection(rank=p.rank, reason=p.reason, scores=by_id[p.id].scores)
             for p in picks},
        )  # fmt: skip
        selected = [{"id": p.id, "rank": p.rank, "reason": p.reason} for p in picks]
        ctx.record(
            "select",
            {
                "selector": spec.model_dump(),
                "per_system": ctx.per_system,
                "weights": scoring.weights,
                "softening_estimates": estimates,
                "candidates": len(scored),
                "selected": selected,
            },
        )
        return {"selected": [p.id for p in picks]}
