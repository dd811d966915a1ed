"""Top-k per chemical system by one score, with a floor per sampler so one kind of
structure cannot take the whole budget."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from pestle.selectors import SELECTORS, ScoredCandidate, Selection, group_by_system


@SELECTORS.register("topk")
class TopKSelector:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        score: str = Field(default="max_force", description="score key to rank by, highest first")
        min_per_sampler: int = Field(
            default=0, ge=0, description="picks reserved for each sampler before ranking the rest"
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def select(
        self, candidates: Sequence[ScoredCandidate], per_system_budget: int
    ) -> list[Selection]:
        key = self.params.score
        picks: list[Selection] = []
        for system, group in group_by_system(candidates, key, "topk").items():
            # Ties broken by id so the choice never depends on input order.
            ranked = sorted(group, key=lambda c: (-c.scores[key], c.id))
            chosen: list[tuple[ScoredCandidate, str]] = []
            taken: set[str] = set()
            if self.params.min_per_sampler:
                for sampler in sorted({c.sampler for c in ranked}):
                    best = [c for c in ranked if c.sampler == sampler][
                        : self.params.min_per_sampler
                    ]
                    for position, c in enumerate(best):
                        if len(chosen) < per_system_budget:
                            chosen.append(
                                (
                                    c,
                                    f"reserved for sampler {sampler}: #{position + 1} by {key}={c.scores[key]:.3f}",
                                )
                            )
                            taken.add(c.id)
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
