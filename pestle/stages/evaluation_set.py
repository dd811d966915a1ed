"""The evaluation-set stage: per chemical system, structures drawn at random from all its valid
candidates, stratified by sampler and amplitude, labelled once, reused by every model version
and never trained on.

The labels pestle trains on are picked by score (mostly the largest displacements); judging a
model on held-out picks measures the regime pestle chose, not the model. The evaluation set
represents the distribution the samplers make instead. Its structures are marked in the store
(``evaluation_for``: the campaigns whose set they belong to) and their labels carry the role
``evaluation``, so no selection picks them and no split trains on them. A set, once drawn, is
kept: later runs and daemon rounds only top it up when the configured size grows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pestle.stages.context import stable_seed
from pestle.store.documents import StructureDoc

if TYPE_CHECKING:
    from pestle.stages.context import RunContext

# Distinct amplitudes up to which each value is its own stratum; more (strain magnitudes,
# MD temperatures of many runs) are cut into this many quantile bins.
MAX_AMPLITUDE_STRATA = 6


def amplitude(provenance_params: Mapping[str, Any]) -> float | None:
    """How far a sampler took a structure from its seed, in the sampler's own terms: a
    displacement amplitude (rattle, phonon), a strain magnitude (strain), a temperature
    (md); None when the sampler records none."""
    for key in ("amplitude", "temperature_K", "temperature"):
        value = provenance_params.get(key)
        if isinstance(value, int | float):
            return float(value)
    strain = provenance_params.get("strain")
    if strain is not None:
        return float(np.abs(np.asarray(strain, dtype=float)).max())
    return None


def stratum_key(sampler: str | None, params: Mapping[str, Any]) -> str:
    """A structure's group for softening estimates: its sampler and amplitude (two
    significant digits), or its sampler alone when the sampler records no amplitude."""
    value = amplitude(params)
    name = sampler or "seed"
    return name if value is None else f"{name}@{value:.2g}"


def strata(docs: Sequence[StructureDoc]) -> dict[str, list[StructureDoc]]:
    """Candidates of one system grouped by sampler and amplitude."""
    by_sampler: dict[str, list[StructureDoc]] = defaultdict(list)
    for doc in docs:
        by_sampler[doc.provenance.sampler or doc.kind].append(doc)
    out: dict[str, list[StructureDoc]] = {}
    for sampler, members in sorted(by_sampler.items()):
        values = [amplitude(d.provenance.params) for d in members]
        if any(v is None for v in values):
            out[sampler] = members
            continue
        distinct = sorted(set(values))
        if len(distinct) <= MAX_AMPLITUDE_STRATA:
            labels = [f"{sampler}@{v:g}" for v in values]
        else:
            edges = np.quantile(values, np.linspace(0, 1, MAX_AMPLITUDE_STRATA + 1)[1:-1])
            bins = np.searchsorted(edges, values, side="right")
            labels = [f"{sampler}#q{b}" for b in bins]
        for label, doc in zip(labels, members, strict=True):
            out.setdefault(label, []).append(doc)
    return out


def allocate(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Proportional allocation of ``total`` draws over strata (largest remainder), never more
    than a stratum holds."""
    available = sum(sizes.values())
    total = min(total, available)
    if total <= 0:
        return dict.fromkeys(sizes, 0)
    shares = {k: total * n / available for k, n in sizes.items()}
    counts = {k: min(sizes[k], math.floor(v)) for k, v in shares.items()}
    remainders = sorted(sizes, key=lambda k: (-(shares[k] - math.floor(shares[k])), k))
    while sum(counts.values()) < total:
        for key in remainders:
            if sum(counts.values()) >= total:
                break
            if counts[key] < sizes[key]:
                counts[key] += 1
    return counts


def draw(docs: Sequence[StructureDoc], size: int, seed: int) -> list[str]:
    """``size`` structure ids drawn at random without replacement, stratified by sampler and
    amplitude; the same candidates and seed always give the same draw."""
    groups = strata(docs)
    counts = allocate({k: len(v) for k, v in groups.items()}, size)
    chosen: list[str] = []
    for key, members in sorted(groups.items()):
        order = sorted(members, key=lambda d: stable_seed(seed, "evaluation", d.id))
        chosen += [d.id for d in order[: counts[key]]]
    return sorted(chosen)


class EvaluationSetStage:
    name = "evaluation_set"
    requires = ("sampled",)
    provides = ("evaluation_set",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        spec = ctx.config.evaluation.evaluation_set
        campaign = ctx.config.name
        fields = ["chemical_system", "provenance.sampler", "provenance.params", "kind",
                  "evaluation_for"]  # fmt: skip
        systems = ctx.store.structures.run_systems(ctx.run_id)
        if ctx.round is not None and ctx.round.systems is not None:
            systems = [s for s in systems if s in ctx.round.systems]
        members = ctx.store.structures.evaluation_set(campaign, systems)
        drawn: dict[str, list[str]] = {}
        kinds: dict[str, list[str]] = {}
        for system in systems:  # one system's candidates in memory at a time
            docs = list(ctx.store.structures.run_candidates(ctx.run_id, fields, system=system))
            trained = ctx.store.labels.structures_with_roles(
                [d.id for d in docs], exclude=("evaluation",)
            )
            have = members.get(system, [])
            pool = [d for d in docs if d.id not in have and d.id not in trained]
            # Never so many that selection is left with fewer candidates than its budget.
            missing = min(spec.per_system - len(have), len(pool) - ctx.per_system)
            new = draw(pool, missing, stable_seed(ctx.config.seed, system)) if missing > 0 else []
            ctx.store.structures.add_to_evaluation_set(campaign, new)
            drawn[system] = sorted(have + new)
            chosen = set(drawn[system])
            kinds[system] = sorted(strata([d for d in docs if d.id in chosen]))
        ctx.record(
            "evaluation_set",
            {"per_system": spec.per_system, "members": drawn, "strata": kinds},
        )
        return {"evaluation_set": drawn}


def stopping_split(
    members: Mapping[str, Sequence[str]], fraction: float, seed: int
) -> dict[str, list[str]]:
    """Per chemical system, the part of its evaluation set a fine-tune may choose its epoch
    on: ``round(fraction * n)`` of its ``n`` members (never all), drawn by a stable hash of
    campaign seed and id, so the same members always give the same part. Figures that judge
    a model leave these out (a model tuned on them would look better there than it is)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the stopping fraction must be in [0, 1), got {fraction}")
    out: dict[str, list[str]] = {}
    for system, ids in sorted(members.items()):
        count = min(round(fraction * len(ids)), max(len(ids) - 1, 0))
        order = sorted(ids, key=lambda i: stable_seed(seed, "stopping", i))
        out[system] = sorted(order[:count])
    return out
