"""compare_models (``pestle evaluate``'s layer over ``evaluate``) against EMT labels, with a
softened EMT whose softening scale is exactly 0.8; the structure bootstrap; reading labelled
extxyz files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from pestle.evaluation.compare import compare_models, read_labelled_extxyz, softening_bootstrap
from pestle.potentials import Prediction
from pestle.potentials.emt import EMTPotential
from pestle.trainers import LabelledStructure

SOFTENING = 0.8


class ScaledEMT:
    """EMT with energy, forces and stress multiplied by ``scale`` (a softened model), plus
    optional per-structure random force noise."""

    def __init__(self, scale: float, noise: float = 0.0, seed: int = 0) -> None:
        self.scale = scale
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def predict(self, structures: Sequence[Atoms], *, stress: bool = True) -> list[Prediction]:
        out = []
        for pred in EMTPotential().predict(structures, stress=stress):
            forces = self.scale * pred.forces
            if self.noise:
                forces = forces + self.rng.normal(0.0, self.noise, forces.shape)
            scaled_stress = None if pred.stress is None else self.scale * pred.stress
            out.append(Prediction(self.scale * pred.energy, forces, scaled_stress))
        return out

    def describe(self) -> dict:
        return {"family": "scaled-emt", "scale": self.scale}


def emt_labelled(atoms: Atoms, tag: str, sampler: str | None) -> LabelledStructure:
    atoms = atoms.copy()
    atoms.calc = EMT()
    atoms.calc = SinglePointCalculator(
        atoms,
        energy=atoms.get_potential_energy(),
        forces=atoms.get_forces(),
        stress=atoms.get_stress(),
    )
    if sampler is not None:
        atoms.info["sampler"] = sampler
    return LabelledStructure(atoms=atoms, structure_id=f"s-{tag}", label_id=f"l-{tag}")


def dataset() -> list[LabelledStructure]:
    out = []
    for element, a in (("Cu", 3.61), ("Al", 4.05)):
        ideal = bulk(element, "fcc", a=a, cubic=True)
        for seed in range(4):
            rattled = ideal.copy()
            rattled.rattle(0.1, seed=seed)
            out.append(emt_labelled(rattled, f"{element}r{seed}", "rattle"))
        strained = ideal.copy()
        strained.set_cell(strained.cell * 1.02, scale_atoms=True)
        strained.rattle(0.05, seed=9)
        out.append(emt_labelled(strained, f"{element}s", "strain"))
    return out


def test_compare_recovers_exact_softening(tmp_path: Path) -> None:
    labelled = dataset()
    result = compare_models(
        {"emt": EMTPotential(), "soft": ScaledEMT(SOFTENING)}, labelled, plot_dir=tmp_path
    )
    assert result["parent"] == "emt" and result["models"] == ["emt", "soft"]
    assert set(result["groups"]) == {"chemical_system", "chemical_system+sampler"}
    assert set(result["groups"]["chemical_system"]) == {"Al", "Cu"}
    assert set(result["groups"]["chemical_system+sampler"]) == {
        "Al/rattle", "Al/strain", "Cu/rattle", "Cu/strain"
    }  # fmt: skip

    parent = result["overall"]["emt"]
    assert parent["force_mae"] == 0 and parent["energy_mae_per_atom"] == 0
    assert parent["stress_mae_gpa"] == 0
    assert parent["softening"]["slope"] == pytest.approx(1.0)

    for values in result["groups"].values():
        for per_model in values.values():
            soft = per_model["soft"]
            assert soft["softening"]["slope"] == pytest.approx(SOFTENING, abs=1e-12)
            if soft["n_structures"] >= 2:  # an interval needs two structures
                assert soft["softening"]["ci_low"] == pytest.approx(SOFTENING, abs=1e-12)
                assert soft["softening_bootstrap"]["low"] == pytest.approx(SOFTENING, abs=1e-12)
                assert soft["softening_bootstrap"]["high"] == pytest.approx(SOFTENING, abs=1e-12)
    cu = result["groups"]["chemical_system"]["Cu"]["soft"]
    assert cu["n_structures"] == 5 and cu["n_force_components"] == 5 * 4 * 3
    cu_forces = np.concatenate(
        [ls.atoms.calc.results["forces"].ravel() for ls in labelled if ls.structure_id[2:4] == "Cu"]
    )
    assert cu["force_mae"] == pytest.approx(0.2 * np.mean(np.abs(cu_forces)))
    assert cu["force_rmse"] >= cu["force_mae"]
    assert cu["stress_mae_gpa"] > 0
    # A 0.8 energy scale is not a constant offset: removing the mean offset leaves an error.
    assert 0 < cu["energy_mae_per_atom_offset_removed"] < cu["energy_mae_per_atom"]

    table = result["table"]
    assert "| all | soft | 10 | 0.800 [0.800, 0.800] |" in table
    assert "| Cu | soft | 5 | 0.800 [0.800, 0.800] |" in table
    assert "-0.200 [-0.200, -0.200]" in table
    # One strained structure per system: too few for any figure.
    assert "| Cu, sampler strain | emt | 1 | not enough structures (n = 1) |" in table
    main = table.split("\n\n")[0]
    rows = [line for line in main.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1  # well-formed columns
    assert len(rows) == 2 + 2 * (1 + 2 + 4)
    assert "Softening scale by reference force" in table

    # Per system: force, energy and stress parity, force error, softening by force bin;
    # and the softening summaries per system and per system and sampler.
    assert len(result["plots"]) == 2 * 5 + 2
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in result["plots"])


def test_sampler_mapping_overrides_info() -> None:
    labelled = dataset()
    mapping = {ls.structure_id: "md" for ls in labelled[:3]}
    result = compare_models(
        {"emt": EMTPotential()}, labelled, groups=("sampler",), samplers=mapping, n_bootstrap=50
    )
    assert set(result["groups"]) == {"sampler"}
    sampler = result["groups"]["sampler"]
    assert sampler["md"]["emt"]["n_structures"] == 3
    assert sampler["rattle"]["emt"]["n_structures"] == 5
    del labelled[0].atoms.info["sampler"]
    result = compare_models({"emt": EMTPotential()}, labelled, groups=("sampler",), n_bootstrap=50)
    assert result["groups"]["sampler"]["unknown"]["emt"]["n_structures"] == 1


def test_bootstrap_interval_covers_slope_of_noisy_model() -> None:
    labelled = dataset()
    result = compare_models({"emt": EMTPotential(), "noisy": ScaledEMT(SOFTENING, noise=0.05)},
                            labelled)  # fmt: skip
    noisy = result["overall"]["noisy"]
    low, high = noisy["softening_bootstrap"]["low"], noisy["softening_bootstrap"]["high"]
    assert low < SOFTENING < high
    assert low < noisy["softening"]["slope"] < high
    assert high - low < 0.2


def test_bootstrap_resamples_structures() -> None:
    rng = np.random.default_rng(3)
    reference = [rng.normal(0.0, 1.0, (8, 3)) for _ in range(12)]
    # Each structure has its own slope: within-structure correlation the t interval ignores.
    model = [(0.8 + rng.normal(0.0, 0.1)) * x for x in reference]
    low, high = softening_bootstrap(model, reference, n=2000, seed=1)
    assert low < 0.8 < high
    assert (low, high) == softening_bootstrap(model, reference, n=2000, seed=1)  # seeded
    # Reported as 2.5/97.5 percentiles of the resampled slopes.
    narrower = softening_bootstrap(model, reference, n=2000, seed=1, confidence=0.5)
    assert low < narrower[0] < narrower[1] < high
    # One structure: no interval.
    assert all(np.isnan(softening_bootstrap(model[:1], reference[:1], n=100)))
    assert all(np.isnan(softening_bootstrap([], [])))
    with pytest.raises(ValueError, match="components"):
        softening_bootstrap([np.zeros(3)], [np.zeros(6)])


def test_bootstrap_coverage_is_near_nominal() -> None:
    rng = np.random.default_rng(0)
    hits, trials = 0, 200
    for trial in range(trials):
        reference = [rng.normal(0.0, 1.0, (4, 3)) for _ in range(30)]
        model = [(0.8 + rng.normal(0.0, 0.1)) * x for x in reference]
        low, high = softening_bootstrap(model, reference, n=400, seed=trial)
        hits += low <= 0.8 <= high
    assert hits / trials > 0.85


def test_read_labelled_extxyz(tmp_path: Path) -> None:
    labelled = dataset()[:3]
    path = tmp_path / "labels.extxyz"
    write(path, [ls.atoms for ls in labelled], format="extxyz")
    back = read_labelled_extxyz(path)
    assert [ls.structure_id for ls in back] == [f"labels.extxyz#{i}" for i in range(3)]
    for original, read in zip(labelled, back, strict=True):
        ref, got = original.atoms.calc.results, read.atoms.calc.results
        assert got["energy"] == pytest.approx(ref["energy"])
        np.testing.assert_allclose(got["forces"], ref["forces"])
        np.testing.assert_allclose(got["stress"], ref["stress"], atol=1e-12)
        assert read.atoms.info["sampler"] == "rattle"
    result = compare_models({"emt": EMTPotential(), "soft": ScaledEMT(SOFTENING)}, back)
    assert result["overall"]["soft"]["softening"]["slope"] == pytest.approx(SOFTENING)

    # A frame with an energy but no forces, and one with nothing, name file and frame.
    no_forces = labelled[0].atoms.copy()
    no_forces.calc = SinglePointCalculator(no_forces, energy=-1.0)
    bad = tmp_path / "bad.extxyz"
    write(bad, [labelled[1].atoms, no_forces], format="extxyz")
    with pytest.raises(ValueError, match=r"bad\.extxyz, frame 1 .*no reference forces"):
        read_labelled_extxyz(bad)
    bare = tmp_path / "bare.xyz"
    write(bare, [bulk("Cu", "fcc", a=3.61)], format="extxyz")
    with pytest.raises(ValueError, match=r"bare\.xyz, frame 0 .*energy or forces"):
        read_labelled_extxyz(bare)
    with pytest.raises(FileNotFoundError):
        read_labelled_extxyz(tmp_path / "missing.extxyz")
