"""What TrainerBase decides for every family, without loading a model: the checks before
any model loads, and the choice of the epoch to keep."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from pestle.trainers import TRAINERS, LabelledStructure
from pestle.trainers.base import BestEpoch, best_epoch


def structure(tag: str, labelled: bool = True) -> LabelledStructure:
    atoms = bulk("Si", "diamond", a=5.43)
    if labelled:
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0, forces=np.zeros((2, 3)))
    return LabelledStructure(atoms=atoms, structure_id=f"s-{tag}", label_id=f"l-{tag}")


# A foundation file that does not exist: the checks must fail before anything loads it.
MISSING = {"model_path": "/nonexistent/foundation.model", "trust_model_file": True}


@pytest.mark.parametrize("name, params", [("mace", MISSING), ("matgl", {})])
def test_an_empty_training_set_is_refused_first(name: str, params: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on an empty training set"):
        TRAINERS.build(name, params).train([], [structure("v")], tmp_path)


def test_a_structure_without_labels_is_named_before_any_model_loads(tmp_path: Path) -> None:
    trainer = TRAINERS.build("mace", MISSING)
    with pytest.raises(ValueError, match=r"^val_set: structure s-v \(label l-v\) has no refer"):
        trainer.train([structure("t")], [structure("v", labelled=False)], tmp_path)
    with pytest.raises(FileNotFoundError):  # with labels, the missing file is the error
        trainer.train([structure("t")], [structure("v")], tmp_path)


def test_best_epoch_by_loss_or_force() -> None:
    by_loss, by_force = BestEpoch("custom"), BestEpoch("full")
    records = [(0, 1.0, 0.5), (1, 0.5, 0.6), (2, 0.5, 0.4), (3, math.nan, 0.1), (4, 0.7, None)]
    for epoch, loss, force in records:
        by_loss.offer(epoch, val_loss=loss, val_force_mae=force)
        by_force.offer(epoch, val_loss=loss, val_force_mae=force)
    # The earliest of equal losses; never an epoch whose loss is not finite.
    assert by_loss.epoch == 1 and by_loss.criterion == "lowest validation loss"
    assert by_force.epoch == 2 and by_force.criterion == "lowest validation force MAE"
    nothing = BestEpoch("full")
    assert not nothing.offer(0, val_loss=1.0, val_force_mae=math.inf) and nothing.epoch is None


def test_best_epoch_of_recorded_scores() -> None:
    assert best_epoch({3: 0.2, 1: 0.2, 2: 0.3, 4: math.nan}) == 1
    assert best_epoch({0: math.nan}) is None and best_epoch({}) is None
