"""Top-k selection: per-system budgets, per-sampler floors, determinism."""

from __future__ import annotations

import random

import numpy as np
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


def test_a_small_budget_ranks_by_expected_softening_not_force() -> None:
    """The reproduction benchmark's failure: the Si structure with the largest force was
    one CHGNet barely softens, and a one-structure correction learnt from it went the wrong
    way. With one label per system (or a linear correction) the pick is the structure whose
    group the fitted scales say is most wrong."""
    from pestle.config import CampaignConfig
    from pestle.scoring import SofteningEstimate, SofteningModel
    from pestle.stages.select import ScoreTable, effective_selector

    def config(**changes) -> CampaignConfig:
        data = {"name": "budget", "seeds": [{"bulk": "Si"}], "samplers": [{"name": "rattle"}],
                "selection": {"per_system": 6}, **changes}  # fmt: skip
        return CampaignConfig.model_validate(data)

    table = ScoreTable()
    table.systems = ["Si"]
    table.group_names = [("strain@0.06", "strain"), ("rattle@0.1", "rattle")]
    rows = [("strain-big", 0, 3.0), ("strain-small", 0, 1.0), ("rattle-a", 1, 2.0),
            ("rattle-b", 1, 1.5)]  # fmt: skip
    table.ids = [r[0] for r in rows]
    table.system = [0] * len(rows)
    table.groups = [r[1] for r in rows]
    table.samplers = ["strain", "strain", "rattle", "rattle"]
    table.arrays = {"max_force": np.array([r[2] for r in rows])}
    fits = {("Si", "strain@0.06"): SofteningEstimate(0.99, 0.97, 1.01, 300, "system+strain@0.06"),
            ("Si", "rattle@0.1"): SofteningEstimate(0.70, 0.65, 0.75, 300, "system+rattle@0.1")}  # fmt: skip
    table.add_softening(SofteningModel(fits))

    def pick(spec) -> str:
        candidates = [ScoredCandidate(i, "Si", s, {k: float(v[n]) for k, v in table.arrays.items()})
                      for n, (i, s) in enumerate(zip(table.ids, table.samplers, strict=True))]  # fmt: skip
        return SELECTORS.build(spec.name, spec.params).select(candidates, 1)[0].id

    six = config()
    spec, note = effective_selector(six, 6)
    assert note is None and pick(spec) == "strain-big"  # a large budget: by force as configured

    for small, budget in ((config(selection={"per_system": 1}), 1),
                          (config(finetune={"trainer": {"name": "chgnet", "params":
                                             {"mode": "linear_correction"}}}), 6)):  # fmt: skip
        spec, note = effective_selector(small, budget)
        assert spec.params["score"] == "expected_softening_error" and "softening" in note
        assert pick(spec) == "rattle-a"  # 2.0 * (1/0.7 - 1) = 0.86 > 3.0 * (1/0.99 - 1) = 0.03

    chosen = config(
        selection={"per_system": 1, "selector": {"name": "topk", "params": {"score": "max_force"}}}
    )
    spec, note = effective_selector(chosen, 1)
    assert note is None and spec.params["score"] == "max_force"  # the user's choice stands


def strained(system: str = "F-Li") -> list[ScoredCandidate]:
    """Strained cells whose best scores are all compressed (as LiF's were in the five-system
    campaign: both strained picks at V/V0 0.93 and 0.95, and its bulk modulus did not move)."""
    volume = {0: -0.073, 1: 0.020, 2: 0.001, 3: 0.057, 4: 0.041, 5: -0.025, 6: -0.055}
    forces = {0: 0.43, 1: 0.19, 2: 0.24, 3: 0.17, 4: 0.21, 5: 0.32, 6: 0.42}
    out = [
        ScoredCandidate(f"{system}-s{i}", system, "strain", {"max_force": forces[i]},
                        extra={"volumetric_strain": volume[i]})
        for i in volume
    ]  # fmt: skip
    out += [
        ScoredCandidate(f"{system}-r{i}", system, "rattle", {"max_force": 5.0 + i})
        for i in range(6)
    ]
    return out


def test_bracket_volume_reserves_the_most_compressed_and_most_expanded_cell() -> None:
    params = {"score": "max_force", "min_per_sampler": 2}
    plain = SELECTORS.build("topk", params).select(strained(), 5)
    assert {p.id for p in plain if "-s" in p.id} == {"F-Li-s0", "F-Li-s6"}  # both compressed
    picks = SELECTORS.build("topk", {**params, "bracket_volume": True}).select(strained(), 5)
    chosen = {p.id: p.reason for p in picks}
    assert {i for i in chosen if "-s" in i} == {"F-Li-s0", "F-Li-s3"}
    assert "most expanded (+0.057" in chosen["F-Li-s3"]
    assert "most compressed (-0.073" in chosen["F-Li-s0"]
    assert len(picks) == 5 and {"F-Li-r5", "F-Li-r4", "F-Li-r3"} <= set(chosen)
    assert [p.rank for p in picks] == list(range(5))

    # A third reserved pick goes by score; one side alone, or one reserved pick, no bracket.
    three = SELECTORS.build("topk", {**params, "min_per_sampler": 3, "bracket_volume": True})
    assert {p.id for p in three.select(strained(), 6) if "-s" in p.id} == {
        "F-Li-s0", "F-Li-s3", "F-Li-s6"}  # fmt: skip
    compressed_only = [c for c in strained() if c.extra.get("volumetric_strain", -1) < 0]
    bracket = SELECTORS.build("topk", {**params, "bracket_volume": True})
    assert {p.id for p in bracket.select(compressed_only, 4) if "-s" in p.id} == {
        "F-Li-s0", "F-Li-s6"}  # fmt: skip
    one = SELECTORS.build("topk", {**params, "min_per_sampler": 1, "bracket_volume": True})
    assert {p.id for p in one.select(strained(), 5) if "-s" in p.id} == {"F-Li-s0"}


def test_the_score_table_hands_selectors_each_candidates_volumetric_strain() -> None:
    from pestle.stages.select import ScoreTable

    table = ScoreTable()
    table.systems = ["F-Li"]
    table.ids = ["squeezed", "stretched", "rattled"]
    table.system = [0, 0, 0]
    table.groups = [0, 0, 1]
    table.samplers = ["strain", "strain", "rattle"]
    table.volumetric_strains = [-0.07, 0.05, None]
    table.arrays = {"max_force": np.array([0.4, 0.2, 3.0])}
    (candidates,) = table.by_system(None, "key", embeddings=False)  # type: ignore[arg-type]
    assert [c.extra for c in candidates] == [
        {"volumetric_strain": -0.07}, {"volumetric_strain": 0.05}, {}]  # fmt: skip
    picks = SELECTORS.build(
        "topk", {"score": "max_force", "min_per_sampler": 2, "bracket_volume": True}
    ).select(candidates, 3)
    assert sum("volume bracket" in p.reason for p in picks) == 2
