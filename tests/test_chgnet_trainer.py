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
from pestle.potentials.chgnet import CHGNetPotential, sha256_file
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
