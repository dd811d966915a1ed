"""Fine-tuning real CHGNet on labels stiffer than itself moves its softening scale towards 1.

Labels are CHGNet 0.3.0 itself stiffened by 1/0.8: E = E0 + (E_model - E0) / 0.8 around the
ideal crystal's energy E0, so forces and stress are exactly the model's divided by 0.8 and the
pretrained model's softening scale on them is exactly 0.8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from pestle.evaluation.metrics import evaluate_potential, softening_scale
from pestle.potentials import POTENTIALS
from pestle.potentials.checkpoints import sha256_file
from pestle.potentials.chgnet import CHGNetPotential
from pestle.trainers import TRAINERS, LabelledStructure
from pestle.trainers.chgnet import CHECKPOINT_NAME, CHGNetTrainer

SOFTENING = 0.8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base() -> CHGNetPotential:
    return POTENTIALS.build("chgnet", {"device": "cpu"})


def stiff_label(base: CHGNetPotential, atoms: Atoms, ideal: Atoms, tag: str) -> LabelledStructure:
    e0 = base.predict([ideal])[0].energy
    pred = base.predict([atoms])[0]
    atoms.calc = SinglePointCalculator(
        atoms,
        energy=e0 + (pred.energy - e0) / SOFTENING,
        forces=pred.forces / SOFTENING,
        stress=pred.stress / SOFTENING,
    )
    return LabelledStructure(atoms=atoms, structure_id=f"s-{tag}", label_id=f"l-{tag}")


def rattled_si(base: CHGNetPotential, seeds: range | list[int]) -> list[LabelledStructure]:
    ideal = bulk("Si", "diamond", a=5.43, cubic=True)
    out = []
    for seed in seeds:
        atoms = ideal.copy()
        atoms.rattle(0.08, seed=seed)
        out.append(stiff_label(base, atoms, ideal, f"si{seed}"))
    return out


def test_finetune_moves_softening_towards_one(base: CHGNetPotential, tmp_path: Path) -> None:
    train = rattled_si(base, range(4))
    (held_out,) = rattled_si(base, [99])
    reference = held_out.atoms.calc.results["forces"]
    before = softening_scale(base.predict([held_out.atoms])[0].forces, reference)
    assert before.slope == pytest.approx(SOFTENING, abs=1e-6)

    trainer = TRAINERS.build("chgnet", {"epochs": 5, "seed": 0})
    result = trainer.train(train, [], tmp_path)

    assert result.checkpoint == tmp_path / CHECKPOINT_NAME
    assert result.potential == "chgnet"
    metrics = result.metrics
    assert len(metrics["epochs"]) == 5
    assert metrics["val_source"].startswith("train_set")
    assert metrics["targets"] == "efs"
    assert set(metrics["atom_ref_shift_eV_per_atom"]) == {"Si"}
    assert metrics["checkpoint_sha256"] == sha256_file(result.checkpoint)
    assert all(np.isfinite(e["val_loss"]) for e in metrics["epochs"])
    assert result.hyperparameters["freeze"] == "embeddings"

    tuned = POTENTIALS.build(
        result.potential,
        {
            **result.potential_params,
            "checkpoint": str(result.checkpoint),
            "checkpoint_sha256": metrics["checkpoint_sha256"],
            "device": "cpu",
        },
    )
    after = softening_scale(tuned.predict([held_out.atoms])[0].forces, reference)
    assert after.slope > before.slope + 0.1, (before, after)
    assert after.ci_low > SOFTENING

    # The file holds exactly the trainer's in-memory model.
    assert isinstance(trainer, CHGNetTrainer) and trainer.model is not None
    in_memory = CHGNetPotential(CHGNetPotential.Params(device="cpu"))
    in_memory._model = trainer.model
    for a, b in zip(
        tuned.predict([held_out.atoms, *[ls.atoms for ls in train]]),
        in_memory.predict([held_out.atoms, *[ls.atoms for ls in train]]),
        strict=True,
    ):
        assert a.energy == b.energy
        np.testing.assert_array_equal(a.forces, b.forces)
        np.testing.assert_array_equal(a.stress, b.stress)

    # evaluate_potential groups by chemical system and sees the same softening.
    lif = bulk("LiF", "rocksalt", a=4.03, cubic=True)
    rattled = lif.copy()
    rattled.rattle(0.05, seed=7)
    labelled = [held_out, stiff_label(base, rattled, lif, "lif")]
    report = evaluate_potential(base, labelled)
    assert set(report) == {"F-Li", "Si"}
    si = report["Si"]
    assert si["n_structures"] == 1 and si["n_force_components"] == 24
    assert si["softening"]["slope"] == pytest.approx(SOFTENING, abs=1e-6)
    assert si["force_mae"] > 0 and si["force_rmse"] >= si["force_mae"]
    assert si["arrays"]["reference"].shape == si["arrays"]["predicted"].shape == (24,)
    assert report["F-Li"]["softening"]["slope"] == pytest.approx(SOFTENING, abs=1e-6)


def test_same_seed_same_model(base: CHGNetPotential, tmp_path: Path) -> None:
    train = rattled_si(base, [11, 12])
    val = rattled_si(base, [13])
    params = {"epochs": 1, "seed": 3, "batch_size": 1, "freeze": "all_but_readout"}
    runs = [TRAINERS.build("chgnet", params) for _ in range(2)]
    results = [run.train(train, val, tmp_path / str(i)) for i, run in enumerate(runs)]
    assert results[0].metrics["val_source"] == "val_set"
    assert results[0].metrics["epochs"] == results[1].metrics["epochs"]
    first, second = (run.model.state_dict() for run in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # all_but_readout leaves fewer weights trainable than the default.
    assert results[0].metrics["trainable_parameters"] < 412_525 / 2


# --- Deng et al. (2025) modes: linear_correction and full -------------------------------


def split_energy(base: CHGNetPotential, atoms: Atoms) -> tuple[float, float]:
    """CHGNet's total energy of ``atoms`` split into its AtomRef composition part and the
    network part (eV)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    model = base.load_model()
    graph = model.graph_converter(AseAtomsAdaptor.get_structure(atoms.copy()))
    with torch.no_grad():
        composition = float(model.composition_model([graph])) * len(atoms)
    return composition, base.predict([atoms])[0].energy - composition


def scaled_label(
    base: CHGNetPotential, atoms: Atoms, tag: str, offset_per_atom: dict[str, float] | None = None
) -> LabelledStructure:
    """Labels of a model whose network part is CHGNet's divided by SOFTENING:
    E = E_composition + E_net / 0.8 (plus an optional per-element offset, as another DFT code
    would put it), forces and stress / 0.8."""
    pred = base.predict([atoms])[0]
    composition, net = split_energy(base, atoms)
    offset = sum((offset_per_atom or {}).get(s, 0.0) for s in atoms.get_chemical_symbols())
    atoms.calc = SinglePointCalculator(
        atoms,
        energy=composition + net / SOFTENING + offset,
        forces=pred.forces / SOFTENING,
        stress=pred.stress / SOFTENING,
    )
    return LabelledStructure(atoms=atoms, structure_id=f"s-{tag}", label_id=f"l-{tag}")


def rattled(formula: str, structure: str, a: float, seed: int, amplitude: float = 0.08) -> Atoms:
    atoms = bulk(formula, structure, a=a, cubic=True)
    atoms.rattle(amplitude, seed=seed)
    return atoms


def load_tuned(result) -> CHGNetPotential:
    return POTENTIALS.build(
        result.potential,
        {
            **result.potential_params,
            "checkpoint": str(result.checkpoint),
            "checkpoint_sha256": result.metrics["checkpoint_sha256"],
            "device": "cpu",
        },
    )


def test_mode_params() -> None:
    params = CHGNetTrainer.Params
    assert params().mode == "custom" and params().force_weight == 1.0  # unchanged defaults
    full = params(mode="full")
    assert (full.energy_weight, full.force_weight, full.stress_weight) == (0.1, 100.0, 0.1)
    assert (full.learning_rate, full.epochs, full.freeze) == (1e-3, 100, "none")
    assert params(mode="full", epochs=7).epochs == 7
    linear = params(mode="linear_correction")
    assert (linear.energy_weight, linear.force_weight, linear.stress_weight) == (0.1, 100, 0.1)
    # Recorded hyperparameters rebuild the same Params.
    assert params(**full.model_dump()) == full
    assert params(**linear.model_dump()) == linear
    with pytest.raises(ValueError, match="fixes force_weight"):
        params(mode="full", force_weight=1.0)
    with pytest.raises(ValueError, match="fixes freeze"):
        params(mode="full", freeze="embeddings")
    with pytest.raises(ValueError, match="epochs do not apply"):
        params(mode="linear_correction", epochs=3)


def test_linear_correction_recovers_scale(base: CHGNetPotential, tmp_path: Path) -> None:
    train = [
        scaled_label(base, rattled("Si", "diamond", 5.43, seed), f"si{seed}") for seed in (1, 2)
    ] + [scaled_label(base, rattled("LiF", "rocksalt", 4.03, 3, 0.05), "lif3")]
    held_out = rattled("Si", "diamond", 5.43, 42, amplitude=0.12)
    original = base.predict([held_out, *[ls.atoms for ls in train]])

    trainer = TRAINERS.build("chgnet", {"mode": "linear_correction"})
    result = trainer.train(train, [], tmp_path / "same")
    metrics = result.metrics
    assert (
        metrics["mode"] == "linear_correction"
        and result.hyperparameters["mode"] == "linear_correction"
    )
    assert metrics["linear_scale"] == pytest.approx(1 / SOFTENING, abs=1e-3)
    assert metrics["trainable_parameters"] == 1
    assert metrics["train_mae_after"]["f"] < 1e-3 < metrics["train_mae_before"]["f"]
    assert metrics["train_loss_after"] < metrics["train_loss_before"]
    # Labels at CHGNet's own level of theory: the references stay put.
    assert all(abs(v) < 1e-3 for v in metrics["atom_ref_shift_eV_per_atom"].values())

    # The checkpoint is an ordinary CHGNet whose network part is 1.25 x the original's.
    tuned = load_tuned(result)
    scale = metrics["linear_scale"]
    for atoms, before, after in zip(
        [held_out, *[ls.atoms for ls in train]],
        original,
        tuned.predict([held_out, *[ls.atoms for ls in train]]),
        strict=True,
    ):
        np.testing.assert_allclose(after.forces, scale * before.forces, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(after.forces, before.forces / SOFTENING, rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(after.stress, scale * before.stress, rtol=1e-4, atol=1e-7)
        composition, net = split_energy(base, atoms)
        assert after.energy == pytest.approx(composition + scale * net, abs=1e-3)
    # On held-out labels 1/0.8 stiffer, the softening scale goes from 0.8 to 1.
    stiff = original[0].forces / SOFTENING
    after = softening_scale(tuned.predict([held_out])[0].forces, stiff)
    assert after.slope == pytest.approx(1.0, abs=1e-3)
    assert softening_scale(original[0].forces, stiff).slope == pytest.approx(SOFTENING)

    # Another code's energy zero (a per-element offset) goes into the references, not the
    # scale: refs and scale are fitted jointly.
    offset = {"Si": 0.7, "Li": -0.3, "F": 0.2}
    shifted = [scaled_label(base, ls.atoms.copy(), f"o{i}", offset) for i, ls in enumerate(train)]
    other = TRAINERS.build("chgnet", {"mode": "linear_correction"}).train(
        shifted, train[:1], tmp_path / "offset"
    )
    assert other.metrics["linear_scale"] == pytest.approx(1 / SOFTENING, abs=1e-3)
    shift = other.metrics["atom_ref_shift_eV_per_atom"]
    assert shift["Si"] == pytest.approx(0.7, abs=1e-3)
    # One LiF composition fixes only Li + F (AtomRef's min-norm split between them).
    assert shift["Li"] + shift["F"] == pytest.approx(-0.1, abs=2e-3)
    assert other.metrics["val_mae_after"]["f"] < 1e-3


class RecordingTrainer:
    """chgnet's Trainer, recording what pestle passes it and the learning rate it ends on."""

    instances: list = []

    def __init__(self, base_class):
        self.base_class = base_class

    def __call__(self, *args, **kwargs):
        import copy

        recorded = copy.deepcopy({k: v for k, v in kwargs.items() if k != "model"})
        instance = self.base_class(*args, **kwargs)
        instance.recorded = recorded
        instance.train_calls = []
        original_train = instance.train

        def train(*a, **k):
            instance.train_calls.append(k)
            return original_train(*a, **k)

        instance.train = train
        self.instances.append(instance)
        return instance


def test_full_mode_uses_paper_hyperparameters(
    base: CHGNetPotential, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chgnet.trainer

    recorder = RecordingTrainer(chgnet.trainer.Trainer)
    monkeypatch.setattr(chgnet.trainer, "Trainer", recorder)
    ideal = bulk("Si", "diamond", a=5.43)  # 2-atom primitive cell
    structures = []
    for seed in range(3):
        atoms = ideal.copy()
        atoms.rattle(0.05, seed=seed)
        structures.append(stiff_label(base, atoms, ideal, f"tiny{seed}"))

    trainer = TRAINERS.build("chgnet", {"mode": "full", "epochs": 2})
    result = trainer.train(structures[:2], structures[2:], tmp_path)

    (chgnet_trainer,) = recorder.instances
    passed = chgnet_trainer.recorded
    assert passed["energy_loss_ratio"] == 0.1
    assert passed["force_loss_ratio"] == 100.0
    assert passed["stress_loss_ratio"] == 0.1
    assert (passed["optimizer"], passed["criterion"], passed["scheduler"]) == (
        "Adam",
        "MSE",
        "CosLR",
    )
    assert passed["learning_rate"] == 1e-3 and passed["epochs"] == 2
    assert passed["scheduler_params"] == {"decay_fraction": pytest.approx(1e-2)}
    assert passed["targets"] == "efs"
    # Every parameter trains, the composition model included.
    assert all(call["train_composition_model"] for call in chgnet_trainer.train_calls)
    assert len(chgnet_trainer.train_calls) == 2
    n_params = sum(x.numel() for x in trainer.model.parameters())
    assert result.metrics["trainable_parameters"] == n_params
    # The cosine reaches 1e-5 on the last step, whatever the number of batches.
    assert chgnet_trainer.scheduler.eta_min == pytest.approx(1e-5)
    assert chgnet_trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)

    metrics = result.metrics
    assert metrics["mode"] == "full" and result.hyperparameters["mode"] == "full"
    assert result.hyperparameters["force_weight"] == 100.0
    assert len(metrics["epochs"]) == 2
    assert metrics["selection"] == "lowest validation force MAE"
    val_f = [e["val_mae"]["f"] for e in metrics["epochs"]]
    assert metrics["best_epoch"] == int(np.argmin(val_f))
    assert metrics["best_val_force_mae"] == min(val_f)
    assert metrics["optimisation"]["learning_rate_end"] == 1e-5
    assert load_tuned(result).predict([structures[2].atoms])[0].forces.shape == (2, 3)
