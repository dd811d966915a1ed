"""Fine-tuning tiny MACE and matgl foundation models on labels from another level of theory.

No pretrained weights exist offline, so the "foundation" models are tiny random-weight models
built with the libraries' own constructors and saved the way the libraries save them (as in
test_mace_matgl_potentials.py). ASE's EMT has no Li, F or Si, so the reference labels come from
a different tiny MACE model (other seed, larger interaction scale) plus per-element energy
offsets: a different potential-energy surface on a different absolute energy scale, which is
what fine-tuning to a new level of theory faces. The labels sit in SinglePointCalculators.

Each fine-tune checks that the checkpoint loads through the matching pestle Potential, fits
the labels' forces better than the foundation, and that the per-element reference energies
were refitted by least squares (or kept, when asked).

The modes of Deng et al. (2025): ``linear_correction`` on labels that are the foundation
itself stiffened by 1/0.8 (its energy without the element references, its forces and stress
divided by 0.8, on another energy zero) recovers the scale 1.25 and the offsets; ``full``
passes the paper's hyper-parameters to mace / matgl and a 2-epoch run works.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from pydantic import ValidationError

from pestle.potentials import POTENTIALS
from pestle.potentials.checkpoints import ChecksumError, sha256_file
from pestle.potentials.mace import WEIGHTS_ONLY_ENV, import_mace
from pestle.potentials.matgl import folder_sha256
from pestle.trainers import TRAINERS, LabelledStructure
from pestle.trainers.mace import CHECKPOINT_NAME, MACETrainer, scale_interaction_energy
from pestle.trainers.matgl import MatGLTrainer

pytestmark = pytest.mark.slow

ENV_AT_START = os.environ.get(WEIGHTS_ONLY_ENV)
ELEMENTS = ("Li", "F", "Si")
ATOMIC_NUMBERS = [3, 9, 14]
FOUNDATION_E0S = [-1.9, -0.7, -5.4]
# The "new level of theory" sits on another absolute scale, element by element (eV/atom).
OFFSETS = {3: 0.3, 9: -0.2, 14: 0.5}
# The tests' training runs are tiny: one thread avoids contention on a busy CPU.
THREADS = {"cpu_threads": 1}
SOFTENING = 0.8  # the foundation's forces are 0.8 x the stiffened labels'


def tiny_mace(seed: int, scale: float):
    modules = import_mace("mace.modules")
    o3 = import_mace("e3nn.o3")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript notes from e3nn's code generation
        return modules.ScaleShiftMACE(
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
            atomic_energies=np.array(FOUNDATION_E0S),
            avg_num_neighbors=12.0,
            atomic_numbers=ATOMIC_NUMBERS,
            correlation=2,
            gate=torch.nn.functional.silu,
            atomic_inter_scale=scale,
            atomic_inter_shift=0.1,
        )


def build_mace(path: Path, **params):
    settings = {"model_path": str(path), "model_sha256": sha256_file(path), "device": "cpu"}
    return POTENTIALS.build("mace", settings | params)


def geometries(seeds: list[int]) -> list[Atoms]:
    """Rattled Si and LiF cells; seed % 3 == 2 gives LiF with one F removed, so Li and F do
    not always come 1:1 and the per-element energy fit has a unique solution."""
    out = []
    for seed in seeds:
        if seed % 3 == 0:
            atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        else:
            atoms = bulk("LiF", "rocksalt", a=4.03, cubic=True)
            if seed % 3 == 2:
                del atoms[[a.index for a in atoms if a.symbol == "F"][0]]
        strain = np.eye(3) + 0.01 * np.random.default_rng(seed).uniform(-1, 1, (3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(0.1, seed=seed)
        out.append(atoms)
    return out


def label(reference, atoms_list: list[Atoms], tag: str) -> list[LabelledStructure]:
    out = []
    for i, (atoms, pred) in enumerate(zip(atoms_list, reference.predict(atoms_list), strict=True)):
        energy = pred.energy + sum(OFFSETS[int(z)] for z in atoms.numbers)
        atoms.calc = SinglePointCalculator(
            atoms, energy=energy, forces=pred.forces, stress=pred.stress
        )
        out.append(
            LabelledStructure(atoms=atoms, structure_id=f"s-{tag}{i}", label_id=f"l-{tag}{i}")
        )
    return out


def stiffened(
    potential, atoms_list: list[Atoms], refs: dict[int, float], tag: str
) -> list[LabelledStructure]:
    """Labels 1/0.8 stiffer than ``potential``: its energy without the element references
    ``refs`` (eV/atom by Z) divided by 0.8, plus the references and OFFSETS (another code's
    energy zero); its forces and stress divided by 0.8."""
    out = []
    for i, (atoms, pred) in enumerate(zip(atoms_list, potential.predict(atoms_list), strict=True)):
        e_refs = sum(refs[int(z)] for z in atoms.numbers)
        offset = sum(OFFSETS[int(z)] for z in atoms.numbers)
        atoms.calc = SinglePointCalculator(
            atoms,
            energy=e_refs + offset + (pred.energy - e_refs) / SOFTENING,
            forces=pred.forces / SOFTENING,
            stress=pred.stress / SOFTENING,
        )
        out.append(
            LabelledStructure(atoms=atoms, structure_id=f"s-{tag}{i}", label_id=f"l-{tag}{i}")
        )
    return out


def check_mode_params(params: type, required: dict) -> None:
    """What both trainers' Params do with mode, as CHGNetTrainer.Params does."""
    custom = params(**required)
    assert custom.mode == "custom"
    full = params(**required, mode="full")
    assert (full.energy_weight, full.force_weight, full.stress_weight) == (0.1, 100.0, 0.1)
    assert (full.learning_rate, full.epochs) == (1e-3, 100)
    assert params(**required, mode="full", epochs=7).epochs == 7
    linear = params(**required, mode="linear_correction")
    assert (linear.energy_weight, linear.force_weight, linear.stress_weight) == (0.1, 100, 0.1)
    for p in (custom, full, linear):  # recorded hyperparameters rebuild the same Params
        assert params(**p.model_dump()) == p
    with pytest.raises(ValidationError, match="fixes force_weight"):
        params(**required, mode="full", force_weight=1.0)
    with pytest.raises(ValidationError, match="fixes learning_rate"):
        params(**required, mode="full", learning_rate=0.01)
    with pytest.raises(ValidationError, match="epochs do not apply"):
        params(**required, mode="linear_correction", epochs=3)
    with pytest.raises(ValidationError, match="batch_size do not apply"):
        params(**required, mode="linear_correction", batch_size=8)


def test_mode_params() -> None:
    mace = MACETrainer.Params
    check_mode_params(mace, {"model_path": "foundation.model"})
    full = mace(model_path="f.model", mode="full")
    assert full.ema is False and full.finetuning == "naive"
    with pytest.raises(ValidationError, match="fixes ema"):
        mace(model_path="f.model", mode="full", ema=True)
    with pytest.raises(ValidationError, match="finetuning 'naive'"):
        mace(model_path="f.model", mode="full", finetuning="multihead", replay_file="r")
    with pytest.raises(ValidationError, match="replay_file do not apply"):
        mace(model_path="f.model", mode="linear_correction", replay_file="r")
    # The old spelling of finetuning.
    assert mace(model_path="f.model", mode="naive").finetuning == "naive"
    assert mace(model_path="f.model", mode="naive").mode == "custom"

    matgl = MatGLTrainer.Params
    check_mode_params(matgl, {})
    full = matgl(mode="full")
    assert full.loss == "mse_loss" and full.decay_alpha * full.learning_rate == 1e-5
    with pytest.raises(ValidationError, match="fixes loss"):
        matgl(mode="full", loss="huber_loss")
    with pytest.raises(ValidationError, match="fixes loss"):
        matgl(mode="linear_correction", loss="l1_loss")


def force_mae(potential, labelled: list[LabelledStructure]) -> float:
    preds = potential.predict([ls.atoms for ls in labelled])
    errors = [
        np.abs(p.forces - ls.atoms.calc.results["forces"]).ravel()
        for p, ls in zip(preds, labelled, strict=True)
    ]
    return float(np.concatenate(errors).mean())


def expected_shift(potential, labelled: list[LabelledStructure]) -> np.ndarray:
    """Least squares over compositions of (label - model) energies, columns Li, F, Si."""
    preds = potential.predict([ls.atoms for ls in labelled])
    residual = [
        ls.atoms.calc.results["energy"] - p.energy for p, ls in zip(preds, labelled, strict=True)
    ]
    counts = np.array([[np.sum(ls.atoms.numbers == z) for z in ATOMIC_NUMBERS] for ls in labelled])
    assert np.linalg.matrix_rank(counts) == 3  # a unique fit
    shift, *_ = np.linalg.lstsq(counts, np.array(residual), rcond=None)
    return shift


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one torch thread in this process too (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = {"foundation": folder / "foundation.model", "reference": folder / "reference.model"}
    torch.save(tiny_mace(seed=0, scale=2.0), paths["foundation"])
    torch.save(tiny_mace(seed=1, scale=5.0), paths["reference"])
    return paths


@pytest.fixture(scope="module")
def data(models: dict[str, Path]) -> dict[str, list[LabelledStructure]]:
    reference = build_mace(models["reference"])
    return {
        "train": label(reference, geometries([0, 1, 2, 3, 4, 5]), "t"),
        "val": label(reference, geometries([6, 7]), "v"),
    }


# ---------------------------------------------------------------------------------------
# MACE


def mace_params(models: dict[str, Path], **params) -> dict:
    foundation = models["foundation"]
    return {
        "model_path": str(foundation),
        "model_sha256": sha256_file(foundation),
        "learning_rate": 0.01,
        "batch_size": 2,
        **THREADS,
        **params,
    }


def tuned_mace(result):
    return POTENTIALS.build(
        result.potential,
        {
            **result.potential_params,
            "model_path": str(result.checkpoint),
            "model_sha256": result.metrics["checkpoint_sha256"],
            "device": "cpu",
        },
    )


def test_mace_naive_finetune_refits_e0s_and_fits_forces(models, data, tmp_path: Path) -> None:
    train, val = data["train"], data["val"]
    foundation = build_mace(models["foundation"])
    trainer = TRAINERS.build("mace", mace_params(models, epochs=8))
    assert isinstance(trainer, MACETrainer)
    result = trainer.train(train, val, tmp_path)

    assert result.checkpoint == tmp_path / "mace" / CHECKPOINT_NAME
    assert result.potential == "mace"
    assert "model_path" not in result.potential_params
    metrics = result.metrics
    assert metrics["checkpoint_sha256"] == sha256_file(result.checkpoint)
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(8))
    assert all(
        np.isfinite(e["train_loss"]) and np.isfinite(e["val_loss"]) for e in metrics["epochs"]
    )
    best = min(metrics["epochs"], key=lambda e: e["val_loss"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["best_val_loss"] == pytest.approx(best["val_loss"])
    assert metrics["val_source"] == "val_set" and metrics["loss"] == "stress"
    assert metrics["heads"] == ["Default"] and metrics["multihead_replay"] is False
    assert result.hyperparameters["finetuning"] == "naive"
    assert result.hyperparameters["mode"] == metrics["mode"] == "custom"

    tuned = tuned_mace(result)
    before, after = force_mae(foundation, train), force_mae(tuned, train)
    print(f"MACE naive: train force MAE {before:.4f} -> {after:.4f} eV/A")
    assert after < 0.6 * before
    assert force_mae(tuned, val) < force_mae(foundation, val)
    energies = [p.energy for p in tuned.predict([ls.atoms for ls in train])]
    assert not np.allclose(
        energies, [p.energy for p in foundation.predict([ls.atoms for ls in train])]
    )

    # E0s: the foundation's shifted by the least-squares fit of label - foundation energies.
    old = foundation.load_model().atomic_energies_fn.atomic_energies.numpy().ravel()
    new = tuned.load_model().atomic_energies_fn.atomic_energies.numpy().ravel()
    shift = expected_shift(foundation, train)
    np.testing.assert_allclose(new, old + shift, rtol=0, atol=1e-8)
    assert np.all(np.abs(new - old) > 0.1)
    assert metrics["e0_shift_eV"] == pytest.approx(dict(zip(ELEMENTS, shift, strict=True)))
    assert metrics["e0s"] == pytest.approx(dict(zip(ELEMENTS, new, strict=True)))

    # Everything mace wrote is under the workdir, and torch.load is safe again.
    assert (tmp_path / "mace" / "logs").is_dir() and (tmp_path / "mace" / "results").is_dir()
    assert os.environ.get(WEIGHTS_ONLY_ENV) == ENV_AT_START


def test_mace_multihead_needs_a_replay_file(models) -> None:
    with pytest.raises(ValidationError, match="replay_file") as error:
        TRAINERS.build("mace", mace_params(models, finetuning="multihead"))
    assert "silently" in str(error.value)
    with pytest.raises(ValidationError, match="only used with finetuning 'multihead'"):
        TRAINERS.build("mace", mace_params(models, replay_file="replay.xyz"))


@pytest.fixture(scope="module")
def replay_file(models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pretraining data: structures labelled by the foundation itself, written by ASE with
    plain energy/forces/stress keys (how a user's extxyz usually arrives)."""
    foundation = build_mace(models["foundation"])
    atoms_list = geometries([20, 21, 22, 23, 24, 25])
    for atoms, pred in zip(atoms_list, foundation.predict(atoms_list), strict=True):
        atoms.calc = SinglePointCalculator(
            atoms, energy=pred.energy, forces=pred.forces, stress=pred.stress
        )
    path = tmp_path_factory.mktemp("replay") / "pretraining.xyz"
    write(path, atoms_list, format="extxyz")
    return path


def test_mace_multihead_runs_with_replay(models, data, replay_file: Path, tmp_path: Path) -> None:
    train, val = data["train"], data["val"]
    params = mace_params(models, epochs=5, finetuning="multihead", replay_file=str(replay_file))
    result = TRAINERS.build("mace", params).train(train, val, tmp_path)

    metrics = result.metrics
    assert metrics["multihead_replay"] is True and metrics["n_replay"] == 6
    assert metrics["loss"] == "universal"
    assert "--pt_train_file=" + str(tmp_path / "mace" / "replay.xyz") in metrics["argv"]
    # What mace itself says and saves: the replay head beside the fine-tuning head.
    log_text = "".join(p.read_text() for p in (tmp_path / "mace" / "logs").glob("*_run-0.log"))
    assert "Using multiheads finetuning mode" in log_text
    assert "Using heads: ['Default', 'pt_head']" in log_text
    assert any("val_loss_pt_head" in e for e in metrics["epochs"])

    tuned = tuned_mace(result)
    model = tuned.load_model()
    assert list(model.heads) == ["pt_head", "Default"] == metrics["heads"]
    assert tuned._head == "Default"
    foundation = build_mace(models["foundation"])
    old = foundation.load_model().atomic_energies_fn.atomic_energies.numpy().ravel()
    e0s = model.atomic_energies_fn.atomic_energies.numpy()
    np.testing.assert_allclose(e0s[0], old, atol=1e-6)  # pt_head keeps the foundation's E0s
    np.testing.assert_allclose(e0s[1], old + expected_shift(foundation, train), atol=1e-8)
    before, after = force_mae(foundation, train), force_mae(tuned, train)
    print(f"MACE multihead: train force MAE {before:.4f} -> {after:.4f} eV/A")
    assert after < before


def test_mace_multihead_fails_if_mace_drops_the_replay(
    models, data, replay_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --pt_train_file mace quietly fine-tunes naively: the trainer notices."""
    argv = MACETrainer._argv

    def without_replay(self, *args, **kwargs):
        return [a for a in argv(self, *args, **kwargs) if not a.startswith("--pt_train_file")]

    monkeypatch.setattr(MACETrainer, "_argv", without_replay)
    # The old spelling of finetuning (mode: multihead) is still read.
    params = mace_params(models, epochs=1, mode="multihead", replay_file=str(replay_file))
    with pytest.raises(RuntimeError, match="did not fine-tune in multihead mode"):
        TRAINERS.build("mace", params).train(data["train"][:2], [], tmp_path)


def test_mace_refuses_unverified_foundation(models, data, tmp_path: Path) -> None:
    with pytest.raises(ChecksumError, match="expected"):
        TRAINERS.build("mace", mace_params(models, model_sha256="0" * 64)).train(
            data["train"], [], tmp_path
        )
    with pytest.raises(ValueError, match="trust_model_file"):
        TRAINERS.build("mace", mace_params(models, model_sha256=None)).train(
            data["train"], [], tmp_path
        )
    with pytest.raises(ValueError, match="empty training set"):
        TRAINERS.build("mace", mace_params(models)).train([], [], tmp_path)


def test_mace_linear_correction_recovers_scale(models, tmp_path: Path) -> None:
    foundation = build_mace(models["foundation"])  # float64
    refs = dict(zip(ATOMIC_NUMBERS, FOUNDATION_E0S, strict=True))
    train = stiffened(foundation, geometries([0, 1, 2, 3, 4, 5]), refs, "t")
    val = stiffened(foundation, geometries([6, 7]), refs, "v")
    held_out = geometries([42])[0]
    params = {
        "model_path": str(models["foundation"]),
        "model_sha256": sha256_file(models["foundation"]),
        "mode": "linear_correction",
        **THREADS,
    }
    start = time.perf_counter()
    result = TRAINERS.build("mace", params).train(train, val, tmp_path)
    print(f"MACE linear correction: {time.perf_counter() - start:.1f} s")

    metrics = result.metrics
    scale = metrics["linear_correction_scale"]
    print(f"MACE linear correction: scale {scale:.9f}")
    assert scale == pytest.approx(1 / SOFTENING, abs=1e-3)
    assert scale == pytest.approx(1 / SOFTENING, rel=1e-8)  # float64 throughout
    assert metrics["mode"] == result.hyperparameters["mode"] == "linear_correction"
    assert metrics["trainable_parameters"] == 1 and metrics["epochs"] == []
    assert metrics["train_mae_after"]["f"] < 1e-8 < metrics["train_mae_before"]["f"]
    assert metrics["val_mae_after"]["f"] < 1e-8
    assert metrics["train_loss_after"] < 1e-12 < metrics["train_loss_before"]
    assert metrics["loss_weights"] == {"e": 0.1, "f": 100.0, "s": 0.1}
    # The other code's energy zero went into the E0s, fitted jointly with the scale.
    offsets = {element: OFFSETS[z] for element, z in zip(ELEMENTS, ATOMIC_NUMBERS, strict=True)}
    # (1e-6: the foundation's E0s are float32 values, the labels' references exact decimals)
    assert metrics["e0_shift_eV"] == pytest.approx(offsets, abs=1e-6)
    # No mace run: the foundation scaled and saved as mace saves a model.
    assert result.checkpoint == tmp_path / "mace" / CHECKPOINT_NAME
    assert not (tmp_path / "mace" / "logs").exists()
    assert not (tmp_path / "mace" / "foundation.model").exists()
    assert metrics["checkpoint_sha256"] == sha256_file(result.checkpoint)

    tuned = tuned_mace(result)  # potential_params + model_path + sha256, as the daemon does
    model = tuned.load_model()
    assert type(model).__name__ == "ScaleShiftMACE"
    assert float(model.scale_shift.scale) == pytest.approx(2.0 * scale)
    assert float(model.scale_shift.shift) == pytest.approx(0.1 * scale)
    np.testing.assert_allclose(
        model.atomic_energies_fn.atomic_energies.numpy().ravel(),
        np.array(FOUNDATION_E0S) + np.array([OFFSETS[z] for z in ATOMIC_NUMBERS]),
        atol=1e-6,
    )
    structures = [held_out, *[ls.atoms for ls in train]]
    for atoms, before, after in zip(
        structures, foundation.predict(structures), tuned.predict(structures), strict=True
    ):
        np.testing.assert_allclose(after.forces, 1.25 * before.forces, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(after.stress, 1.25 * before.stress, rtol=1e-7, atol=1e-12)
        e_refs = sum(refs[int(z)] for z in atoms.numbers)
        offset = sum(OFFSETS[int(z)] for z in atoms.numbers)
        assert after.energy == pytest.approx(e_refs + offset + 1.25 * (before.energy - e_refs))

    # The paper's case: one structure. The energy only fixes the references; the forces
    # and stress fix the scale.
    single = TRAINERS.build("mace", params).train(train[:1], [], tmp_path / "single")
    assert single.metrics["linear_correction_scale"] == pytest.approx(1.25, abs=1e-3)
    assert single.metrics["val_mae_after"] is None


def test_mace_linear_correction_scales_plain_mace(tmp_path: Path) -> None:
    """A MACE without a scale_shift block: the readouts' last layers are scaled."""
    modules = import_mace("mace.modules")
    o3 = import_mace("e3nn.o3")
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = modules.MACE(
            r_max=4.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes[
                "RealAgnosticResidualInteractionBlock"
            ],
            num_interactions=2, num_elements=3, hidden_irreps=o3.Irreps("8x0e+8x1o"),
            MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.array(FOUNDATION_E0S),
            avg_num_neighbors=12.0, atomic_numbers=ATOMIC_NUMBERS, correlation=2,
            gate=torch.nn.functional.silu,
        )  # fmt: skip
    before_path, after_path = tmp_path / "plain.model", tmp_path / "scaled.model"
    torch.save(plain, before_path)
    scale_interaction_energy(plain, 1.25, head_index=0, n_heads=1)
    torch.save(plain, after_path)
    atoms = geometries([1])[0]
    (before,) = build_mace(before_path).predict([atoms])
    (after,) = build_mace(after_path).predict([atoms])
    e_refs = sum(
        dict(zip(ATOMIC_NUMBERS, FOUNDATION_E0S, strict=True))[int(z)] for z in atoms.numbers
    )
    assert np.abs(before.forces).max() > 1e-3
    np.testing.assert_allclose(after.forces, 1.25 * before.forces, rtol=1e-6, atol=1e-10)
    assert after.energy == pytest.approx(e_refs + 1.25 * (before.energy - e_refs))


def test_mace_full_mode_uses_paper_hyperparameters(models, data, tmp_path: Path) -> None:
    params = {
        "model_path": str(models["foundation"]),
        "model_sha256": sha256_file(models["foundation"]),
        "mode": "full",
        "epochs": 2,
        "batch_size": 2,
        **THREADS,
    }
    start = time.perf_counter()
    result = TRAINERS.build("mace", params).train(data["train"], data["val"], tmp_path)
    print(f"MACE full, 2 epochs: {time.perf_counter() - start:.1f} s")

    argv = result.metrics["argv"]
    for arg in (
        "--loss=stress",  # MSE of energy per atom, forces and stress
        "--energy_weight=0.1",
        "--forces_weight=100.0",
        "--stress_weight=0.1",
        "--optimizer=adam",
        "--lr=0.001",
        "--weight_decay=0.0",
        "--clip_grad=None",
        "--scheduler=ExponentialLR",
        "--max_num_epochs=2",
        "--save_all_checkpoints",
        "--multiheads_finetuning=False",
    ):
        assert arg in argv, arg
    assert not any(a.startswith("--ema") for a in argv)
    (gamma,) = [float(a.split("=")[1]) for a in argv if a.startswith("--lr_scheduler_gamma=")]
    assert 1e-3 * gamma ** (2 - 1) == pytest.approx(1e-5)  # 1e-5 on the last epoch

    metrics = result.metrics
    assert metrics["mode"] == "full" and result.hyperparameters["force_weight"] == 100.0
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    assert metrics["selection"] == "lowest validation force MAE"
    val_f = [e["val_mae_f"] for e in metrics["epochs"]]
    assert metrics["best_epoch"] == int(np.argmin(val_f))
    assert metrics["best_val_force_mae"] == min(val_f)
    assert metrics["optimisation"]["learning_rate_end"] == pytest.approx(1e-5)

    # Only the best epoch's checkpoint is left, and the saved model holds its weights.
    checkpoints = list((tmp_path / "mace" / "checkpoints").glob("*_epoch-*.pt"))
    assert [p.name.rsplit("-", 1)[1] for p in checkpoints] == [f"{metrics['best_epoch']}.pt"]
    # mace's copies of its latest model are gone; the one model left is the kept one.
    assert not list((tmp_path / "mace").rglob("*_compiled.model"))
    assert not list((tmp_path / "mace" / "checkpoints").glob("*.model"))
    saved = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    # mace ran the schedule we passed (the optimizer state of that epoch).
    lr = saved["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-3 * gamma ** metrics["best_epoch"])
    tuned = tuned_mace(result)
    state = tuned.load_model().state_dict()
    for key, value in saved["model"].items():
        assert torch.equal(state[key].to(value.dtype), value), key
    assert tuned.predict([data["val"][0].atoms])[0].forces.shape == (8, 3)


def test_mace_full_mode_prunes_checkpoints_that_cannot_win(tmp_path: Path) -> None:
    """While mace runs, checkpoints older than the newest and worse than the best so far
    are deleted; the newest and the best stay."""
    run_dir = tmp_path
    (run_dir / "checkpoints").mkdir()
    (run_dir / "results").mkdir()
    for epoch in range(5):
        (run_dir / "checkpoints" / f"mace_finetuned_run-0_epoch-{epoch}.pt").write_bytes(b"")
    records = [{"mode": "eval", "epoch": None, "head": "Default", "mae_f": 0.01}]
    records += [
        {"mode": "eval", "epoch": e, "head": "Default", "mae_f": f}
        for e, f in [(0, 0.5), (1, 0.2), (2, 0.3)]
    ]
    lines = [json.dumps(r) for r in records] + ['{"mode": "eval", "epoch": 3, "he']
    (run_dir / "results" / "mace_finetuned_run-0_train.txt").write_text("\n".join(lines))
    trainer = MACETrainer(MACETrainer.Params(model_path="f.model", trust_model_file=True))
    trainer._prune_checkpoints(run_dir)
    # 1 is the best so far, 4 the newest, 3 not evaluated yet (its record is incomplete).
    assert sorted(trainer._checkpoint_files(run_dir)) == [1, 3, 4]


# ---------------------------------------------------------------------------------------
# matgl


def tiny_matgl(architecture: str):
    from matgl.apps.pes import Potential
    from matgl.models import M3GNet, TensorNet

    torch.manual_seed(0)
    if architecture == "tensornet":
        model = TensorNet(element_types=ELEMENTS, units=8, nblocks=2, num_rbf=8, cutoff=4.0,
                          is_intensive=False, use_warp=False)  # fmt: skip
        return Potential(model=model, data_std=3.0, data_mean=0.2,
                         element_refs=np.array(FOUNDATION_E0S))  # fmt: skip
    model = M3GNet(element_types=ELEMENTS, units=8, nblocks=2, dim_node_embedding=8,
                   dim_edge_embedding=8, cutoff=4.0, threebody_cutoff=3.0, is_intensive=False)  # fmt: skip
    return Potential(model=model, data_std=3.0)  # no element refs: the refit adds them


@pytest.fixture(scope="module", params=["tensornet", "m3gnet"])
def matgl_folder(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("matgl") / request.param
    tiny_matgl(request.param).save(folder)
    return folder


def build_matgl(folder: Path, **params):
    return POTENTIALS.build(
        "matgl", {"model_path": str(folder), "model_sha256": folder_sha256(folder), "device": "cpu"}
        | params,
    )  # fmt: skip


def matgl_params(folder: Path, **params) -> dict:
    return {
        "model_path": str(folder),
        "model_sha256": folder_sha256(folder),
        "learning_rate": 0.01,
        "batch_size": 2,
        "force_weight": 20.0,
        **THREADS,
        **params,
    }


def test_matgl_finetune_refits_element_refs_and_fits_forces(
    matgl_folder: Path, data, tmp_path: Path
) -> None:
    train, val = data["train"], data["val"]
    foundation = build_matgl(matgl_folder)
    trainer = TRAINERS.build("matgl", matgl_params(matgl_folder, epochs=40))
    assert isinstance(trainer, MatGLTrainer)
    result = trainer.train(train, val, tmp_path)

    assert result.checkpoint == tmp_path / "matgl_finetuned" and result.potential == "matgl"
    metrics = result.metrics
    assert metrics["checkpoint_sha256"] == folder_sha256(result.checkpoint)
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(40))
    assert all(
        np.isfinite(e["train_loss"]) and np.isfinite(e["val_loss"]) for e in metrics["epochs"]
    )
    best = min(metrics["epochs"], key=lambda e: e["val_loss"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["targets"] == "efs" and metrics["val_source"] == "val_set"
    assert list((tmp_path / "lightning_logs").rglob("metrics.csv"))  # Lightning's logs stay here

    tuned = POTENTIALS.build(
        "matgl",
        {
            **result.potential_params,
            "model_path": str(result.checkpoint),
            "model_sha256": metrics["checkpoint_sha256"],
            "device": "cpu",
        },
    )
    before, after = force_mae(foundation, train), force_mae(tuned, train)
    print(f"matgl {metrics['architecture']}: train force MAE {before:.4f} -> {after:.4f} eV/A")
    assert after < 0.6 * before
    assert force_mae(tuned, val) < force_mae(foundation, val)

    # Element refs: the foundation's (or none) shifted by the least-squares fit.
    shift = expected_shift(foundation, train)
    old = foundation.load_model().element_refs
    old = np.zeros(3) if old is None else old.property_offset.numpy()
    new = tuned.load_model().element_refs.property_offset.numpy()
    np.testing.assert_allclose(new, old + shift, rtol=1e-5, atol=1e-4)  # float32 model
    assert np.all(np.abs(new - old) > 0.1)
    assert metrics["element_ref_shift_eV"] == pytest.approx(
        dict(zip(ELEMENTS, shift, strict=True)), abs=1e-4
    )
    assert metrics["element_refs_after"] == pytest.approx(dict(zip(ELEMENTS, new, strict=True)))

    # The file holds the trainer's in-memory model (the weights of the best epoch).
    assert trainer.potential is not None
    in_memory = POTENTIALS.build("matgl", {"model_path": str(result.checkpoint), "device": "cpu"})
    in_memory._potential = trainer.potential
    for a, b in zip(tuned.predict([ls.atoms for ls in val]), in_memory.predict([ls.atoms for ls in val]),
                    strict=True):  # fmt: skip
        assert a.energy == pytest.approx(b.energy, rel=1e-6)


def test_matgl_keeps_element_refs_when_asked(data, tmp_path: Path) -> None:
    folder = tmp_path / "tensornet"
    tiny_matgl("tensornet").save(folder)
    params = matgl_params(folder, epochs=2, refit_element_refs=False, stress_weight=0.0)
    result = TRAINERS.build("matgl", params).train(data["train"][:3], [], tmp_path / "run")
    assert result.metrics["val_source"].startswith("train_set")
    assert result.metrics["targets"] == "ef"
    assert result.metrics["element_refs_after"] == pytest.approx(
        dict(zip(ELEMENTS, FOUNDATION_E0S, strict=True))
    )
    # Trained without stress, saved with the base's settings (stress still computed).
    from matgl.utils.io import load_model

    assert load_model(result.checkpoint).calc_stresses is True


def test_matgl_refuses_wrong_sha256(data, tmp_path: Path) -> None:
    folder = tmp_path / "tensornet"
    tiny_matgl("tensornet").save(folder)
    with pytest.raises(ChecksumError, match="expected"):
        TRAINERS.build("matgl", matgl_params(folder, model_sha256="f" * 64)).train(
            data["train"], [], tmp_path / "run"
        )


# (No ZBL variant: matgl 4.1's Potential with calc_repuls=True cannot predict at all, its
# repulsion reads a graph.bond_dist that neither TensorNet nor M3GNet sets.)
@pytest.mark.parametrize("architecture", ["tensornet", "m3gnet"])
def test_matgl_linear_correction_recovers_scale(architecture: str, tmp_path: Path) -> None:
    folder = tmp_path / architecture
    tiny_matgl(architecture).save(folder)
    exact = build_matgl(folder, default_dtype="float64")
    refs = dict(zip(ATOMIC_NUMBERS, FOUNDATION_E0S if architecture != "m3gnet" else [0] * 3,
                    strict=True))  # fmt: skip
    train = stiffened(exact, geometries([0, 1, 2, 3, 4, 5]), refs, "t")
    val = stiffened(exact, geometries([6, 7]), refs, "v")
    params = matgl_params(folder, mode="linear_correction")
    del params["learning_rate"], params["batch_size"], params["force_weight"]
    start = time.perf_counter()
    result = TRAINERS.build("matgl", params).train(train, val, tmp_path / "run")
    print(f"matgl {architecture} linear correction: {time.perf_counter() - start:.1f} s")

    metrics = result.metrics
    scale = metrics["linear_correction_scale"]
    print(f"matgl {architecture} linear correction: scale {scale:.9f}")
    assert scale == pytest.approx(1 / SOFTENING, abs=1e-3)
    assert scale == pytest.approx(1 / SOFTENING, rel=1e-6)  # fitted in float64
    assert metrics["mode"] == "linear_correction" and metrics["trainable_parameters"] == 1
    assert metrics["targets"] == "efs"
    assert metrics["train_mae_after"]["f"] < 1e-6 < metrics["train_mae_before"]["f"]
    offsets = {element: OFFSETS[z] for element, z in zip(ELEMENTS, ATOMIC_NUMBERS, strict=True)}
    assert metrics["element_ref_shift_eV"] == pytest.approx(offsets, abs=1e-5)
    assert result.checkpoint == tmp_path / "run" / "matgl_finetuned"
    assert metrics["checkpoint_sha256"] == folder_sha256(result.checkpoint)

    from matgl.utils.io import load_model

    saved = load_model(result.checkpoint)
    assert float(saved.data_std) == pytest.approx(3.0 * scale, rel=1e-6)
    assert float(saved.data_mean) == pytest.approx((0.2 if architecture != "m3gnet" else 0) * scale)
    expected_refs = np.array([refs[z] + OFFSETS[z] for z in ATOMIC_NUMBERS])
    np.testing.assert_allclose(saved.element_refs.property_offset.numpy(), expected_refs, atol=1e-5)

    # Loaded as the daemon loads it (potential_params: float32, like the foundation).
    tuned = POTENTIALS.build(
        "matgl",
        {
            **result.potential_params,
            "model_path": str(result.checkpoint),
            "model_sha256": metrics["checkpoint_sha256"],
            "device": "cpu",
        },
    )
    foundation = build_matgl(folder)
    structures = [geometries([42])[0], *[ls.atoms for ls in val]]
    for atoms, before, after in zip(
        structures, foundation.predict(structures), tuned.predict(structures), strict=True
    ):
        assert np.abs(before.forces).max() > 1e-4  # tiny random models: small forces
        np.testing.assert_allclose(after.forces, 1.25 * before.forces, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(after.stress, 1.25 * before.stress, rtol=1e-4, atol=1e-7)
        e_refs = sum(refs[int(z)] for z in atoms.numbers)
        offset = sum(OFFSETS[int(z)] for z in atoms.numbers)
        expected = e_refs + offset + 1.25 * (before.energy - e_refs)
        assert after.energy == pytest.approx(expected, abs=1e-4)


def test_matgl_full_mode_uses_paper_hyperparameters(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matgl.utils.training as training
    import torch.nn.functional as F

    recorded: list = []

    class Recording(training.PotentialLightningModule):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            recorded.append((kwargs, self))

    monkeypatch.setattr(training, "PotentialLightningModule", Recording)
    folder = tmp_path / "tensornet"
    tiny_matgl("tensornet").save(folder)
    params = {
        "model_path": str(folder),
        "model_sha256": folder_sha256(folder),
        "mode": "full",
        "epochs": 2,
        "batch_size": 2,
        **THREADS,
    }
    start = time.perf_counter()
    result = TRAINERS.build("matgl", params).train(data["train"], data["val"], tmp_path / "run")
    print(f"matgl full, 2 epochs: {time.perf_counter() - start:.1f} s")

    ((kwargs, module),) = recorded
    assert kwargs["loss"] == "mse_loss" and module.loss is F.mse_loss
    assert (kwargs["energy_weight"], kwargs["force_weight"], kwargs["stress_weight"]) == (
        0.1,
        100.0,
        0.1,
    )
    assert kwargs["lr"] == 1e-3
    # matgl's cosine: T_max = decay_steps epochs, down to lr * decay_alpha = 1e-5.
    assert kwargs["decay_steps"] == 1 and kwargs["decay_alpha"] * kwargs["lr"] == 1e-5
    (optimizer,), (scheduler,) = module.configure_optimizers()
    assert type(optimizer).__name__ == "Adam"
    assert type(scheduler).__name__ == "CosineAnnealingLR"

    metrics = result.metrics
    assert metrics["mode"] == "full" and metrics["targets"] == "efs"
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    assert [e["learning_rate"] for e in metrics["epochs"]] == pytest.approx([1e-3, 1e-5])
    assert metrics["selection"] == "lowest validation force MAE"
    val_f = [e["val_mae"]["Force"] for e in metrics["epochs"]]
    assert metrics["best_epoch"] == int(np.argmin(val_f))
    assert metrics["best_val_force_mae"] == min(val_f)
    # Every parameter trains.
    n_params = sum(x.numel() for x in tiny_matgl("tensornet").parameters())
    assert metrics["optimisation"]["trainable_parameters"] == n_params
    tuned = build_matgl(result.checkpoint)
    assert tuned.predict([data["val"][0].atoms])[0].forces.shape == (8, 3)
