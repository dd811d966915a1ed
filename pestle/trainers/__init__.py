"""Trainers: fine-tune a potential on labelled structures.

Protocol: a registered class with a nested pydantic ``Params`` model,
``train(train_set, val_set, workdir, device) -> TrainedModel`` and ``resources() -> Resources``
(``gpus=1``: runs in a Dask task that asks for a GPU and falls back to the CPU,
``pestle.devices.pick_device``). A trainer whose ``train`` also takes the keyword ``seeds``
(the campaign's seed structures, as ``TrainerBase`` does) gets them from the pipeline, for
replay; the others are called as before.

The built-in families (chgnet, mace, matgl) build on ``base.TrainerBase`` and the shared
modules ``modes``, ``linear`` and ``references``; no trainer module imports another
(tests/test_trainers_layout.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel

from pestle.plugins import Contract, Registry, Resources, import_submodules
from pestle.structures import LabelledStructure


def reference_results(ls: LabelledStructure) -> tuple[float, np.ndarray, np.ndarray | None]:
    """Total energy (eV), forces (eV/A) and ASE Voigt stress (eV/A^3) or None of a label,
    checked for presence and shape; errors name the structure and label."""
    where = f"structure {ls.structure_id} (label {ls.label_id})"
    calc = ls.atoms.calc
    if calc is None:
        raise ValueError(f"{where} has no reference results in atoms.calc")
    results = calc.results
    if results.get("energy") is None or results.get("forces") is None:
        raise ValueError(f"{where} lacks a reference energy or forces")
    forces = np.asarray(results["forces"], dtype=float)
    if forces.shape != (len(ls.atoms), 3):
        raise ValueError(f"{where}: forces have shape {forces.shape}, not ({len(ls.atoms)}, 3)")
    stress = results.get("stress")
    if stress is not None:
        stress = np.asarray(stress, dtype=float)
        if stress.shape == (3, 3):
            stress = np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2],
                               stress[0, 2], stress[0, 1]])  # fmt: skip
        if stress.shape != (6,):
            raise ValueError(f"{where}: stress has shape {stress.shape}, not (6,) or (3, 3)")
    return float(results["energy"]), forces, stress


@dataclass
class TrainedModel:
    checkpoint: Path  # file the matching Potential loads
    potential: str  # registered Potential name that loads it, e.g. "chgnet"
    potential_params: dict[str, Any]  # params for POTENTIALS.build(...) minus the checkpoint
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. final train/val losses


class Trainer(Protocol):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def train(
        self,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        device: str = "cpu",
    ) -> TrainedModel: ...

    def resources(self) -> Resources:
        """What one fine-tune occupies on a worker."""
        ...


TRAINERS: Registry[Trainer] = Registry(
    "trainer", "pestle.trainers", Contract(methods=("train", "resources"))
)

import_submodules(__name__, __path__)  # registration
