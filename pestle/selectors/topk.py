"""Top-k per chemical system by one score, with a floor per sampler so one kind of
structure cannot take the whole budget, and optionally strained picks on both sides of the
seed's volume."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from pestle.selectors import (
    SELECTORS,
    VOLUMETRIC_STRAIN,
    ScoredCandidate,
    Selection,
    group_by_system,
)


def volume_bracket(
    candidates: Sequence[ScoredCandidate],
) -> list[tuple[ScoredCandidate, str]]:
    """The most compressed and the most expanded of ``candidates`` (those that record a
    volumetric strain), with why; empty unless both sides are present. A label's pressure
    error against the model grows with its volumetric strain (the bulk modulus error times
    the strain), and a modulus needs pressures on both sides of the reference volume: picks
    on one side alone let a fit shift the pressure instead of changing its slope."""
    strained = [c for c in candidates if VOLUMETRIC_STRAIN in c.extra]
    compressed = [c for c in strained if c.extra[VOLUMETRIC_STRAIN] < 0]
    expanded = [c for c in strained if c.extra[VOLUMETRIC_STRAIN] > 0]
    if not compressed or not expanded:
        return []
    most_compressed = min(compressed, key=lambda c: (c.extra[VOLUMETRIC_STRAIN], c.id))
    most_expanded = max(expanded, key=lambda c: (c.extra[VOLUMETRIC_STRAIN], c.id))
    return [
        (c, f"volume bracket: the most {side} ({c.extra[VOLUMETRIC_STRAIN]:+.3f} dV/V)")
        for c, side in ((most_compressed, "compressed"), (most_expanded, "expanded"))
    ]


@SELECTORS.register("topk")
class TopKSelector:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        score: str = Field(default="max_force", description="score key to rank by, highest first")
        min_per_sampler: int = Field(
            default=0, ge=0, description="picks reserved for each sampler before ranking the rest"
        )
        bracket_volume: bool = Field(
            default=False,
            description="of a sampler's reserved picks (min_per_sampler 2 or more), the first "
            "two go to its most compressed and most expanded candidates (by the volumetric "
            "strain the sampler records), so the labels' pressures bracket the seed's volume "
            "and carry its bulk modulus; the rest are ranked by score",
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def _reserved(
        self, ranked: list[ScoredCandidate], key: str
    ) -> list[tuple[ScoredCandidate, str]]:
        """Each sampler's reserved picks, with why."""
        reserved: list[tuple[ScoredCandidate, str]] = []
        quota = self.params.min_per_sampler
        for sampler in sorted({c.sampler for c in ranked}):
            own = [c for c in ranked if c.sampler == sampler]
            chosen = volume_bracket(own) if self.params.bracket_volume and quota >= 2 else []
            ids = {c.id for c, _ in chosen}
            rest = [c for c in own if c.id not in ids][: quota - len(chosen)]
            chosen += [
                (c, f"reserved for sampler {sampler}: #{own.index(c) + 1} by {key}="
                    f"{c.scores[key]:.3f}")
                for c in rest
            ]  # fmt: skip
            reserved += chosen
        return reserved

    def select(
        self, candidates: Sequence[ScoredCandidate], per_system_budget: int
    ) -> list[Selection]:
        key = self.params.score
        picks: list[Selection] = []
        for system, group in group_by_system(candidates, key, "topk").items():
            # Ties broken by id so the choice never depends on input order.
            ranked = sorted(group, key=lambda c: (-c.scores[key], c.id))
            chosen = self._reserved(ranked, key)[:per_system_budget]
            taken = {c.id for c, _ in chosen}
            for position, c in enumerate(ranked):
                if len(chosen) >= per_system_budget:
                    break
                if c.id not in taken:
                    chosen.append(
                        (
                            c,
                            f"#{position + 1} of {len(ranked)} in {system} by {key}={c.scores[key]:.3f}",
                        )
                    )
                    taken.add(c.id)
            chosen.sort(key=lambda pair: (-pair[0].scores[key], pair[0].id))
            picks.extend(
                Selection(id=c.id, rank=r, reason=why) for r, (c, why) in enumerate(chosen)
            )
        return picks
