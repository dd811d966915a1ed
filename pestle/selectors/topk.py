"""Top-k per chemical system by one score, with a floor per sampler so one kind of
structure cannot take the whole budget."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from pestle.selectors import SELECTORS, ScoredCandidate, Selection


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
        missing = [c.id for c in candidates if key not in c.scores]
        if missing:
            raise KeyError(
                f"selector topk: {len(missing)} candidates have no score {key!r} "
                f"(e.g. {missing[0]}); available: {sorted(candidates[0].scores) if candidates else []}"
            )
        by_system: dict[str, list[ScoredCandidate]] = defaultdict(list)
        for c in candidates:
            by_system[c.chemical_system].append(c)
        picks: list[Selection] = []
        for system in sorted(by_system):
            # Ties broken by id so the choice never depends on input order.
            ranked = sorted(by_system[system], key=lambda c: (-c.scores[key], c.id))
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
