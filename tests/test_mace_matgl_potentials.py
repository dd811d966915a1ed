"""The MACE and matgl adapters against the libraries' own ASE calculators.

No pretrained MACE or matgl weights exist offline (see ../shared/README.md), so each test
builds a tiny random-weight model with the library's own constructors and saves it the way
the library does (``torch.save(model)`` like mace's run_train; ``Potential.save(folder)``
for matgl). Random weights are enough to check the plumbing: batching, units, signs, the
per-structure split of a batch, descriptors, loading and its safety checks.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from pestle.potentials import POTENTIALS
from pestle.potentials.checkpoints import ChecksumError, sha256_file
from pestle.potentials.mace import (
    WEIGHTS_ONLY_ENV,
    MACEPotential,
    import_mace,
    restored_env,
)
from pestle.potentials.matgl import MatGLPotential, folder_sha256

# Read before anything imports mace: what the guard must keep.
ENV_AT_START = os.environ.get(WEIGHTS_ONLY_ENV)

ELEMENTS = ("Li", "F", "Si")
ATOMIC_NUMBERS = [3, 9, 14]
# The file mace_mp("small") caches: its URL's basename, keeping letters, digits and "_".
MACE_SMALL_CACHE_NAME = "20231210mace128L0_energy_epoch249model"


def rattled_lif() -> Atoms:
    """8-atom LiF, cell sheared and atoms rattled: no symmetry hides an index or sign error."""
    atoms = bulk("LiF", "rocksalt", a=4.03, cubic=True)
    strain = np.array([[0.01, 0.02, -0.01], [0.0, -0.015, 0.012], [0.005, 0.0, 0.02]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    atoms.rattle(0.08, seed=1)
    return atoms


def rattled_si(repeat: tuple[int, int, int] = (1, 1, 1)) -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=2)
    return atoms


def structures() -> list[Atoms]:
    """Different sizes and chemistries in one batch: 8-atom LiF, 16-atom Si, 8-atom Si."""
    return [rattled_lif(), rattled_si((2, 1, 1)), rattled_si()]


def assert_same(preds, refs, rtol: float, atol: float) -> None:
    for pred, (energy, forces, stress) in zip(preds, refs, strict=True):
        assert pred.energy == pytest.approx(energy, rel=rtol, abs=atol)
        np.testing.assert_allclose(pred.forces, forces, rtol=rtol, atol=atol)
        assert pred.stress.shape == (6,)
        np.testing.assert_allclose(pred.stress, stress, rtol=rtol, atol=atol)


def numeric_stress(potential, atoms: Atoms, eps: float = 1e-4) -> np.ndarray:
    """ASE's convention from scratch: sigma_ij = (1/V) dE/d(eps_ij), positive = tensile."""
    stress = np.zeros(6)
    for voigt, (i, j) in enumerate([(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * eps / (1 if i == j else 2)
            strain[j, i] = strain[i, j]
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            energies.append(potential.predict([strained])[0].energy)
        stress[voigt] = (energies[0] - energies[1]) / (2 * eps) / atoms.get_volume()
    return stress


# ---------------------------------------------------------------------------------------
# MACE


@pytest.fixture(scope="module")
def mace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer ScaleShiftMACE with 8x0e+8x1o hidden irreps, saved like mace's run_train."""
    modules = import_mace("mace.modules")
    o3 = import_mace("e3nn.o3")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript notes from e3nn's code generation
        model = modules.ScaleShiftMACE(
            r_max=4.0,
            num_bessel=6,
            num_polynomial_cutoff=5,
            max_ell=2,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes[
                "RealAgnosticResidualInteractionBlock"
            ],
            num_interactions=2,
            num_elements=len(ATOMIC_NUMBERS),
            hidden_irreps=o3.Irreps("8x0e+8x1o"),
            MLP_irreps=o3.Irreps("8x0e"),
            atomic_energies=np.array([-1.9, -0.7, -5.4]),
            avg_num_neighbors=12.0,
            atomic_numbers=ATOMIC_NUMBERS,
            correlation=2,
            gate=torch.nn.functional.silu,
            atomic_inter_scale=2.0,
            atomic_inter_shift=0.1,
        )
    path = tmp_path_factory.mktemp("mace") / "tiny.model"
    torch.save(model, path)
    return path


def build_mace(path: Path, **params) -> MACEPotential:
    settings = {"model_path": str(path), "model_sha256": sha256_file(path), "device": "cpu"}
    return POTENTIALS.build("mace", settings | params)


@pytest.fixture(scope="module")
def mace_reference(mace_file: Path):
    """mace's own ASE calculator on the same file, float64 (it loads with a bare torch.load,
    so it needs the variable mace's import would have set; restored afterwards)."""
    calculators = import_mace("mace.calculators")
    with restored_env(), warnings.catch_warnings():
        os.environ[WEIGHTS_ONLY_ENV] = "1"
        warnings.simplefilter("ignore")
        return calculators.MACECalculator(
            model_paths=str(mace_file), device="cpu", default_dtype="float64"
        )


def test_mace_matches_mace_calculator(mace_file: Path, mace_reference) -> None:
    """float64 on both sides, the same graphs and the same per-graph sums: the batched
    result equals the calculator's per-structure one to rounding (rtol 1e-9; seen: exact)."""
    atoms_list = structures()
    preds = build_mace(mace_file).predict(atoms_list)
    refs = []
    for atoms in atoms_list:
        atoms.calc = mace_reference
        refs.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    assert_same(preds, refs, rtol=1e-9, atol=1e-12)
    assert [len(p.forces) for p in preds] == [8, 16, 8]
    assert np.abs(preds[0].forces).max() > 1e-3  # off equilibrium: forces are not trivially 0
    assert np.abs(preds[0].stress[3:]).max() > 1e-5  # and the sheared cell has shear stress


def test_mace_stress_is_the_ase_strain_derivative(mace_file: Path) -> None:
    potential = build_mace(mace_file)
    atoms = rattled_lif()
    stress = potential.predict([atoms])[0].stress
    np.testing.assert_allclose(stress, numeric_stress(potential, atoms), rtol=1e-5, atol=1e-9)


def test_mace_batches_bounded_by_atoms_give_the_same_numbers(mace_file: Path) -> None:
    atoms_list = structures()
    one_batch = build_mace(mace_file, max_atoms_per_batch=1000).predict(atoms_list)
    small = build_mace(mace_file, max_atoms_per_batch=8).predict(atoms_list)  # one each
    refs = [(p.energy, p.forces, p.stress) for p in one_batch]
    assert_same(small, refs, rtol=1e-12, atol=1e-14)


def test_mace_float32_close_to_float64(mace_file: Path) -> None:
    atoms_list = structures()
    double = build_mace(mace_file).predict(atoms_list)
    single = build_mace(mace_file, default_dtype="float32").predict(atoms_list)
    refs = [(p.energy, p.forces, p.stress) for p in double]
    assert_same(single, refs, rtol=1e-4, atol=1e-5)  # float32 rounding, nothing more


def test_mace_embed_is_mean_of_calculator_descriptors(mace_file: Path, mace_reference) -> None:
    atoms_list = structures()
    embeddings = build_mace(mace_file, max_atoms_per_batch=16).embed(atoms_list)
    for atoms, embedding in zip(atoms_list, embeddings, strict=True):
        expected = mace_reference.get_descriptors(atoms, invariants_only=True).mean(axis=0)
        assert embedding.shape == (16,)  # 8 invariants from each of the 2 layers
        np.testing.assert_allclose(embedding, expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(embeddings[0], embeddings[2])  # LiF and Si differ


def test_mace_refuses_wrong_sha256_and_unverified_pickle(mace_file: Path) -> None:
    with pytest.raises(ChecksumError, match="expected"):
        build_mace(mace_file, model_sha256="0" * 64).load_model()
    unverified = POTENTIALS.build("mace", {"model_path": str(mace_file), "device": "cpu"})
    with pytest.raises(ValueError, match="trust_model_file"):
        unverified.load_model()
    trusted = POTENTIALS.build(
        "mace", {"model_path": str(mace_file), "device": "cpu", "trust_model_file": True}
    )
    assert trusted.predict([rattled_lif()])[0].energy == pytest.approx(
        build_mace(mace_file).predict([rattled_lif()])[0].energy
    )


def test_mace_missing_pretrained_model_fails_fast_and_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_mace("mace.calculators.foundations_models")  # time the lookup, not the import
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    potential = POTENTIALS.build("mace", {"model": "small", "device": "cpu"})
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        potential.predict([rattled_lif()])
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert str(tmp_path / "mace" / MACE_SMALL_CACHE_NAME) in message
    assert "model_path" in message
    assert "2023-12-10-mace-128-L0_energy_epoch-249.model" in message  # the URL to fetch
    assert not (tmp_path / "mace").exists()  # nothing was created or downloaded


def test_mace_pretrained_name_loads_from_mace_cache(
    mace_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "mace" / MACE_SMALL_CACHE_NAME
    cached.parent.mkdir()
    shutil.copy(mace_file, cached)
    # mace's own loader finds the same file there (and so would not download).
    foundations = import_mace("mace.calculators.foundations_models")
    assert Path(foundations.download_mace_mp_checkpoint("small")) == cached

    potential = POTENTIALS.build(
        "mace", {"model": "small", "model_sha256": sha256_file(mace_file), "device": "cpu"}
    )
    atoms = rattled_lif()
    assert potential.predict([atoms])[0].energy == build_mace(mace_file).predict([atoms])[0].energy
    description = potential.describe()
    assert description["family"] == "mace"
    assert description["model"] == "small"
    assert description["model_path"] == str(cached)
    assert description["model_sha256"] == sha256_file(mace_file)
    assert description["mace_version"] == import_mace("mace").__version__


def test_mace_unknown_pretrained_name() -> None:
    with pytest.raises(ValueError, match="unknown MACE-MP model"):
        POTENTIALS.build("mace", {"model": "gigantic", "device": "cpu"}).load_model()


def test_mace_import_guard_restores_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module that sets the variable on import, as mace does, leaves no trace."""
    (tmp_path / "sets_weights_only_env.py").write_text(
        f"import os\nos.environ[{WEIGHTS_ONLY_ENV!r}] = '1'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(WEIGHTS_ONLY_ENV, "0")
    import_mace("sets_weights_only_env")
    assert os.environ[WEIGHTS_ONLY_ENV] == "0"
    monkeypatch.delenv(WEIGHTS_ONLY_ENV)
    import_mace("mace.calculators.mace")  # sets it at import (if not imported yet)
    assert WEIGHTS_ONLY_ENV not in os.environ


def test_mace_use_leaves_torch_load_safe(mace_file: Path) -> None:
    potential = build_mace(mace_file)
    potential.predict(structures())
    potential.embed([rattled_lif()])
    potential.describe()
    assert os.environ.get(WEIGHTS_ONLY_ENV) == ENV_AT_START
    if ENV_AT_START is None:
        # torch's safe default is back: a full pickle is refused without weights_only=False.
        with pytest.raises(pickle.UnpicklingError):
            torch.load(mace_file)


def test_mace_pickle_carries_settings_not_weights(mace_file: Path) -> None:
    potential = build_mace(mace_file)
    before = potential.predict([rattled_lif()])[0]
    assert potential._model is not None
    data = pickle.dumps(potential)
    assert len(data) < 5_000 < mace_file.stat().st_size
    restored = pickle.loads(data)
    assert restored._model is None
    assert restored.predict([rattled_lif()])[0].energy == before.energy


# ---------------------------------------------------------------------------------------
# matgl


def tiny_tensornet():
    from matgl.apps.pes import Potential
    from matgl.models import TensorNet

    torch.manual_seed(0)
    model = TensorNet(
        element_types=ELEMENTS,
        units=8,
        nblocks=2,
        num_rbf=8,
        cutoff=4.0,
        is_intensive=False,
        use_warp=False,
    )
    return Potential(model=model, data_std=3.0, element_refs=np.array([-1.9, -0.7, -5.4]))


def tiny_m3gnet():
    from matgl.apps.pes import Potential
    from matgl.models import M3GNet

    torch.manual_seed(0)
    model = M3GNet(
        element_types=ELEMENTS,
        units=8,
        nblocks=2,
        dim_node_embedding=8,
        dim_edge_embedding=8,
        cutoff=4.0,
        threebody_cutoff=3.0,
        is_intensive=False,
    )
    return Potential(model=model, data_std=3.0)


@pytest.fixture(scope="module", params=["tensornet", "m3gnet"])
def matgl_folder(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("matgl") / request.param
    potential = tiny_tensornet() if request.param == "tensornet" else tiny_m3gnet()
    potential.save(folder)
    return folder


def build_matgl(folder: Path, **params) -> MatGLPotential:
    return POTENTIALS.build("matgl", {"model_path": str(folder), "device": "cpu"} | params)


def matgl_reference(folder: Path, atoms_list: list[Atoms], dtype: str):
    import matgl
    from matgl.ext.ase import PESCalculator

    potential = matgl.load_model(folder)
    if dtype == "float64":
        potential = potential.double()
    calc = PESCalculator(potential, stress_unit="eV/A3", use_voigt=True)
    refs = []
    for atoms in atoms_list:
        atoms.calc = calc
        refs.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    return refs


def test_matgl_matches_pes_calculator_float64(matgl_folder: Path) -> None:
    """float64 model on both sides (matgl rounds coordinates to float32 in its graphs either
    way, identically on both sides): batched equals per-structure to rtol 1e-9."""
    atoms_list = structures()
    preds = build_matgl(matgl_folder, default_dtype="float64").predict(atoms_list)
    assert_same(preds, matgl_reference(matgl_folder, atoms_list, "float64"), 1e-9, 1e-12)
    assert [len(p.forces) for p in preds] == [8, 16, 8]
    assert np.abs(preds[0].forces).max() > 1e-4
    assert np.abs(preds[0].stress[3:]).max() > 1e-7


def test_matgl_matches_pes_calculator_float32(matgl_folder: Path) -> None:
    """matgl's own precision: one batch sums in a different order from one structure at a
    time, which float32 resolves to ~1e-7 of the largest value (seen: <= 2e-6 relative
    on forces of ~1e-3 eV/A), hence rtol 1e-5 with a small absolute floor."""
    atoms_list = structures()
    preds = build_matgl(matgl_folder).predict(atoms_list)
    refs = matgl_reference(matgl_folder, atoms_list, "float32")
    for pred, (energy, forces, stress) in zip(preds, refs, strict=True):
        assert pred.energy == pytest.approx(energy, rel=1e-6)
        np.testing.assert_allclose(pred.forces, forces, rtol=1e-5, atol=1e-5 * np.abs(forces).max())
        np.testing.assert_allclose(pred.stress, stress, rtol=1e-5, atol=1e-5 * np.abs(stress).max())


def test_matgl_stress_is_the_ase_strain_derivative(matgl_folder: Path) -> None:
    potential = build_matgl(matgl_folder, default_dtype="float64")
    atoms = rattled_lif()
    stress = potential.predict([atoms])[0].stress
    # Coordinates pass through float32 in matgl's graphs: finite differences need a
    # larger step and get ~1e-4 relative agreement.
    numeric = numeric_stress(potential, atoms, eps=1e-3)
    np.testing.assert_allclose(stress, numeric, rtol=2e-3, atol=2e-3 * np.abs(stress).max())


def test_matgl_batches_bounded_by_atoms_give_the_same_numbers(matgl_folder: Path) -> None:
    atoms_list = structures()
    one_batch = build_matgl(matgl_folder, default_dtype="float64").predict(atoms_list)
    small = build_matgl(matgl_folder, default_dtype="float64", max_atoms_per_batch=8)
    refs = [(p.energy, p.forces, p.stress) for p in one_batch]
    assert_same(small.predict(atoms_list), refs, rtol=1e-10, atol=1e-13)


def test_matgl_embed_pools_per_atom_features(matgl_folder: Path) -> None:
    atoms_list = structures()
    batched = build_matgl(matgl_folder, default_dtype="float64").embed(atoms_list)
    alone = build_matgl(matgl_folder, default_dtype="float64", max_atoms_per_batch=1)
    singles = alone.embed(atoms_list)
    for a, b in zip(batched, singles, strict=True):
        assert a.shape == (8,)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert not np.allclose(batched[0], batched[2])
    # The 8-atom Si cell doubled has the same mean atom environment, up to its rattle.
    np.testing.assert_allclose(batched[1], batched[2], rtol=0.2)


def test_matgl_missing_pretrained_model_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matgl.utils import io

    monkeypatch.setattr(io, "MATGL_CACHE", tmp_path)
    potential = POTENTIALS.build("matgl", {"device": "cpu"})
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        potential.predict([rattled_lif()])
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "materialyze/TensorNet-PES-MatPES-PBE-2025.2" in message
    assert str(tmp_path) in message and "model_path" in message


def test_matgl_pretrained_name_loads_from_matgl_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub-layout cache entry, as hf_hub_download leaves it, is found without a network."""
    import huggingface_hub.constants
    from matgl.utils import io

    monkeypatch.setattr(io, "MATGL_CACHE", tmp_path)
    repo = tmp_path / "models--materialyze--Tiny-PES"
    snapshot = repo / "snapshots" / ("ab" * 20)
    tiny_tensornet().save(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    # matgl's own Hub loader resolves the same files there when offline.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    found = io._download_from_hf_hub("materialyze/Tiny-PES")
    assert {Path(path).parent for path in found.values()} == {snapshot}

    potential = POTENTIALS.build("matgl", {"model": "Tiny-PES", "device": "cpu"})
    atoms = rattled_lif()
    expected = build_matgl(snapshot).predict([atoms])[0]
    assert potential.predict([atoms])[0].energy == expected.energy
    description = potential.describe()
    assert description["family"] == "matgl"
    assert description["model"] == "Tiny-PES"
    assert description["model_path"] == str(snapshot)
    assert description["model_sha256"] == folder_sha256(snapshot)
    assert description["architecture"] == "TensorNet"
    assert description["matgl_version"] == __import__("matgl").__version__


def test_matgl_refuses_wrong_sha256_and_incomplete_folder(matgl_folder: Path, tmp_path) -> None:
    with pytest.raises(ChecksumError, match="expected"):
        build_matgl(matgl_folder, model_sha256="f" * 64).load_model()
    good = build_matgl(matgl_folder, model_sha256=folder_sha256(matgl_folder))
    assert good.predict([rattled_si()])[0].forces.shape == (8, 3)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(matgl_folder / "model.json", partial)
    with pytest.raises(FileNotFoundError, match="state.pt"):
        build_matgl(partial).load_model()


def test_matgl_pickle_carries_settings_not_weights(matgl_folder: Path) -> None:
    potential = build_matgl(matgl_folder)
    before = potential.predict([rattled_lif()])[0]
    assert potential._potential is not None
    data = pickle.dumps(potential)
    assert len(data) < 5_000 < (matgl_folder / "state.pt").stat().st_size
    restored = pickle.loads(data)
    assert restored._potential is None
    assert restored.predict([rattled_lif()])[0].energy == before.energy


def test_matgl_molecule_has_no_stress_and_slab_is_refused(matgl_folder: Path) -> None:
    potential = build_matgl(matgl_folder)
    molecule = Atoms("LiF", positions=[[0, 0, 0], [1.6, 0.1, 0.0]])
    pred = potential.predict([molecule, rattled_lif()])
    assert pred[0].stress is None and pred[0].forces.shape == (2, 3)
    assert pred[1].stress is not None
    slab = rattled_lif()
    slab.pbc = (True, True, False)
    with pytest.raises(ValueError, match="pbc"):
        potential.predict([slab])


def test_without_stress_same_energy_and_forces(mace_file: Path, matgl_folder: Path) -> None:
    for potential in (build_mace(mace_file), build_matgl(matgl_folder, default_dtype="float64")):
        full = potential.predict(structures())
        lean = potential.predict(structures(), stress=False)
        for a, b in zip(full, lean, strict=True):
            assert b.stress is None
            assert a.energy == pytest.approx(b.energy, rel=1e-9)
            np.testing.assert_allclose(a.forces, b.forces, rtol=1e-9, atol=1e-12)
