"""Scores and diverse selection: softening fits from labels, committee disagreement between
two real pretrained CHGNet versions, rank-normalised combination, FPS and DIRECT picks."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from pestle.potentials import POTENTIALS
from pestle.scoring import (
    SofteningModel,
    combine,
    committee_disagreement,
    expected_softening_error,
    rank_normalise,
)
from pestle.selectors import SELECTORS, ScoredCandidate


def synthetic_labels(scale: float, count: int, sampler: str, seed: int = 0, noise: float = 0.0):
    """Cu structures whose 'reference' forces are EMT's divided by ``scale`` (plus Gaussian
    noise of ``noise`` eV/A): a model (EMT) softened by that factor."""
    out = []
    rng = np.random.default_rng(seed)
    for i in range(count):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.rattle(0.1, seed=seed + i)
        reference = atoms.copy()
        reference.calc = EMT()
        forces = reference.get_forces() / scale
        forces = forces + rng.normal(scale=noise, size=forces.shape)
        atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=forces)
        out.append((atoms, "Cu", sampler))
    return out


def test_softening_fit_recovers_a_known_slope() -> None:
    emt = POTENTIALS.build("emt")
    # Noisy labels: the interval has a width and must still cover the true scale.
    labelled = synthetic_labels(0.8, 4, "rattle", noise=0.03) + synthetic_labels(
        0.6, 4, "md", seed=10
    )
    model = SofteningModel.fit(emt, labelled, prior=0.9, min_components=30)
    rattle = model.estimate("Cu", "rattle")
    assert rattle.source == "system+rattle" and rattle.slope == pytest.approx(0.8, abs=0.02)
    assert rattle.ci_low < 0.8 < rattle.ci_high and rattle.n_components == 48
    assert 0.005 < rattle.ci_high - rattle.ci_low < 0.1
    assert model.estimate("Cu", "md").slope == pytest.approx(0.6)
    # A sampler with no labels yet falls back to the system's pooled fit, a system to the prior.
    pooled = model.estimate("Cu", "surface")
    assert pooled.source == "system" and 0.6 < pooled.slope < 0.8
    assert model.estimate("Si", "rattle").source == "prior"
    assert model.estimate("Si", "rattle").slope == 0.9
    forces = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    assert expected_softening_error(forces, 0.8) == pytest.approx(0.25 * 5.0)


def test_softening_by_the_finest_group_with_data() -> None:
    """A model soft at large rattles and stiff at small ones in the same system: each
    amplitude gets its own scale; an amplitude without labels uses its sampler's."""
    emt = POTENTIALS.build("emt")
    large = [(a, s, ("rattle@0.2", "rattle")) for a, s, _ in synthetic_labels(0.7, 4, "rattle")]
    small = [(a, s, ("rattle@0.05", "rattle"))
             for a, s, _ in synthetic_labels(1.3, 4, "rattle", seed=5)]  # fmt: skip
    model = SofteningModel.fit(emt, large + small, prior=0.9, min_components=30)
    assert model.estimate("Cu", ("rattle@0.2", "rattle")).slope == pytest.approx(0.7)
    assert model.estimate("Cu", ("rattle@0.05", "rattle")).slope == pytest.approx(1.3)
    unseen = model.estimate("Cu", ("rattle@0.1", "rattle"))
    assert unseen.source == "system+rattle" and 0.7 < unseen.slope < 1.3


def test_committee_of_two_chgnet_versions_flags_disagreement() -> None:
    new, old = (
        POTENTIALS.build("chgnet", {"model": "0.3.0"}),
        POTENTIALS.build("chgnet", {"model": "0.2.0"}),
    )
    structures = []
    for amplitude, seed in ((0.01, 1), (0.01, 2), (0.3, 3), (0.3, 4)):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(amplitude, seed=seed)
        structures.append(atoms)
    scores = committee_disagreement(structures, [new.predict(structures), old.predict(structures)])
    near, far = scores[:2], scores[2:]
    assert min(s["committee_force"] for s in far) > 3 * max(s["committee_force"] for s in near)
    same = committee_disagreement(structures, [new.predict(structures)] * 2)
    assert all(s["committee_force"] == 0 and s["committee_energy"] < 1e-9 for s in same)
    with pytest.raises(ValueError, match="at least two"):
        committee_disagreement(structures, [new.predict(structures)])


def test_rank_normalised_combination() -> None:
    np.testing.assert_allclose(rank_normalise([10.0, 1000.0, 20.0]), [0.0, 1.0, 0.5])
    combined = combine({"a": [1, 2, 3], "b": [30, 20, 10]}, {"a": 3, "b": 1})
    np.testing.assert_allclose(combined, [0.25, 0.5, 0.75])
    with pytest.raises(KeyError, match="uncertainty"):
        combine({"a": [1]}, {"uncertainty": 1})


def clustered_candidates(seed: int = 0) -> list[ScoredCandidate]:
    """Three tight clusters of 10 points in a 5-d descriptor space."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0, 0, 0], [10, 0, 0, 0, 0], [0, 10, 0, 0, 0]], dtype=float)
    out = []
    for c, centre in enumerate(centres):
        for i in range(10):
            out.append(
                ScoredCandidate(
                    id=f"c{c}-{i}",
                    chemical_system="Si",
                    sampler="rattle",
                    scores={"max_force": float(rng.uniform())},
                    extra={"embedding": centre + rng.normal(0, 0.1, 5)},
                )
            )
    return out


@pytest.mark.parametrize("name", ["fps", "direct"])
def test_diverse_selection_covers_every_cluster(name: str) -> None:
    candidates = clustered_candidates()
    selector = SELECTORS.build(name, {"score": "max_force"})
    picks = selector.select(candidates, 3)
    assert len(picks) == 3 and {p.id.split("-")[0] for p in picks} == {"c0", "c1", "c2"}
    # Top-k by score alone would not spread like this, and the order of input is irrelevant.
    shuffled = list(reversed(candidates))
    assert selector.select(shuffled, 3) == picks
    if name == "direct":  # the best of each cluster
        for p in picks:
            cluster = [c for c in candidates if c.id.split("-")[0] == p.id.split("-")[0]]
            assert p.id == max(cluster, key=lambda c: c.scores["max_force"]).id
    else:  # FPS starts from the best-scoring candidate overall
        assert picks[0].id == max(candidates, key=lambda c: c.scores["max_force"]).id


def test_chgnet_embeddings_tell_structures_apart() -> None:
    chgnet = POTENTIALS.build("chgnet", {"model": "0.3.0"})
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    rattled = si.copy()
    rattled.rattle(0.2, seed=1)
    lif = bulk("LiF", "rocksalt", a=4.03, cubic=True)
    e_si, e_rattled, e_lif = chgnet.embed([si, rattled, lif])
    assert e_si.shape == (64,)
    assert np.linalg.norm(e_si - e_lif) > np.linalg.norm(e_si - e_rattled) > 0
