"""The sample stage: every configured sampler on every seed, validity-checked candidates
stored with their provenance (deduplicated by fingerprint)."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from pestle.plugins import PluginSpec
from pestle.samplers import SAMPLERS, Seed
from pestle.samplers.validity import check_within_limits
from pestle.stages.context import stable_seed
from pestle.store import NewStructure

if TYPE_CHECKING:
    from pestle.stages.context import RunContext

log = logging.getLogger("pestle.stages")


def sampler_stream(
    campaign_seed: int, round_index: int | None, index: int, sampler: str, seed_id: str
) -> int:
    """The random stream of sampler ``index`` on one seed: each daemon round samples
    afresh; a one-shot run's streams are those of its config (``pestle run --dry-run``
    draws the same ones)."""
    parts = () if round_index is None else (round_index,)
    return stable_seed(campaign_seed, *parts, index, sampler, seed_id)


class SampleStage:
    name = "sample"
    requires = ("seeds",)
    provides = ("sampled",)

    def __init__(self, samplers: list[PluginSpec] | None = None) -> None:
        """``samplers``: the specs to run instead of the config's (the daemon passes them
        with the promoted model driving the dynamics)."""
        self.samplers = samplers

    def run(self, ctx: RunContext) -> dict[str, Any]:
        seeds: list[Seed] = ctx.outputs["seeds"]
        specs = self.samplers if self.samplers is not None else ctx.config.samplers
        counts: dict[str, int] = defaultdict(int)
        rejected: dict[str, list[str]] = defaultdict(list)
        limits = ctx.config.limits
        for index, spec in enumerate(specs):
            sampler = SAMPLERS.build(spec.name, spec.params)
            for seed in seeds:
                round_index = None if ctx.round is None else ctx.round.index
                rng_seed = sampler_stream(ctx.config.seed, round_index, index, spec.name, seed.id)
                batch = []
                for candidate in sampler.sample(seed, rng_seed):
                    reason = check_within_limits(candidate.atoms, limits)
                    if reason is not None:
                        rejected[spec.name].append(reason)
                        counts["rejected"] += 1
                        continue
                    provenance = {
                        "sampler": candidate.sampler,
                        "params": candidate.params,
                        "parent_id": candidate.parent_id,
                        "parent_name": seed.name,
                        "rng_seed": candidate.rng_seed,
                        "campaign": ctx.config.name,
                        "run_id": ctx.run_id,
                    }
                    batch.append(NewStructure(candidate.atoms, "candidate", provenance))
                for _, new in ctx.store.structures.add_many(batch, run_id=ctx.run_id):
                    counts["new" if new else "already_stored"] += 1
                    counts[f"sampler:{spec.name}"] += 1
            ctx.progress("sample", index + 1, len(specs))
        for name, reasons in rejected.items():
            log.warning("%s: %d candidates refused by the validity check, e.g. %s", name,
                        len(reasons), reasons[0])  # fmt: skip
        outcome = {"counts": dict(counts), "rejected": {k: v[:20] for k, v in rejected.items()}}
        ctx.record("sample", outcome)
        return {"sampled": outcome}
