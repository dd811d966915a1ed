"""The select stage: the candidates worth a reference label, per chemical system, by the
configured selector over the stored scores (and the expected softening error, fitted on the
labels already stored). The selection and each pick's reason are stored; a resumed pass
reuses its selection instead of choosing a fresh batch beside it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pestle.plugins import PluginSpec
from pestle.selectors import EMBEDDING, SELECTORS, VOLUMETRIC_STRAIN, ScoredCandidate
from pestle.stages.evaluation_set import stratum_key
from pestle.store.documents import Selection, StructureDoc

if TYPE_CHECKING:
    from pestle.config import CampaignConfig
    from pestle.scoring import SofteningModel
    from pestle.stages.context import RunContext

LINEAR_MODES = ("linear_correction",)


def effective_selector(config: CampaignConfig, per_system: int) -> tuple[PluginSpec, str | None]:
    """The selector as it will rank, and why when that is not as configured: a linear
    correction or a budget of ``selection.rank_by_softening_up_to`` labels per system or
    fewer ranks by the expected softening error unless the selector's score is set. The
    largest force is a poor guide for a few labels: a structure with large forces that the
    model barely softens teaches a correction the wrong way."""
    spec = config.selection.selector
    params_model = getattr(SELECTORS.get(spec.name), "Params", None)
    ranks_by_score = params_model is not None and "score" in params_model.model_fields
    if not ranks_by_score or "score" in spec.params:
        return spec, None
    mode = config.finetune.trainer.params.get("mode") if config.finetune.enabled else None
    if mode in LINEAR_MODES:
        why = f"finetune.trainer.params.mode is {mode}"
    elif per_system <= config.selection.rank_by_softening_up_to:
        why = (f"{per_system} label(s) per system, at most "
               f"selection.rank_by_softening_up_to = {config.selection.rank_by_softening_up_to}")  # fmt: skip
    else:
        return spec, None
    params = {**spec.params, "score": "expected_softening_error"}
    return PluginSpec(name=spec.name, params=params), f"ranked by expected softening error: {why}"


def softening_model(ctx: RunContext, systems: Iterable[str]) -> SofteningModel:
    """Softening scales of the scoring potential fitted on the labels already stored for
    these systems at the campaign's level of theory (the prior where there are too few)."""
    from pestle.scoring import SofteningModel

    scoring = ctx.config.scoring
    where = ctx.labels_filter(systems)
    if ctx.round is None:
        # A run fits on its evaluation set alone when it has one: labelled before selection,
        # the same for every run of the campaign, so a run that differs only downstream (a
        # fine-tuning recipe) picks the same structures and needs no new labels.
        evaluation = {"$and": [where, {"role": "evaluation"}]}
        if ctx.store.labels.count(evaluation):
            where = evaluation
    labelled = [
        (stored.atoms, stored.chemical_system, groups_of(stored.structure))
        for stored in ctx.store.labels.labelled(where)
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
        previous = ctx.recorded("select")
        if previous and previous.get("selected"):
            return {"selected": [s["id"] for s in previous["selected"]]}
        key = ctx.model_key
        scoring = ctx.config.scoring
        table = ScoreTable.read(ctx, key)
        spec, ranking_note = effective_selector(ctx.config, ctx.per_system)
        estimates: dict[str, dict] = {}
        if ("expected_softening_error" in scoring.weights
                or spec.params.get("score") == "expected_softening_error"):  # fmt: skip
            estimates = table.add_softening(softening_model(ctx, table.systems_present()))
        table.combine(scoring.weights)
        selector = SELECTORS.build(spec.name, spec.params)
        picks: list[Any] = []
        scores_of: dict[str, dict[str, float]] = {}
        # Selectors choose within each chemical system: one system's candidates at a time.
        for candidates in table.by_system(ctx, key, scoring.embeddings):
            chosen = selector.select(candidates, ctx.per_system)
            by_id = {c.id: c for c in candidates}
            scores_of.update({p.id: by_id[p.id].scores for p in chosen})
            picks += chosen
        ctx.store.structures.record_selection(
            ctx.run_id,
            {p.id: Selection(rank=p.rank, reason=p.reason, scores=scores_of[p.id])
             for p in picks},
        )  # fmt: skip
        selected = [{"id": p.id, "rank": p.rank, "reason": p.reason} for p in picks]
        ctx.record(
            "select",
            {
                "selector": spec.model_dump(),
                "ranking_note": ranking_note,
                "per_system": ctx.per_system,
                "weights": scoring.weights,
                "softening_estimates": estimates,
                "candidates": len(table.ids),
                "selected": selected,
            },
        )
        return {"selected": [p.id for p in picks]}


class ScoreTable:
    """The scores of a run's selectable candidates as arrays (one row per candidate), read
    one chemical system at a time: what the rank-normalised combination over the whole run
    needs, without a document per candidate in memory."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.system: list[int] = []  # index into systems
        self.groups: list[int] = []  # index into group_names (sampler@amplitude, sampler)
        self.samplers: list[str | None] = []
        # The volumetric strain a sampler recorded (strain), for selectors that bracket the
        # seed's volume; None for candidates without one.
        self.volumetric_strains: list[float | None] = []
        self.systems: list[str] = []
        self.group_names: list[tuple[str, str]] = []
        self.columns: dict[str, list[float]] = {}
        self.arrays: dict[str, np.ndarray] = {}

    @classmethod
    def read(cls, ctx: RunContext, key: str) -> ScoreTable:
        table = cls()
        fields = ["chemical_system", "provenance.sampler", "provenance.params",
                  f"scores.{key}", "evaluation_for"]  # fmt: skip
        group_index: dict[tuple[str, str], int] = {}
        for system in ctx.store.structures.run_systems(ctx.run_id):
            # An evaluation-set structure (of any campaign) is never picked for training.
            docs = [d for d in ctx.store.structures.run_candidates(ctx.run_id, fields,
                                                                   system=system)
                    if not d.evaluation_for]  # fmt: skip
            if ctx.round is not None:  # a round never re-picks what earlier rounds labelled
                already = taken(ctx, {d.id: d.chemical_system for d in docs})
                docs = [d for d in docs if d.id not in already]
            if not docs:
                continue
            table.systems.append(system)
            for d in sorted(docs, key=lambda d: d.id):
                row = len(table.ids)
                table.ids.append(d.id)
                table.system.append(len(table.systems) - 1)
                groups = groups_of(d)
                table.groups.append(group_index.setdefault(groups, len(group_index)))
                table.samplers.append(d.provenance.sampler)
                strain = (d.provenance.params or {}).get(VOLUMETRIC_STRAIN)
                table.volumetric_strains.append(None if strain is None else float(strain))
                for name, value in d.scores[key].items():
                    table.columns.setdefault(name, [np.nan] * row).append(float(value))
                for column in table.columns.values():
                    if len(column) == row:
                        column.append(np.nan)
        table.group_names = list(group_index)
        table.arrays = {n: np.asarray(v, dtype=float) for n, v in table.columns.items()}
        table.columns = {}
        return table

    def systems_present(self) -> set[str]:
        return set(self.systems)

    def add_softening(self, softening: SofteningModel) -> dict[str, dict]:
        """The expected softening error of every candidate (from its predicted largest
        force and its system's and group's softening scale); the estimates used."""
        from pestle.scoring import softening_error

        estimates: dict[str, dict] = {}
        slopes: dict[tuple[int, int], float] = {}
        values = np.empty(len(self.ids))
        max_force = self.arrays["max_force"]
        for row, (system, group) in enumerate(zip(self.system, self.groups, strict=True)):
            slope = slopes.get((system, group))
            if slope is None:
                name, groups = self.systems[system], self.group_names[group]
                estimate = softening.estimate(name, groups)
                # max_force is the largest per-atom force norm, so this is the largest error.
                slope = slopes[(system, group)] = estimate.slope
                estimates[f"{name}/{groups[0]}"] = estimate.as_dict()
            values[row] = softening_error(max_force[row], slope)
        self.arrays["expected_softening_error"] = values
        return estimates

    def combine(self, weights: dict[str, float]) -> None:
        from pestle.scoring import combine

        if not self.ids:
            return
        self.arrays["combined"] = np.asarray(
            combine({n: np.nan_to_num(v, nan=0.0) for n, v in self.arrays.items()}, weights),
            dtype=float,
        )

    def by_system(
        self, ctx: RunContext, key: str, embeddings: bool
    ) -> Iterator[list[ScoredCandidate]]:
        """Each system's candidates as the selectors take them (with their descriptors when
        the run stored some)."""
        rows_of: dict[int, list[int]] = {}
        for row, system in enumerate(self.system):
            rows_of.setdefault(system, []).append(row)
        names = list(self.arrays)
        for index, system in enumerate(self.systems):
            vectors = {}
            if embeddings:
                vectors = {d.id: d.embeddings[key] for d in ctx.store.structures.run_candidates(
                    ctx.run_id, [f"embeddings.{key}"], system=system) if key in d.embeddings}  # fmt: skip
            candidates = []
            for row in rows_of.get(index, []):
                sid = self.ids[row]
                scores = {n: float(self.arrays[n][row]) for n in names
                          if not np.isnan(self.arrays[n][row])}  # fmt: skip
                extra: dict[str, Any] = {}
                if (vector := vectors.get(sid)) is not None:
                    extra[EMBEDDING] = vector
                if (strain := self.volumetric_strains[row]) is not None:
                    extra[VOLUMETRIC_STRAIN] = strain
                candidates.append(ScoredCandidate(
                    id=sid, chemical_system=system, sampler=self.samplers[row],
                    scores=scores, extra=extra,
                ))  # fmt: skip
            yield candidates
