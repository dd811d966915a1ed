"""Trainers: fine-tune a potential on labelled structures.

Protocol: a registered class with a nested pydantic ``Params`` model and
``train(train_set, val_set, workdir) -> TrainedModel``. Runs inside a Dask task that asks for
a GPU and falls back to the CPU (``pestle.dispatch.pick_device``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ase import Atoms
from pydantic import BaseModel

from pestle.registry import Registry, import_submodules


@dataclass
class LabelledStructure:
    """Geometry with reference results attached in ``atoms.calc`` (SinglePointCalculator)
    and the ids that tie it to the store."""

    atoms: Atoms
    structure_id: str
    label_id: str


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


TRAINERS: Registry[Trainer] = Registry("trainer")

import_submodules(__name__, __path__)  # registration
