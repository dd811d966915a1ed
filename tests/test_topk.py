"""Top-k selection: per-system budgets, per-sampler floors, determinism."""

from __future__ import annotations

import random

import pytest

from pestle.selectors import SELECTORS, ScoredCandidate


def candidates() -> list[ScoredCandidate]:
    out = []
    for system in ("Si", "F-Li"):
        for i in range(8):
            out.append(
                ScoredCandidate(
                    f"{system}-r{i}",
                    system,
                    "rattle",
                    {"max_force": 1.0 + i, "mean_force": 8.0 - i},
                )
            )
        for i in range(3):
            out.append(
                ScoredCandidate(
                    f"{system}-s{i}", system, "strain", {"max_force": 0.1 * i, "mean_force": 0.5}
                )
            )
    return out


def test_top_k_per_system_by_score() -> None:
    picks = SELECTORS.build("topk", {"score": "max_force"}).select(candidates(), 3)
    by_system = {}
    for p in picks:
        by_system.setdefault(p.id.split("-")[0] if p.id.startswith("Si") else "F-Li", []).append(p)
    assert [p.id for p in by_system["Si"]] == ["Si-r7", "Si-r6", "Si-r5"]
    assert [p.rank for p in by_system["Si"]] == [0, 1, 2]
    assert len(picks) == 6 and "max_force=8.000" in by_system["Si"][0].reason


def test_min_per_sampler_reserves_places() -> None:
    picks = SELECTORS.build("topk", {"score": "max_force", "min_per_sampler": 1}).select(
        candidates(), 3
    )
    si = [p for p in picks if p.id.startswith("Si")]
    assert {p.id for p in si} == {"Si-r7", "Si-r6", "Si-s2"}
    assert "reserved for sampler strain" in next(p.reason for p in si if p.id == "Si-s2")
    assert si[-1].id == "Si-s2"  # ranks still follow the score


def test_order_independent_and_budget_larger_than_pool() -> None:
    selector = SELECTORS.build("topk", {"score": "mean_force"})
    shuffled = candidates()
    random.Random(4).shuffle(shuffled)
    assert selector.select(shuffled, 5) == selector.select(candidates(), 5)
    assert len(selector.select(candidates(), 100)) == 22


def test_unknown_score_names_the_key() -> None:
    with pytest.raises(KeyError, match="no score 'uncertainty'"):
        SELECTORS.build("topk", {"score": "uncertainty"}).select(candidates(), 2)
