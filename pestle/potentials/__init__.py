"""Potentials: batched energies, forces and stresses from a machine-learned model.

Units follow ASE: energy in eV (total), forces in eV/Angstrom, stress in eV/Angstrom^3 as a
Voigt 6-vector in ASE order (xx, yy, zz, yz, xz, xy), sign convention of ASE (positive = tensile).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from ase import Atoms
from pydantic import BaseModel

from pestle.plugins import Contract, PluginSpec, Registry, accepts_any_structures, import_submodules


@dataclass
class Prediction:
    energy: float
    forces: np.ndarray  # (n_atoms, 3)
    stress: np.ndarray | None  # (6,) Voigt, eV/A^3


class Potential(Protocol):
    """What the engine asks of a potential. Declarations a class leaves out take the
    protocol's defaults on registration (``supports_embeddings = False``,
    ``checkpoint_params = None``)."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    # True: ``embed`` gives a descriptor per structure (for diversity selection).
    supports_embeddings: ClassVar[bool]
    # (param holding a checkpoint path, param holding its digest) when the family loads
    # checkpoints written by its trainer; then ``checkpoint_digest`` says how to digest one.
    checkpoint_params: ClassVar[tuple[str, str] | None]
    # Whether loading a checkpoint may unpickle arbitrary objects: "never" (tensors and
    # plain data only), "fallback" (only a file that is not plain, and only when its digest
    # is given), "always" (the format is a full pickle). Undeclared: "always". A stored
    # model of a family that may unpickle loads only with a valid signature (store/signing).
    checkpoint_unpickles: ClassVar[str]
    # Params that waive checkpoint verification (``trust_model_file``): never taken from
    # the store's copy of a model's params.
    trust_params: ClassVar[tuple[str, ...]]

    def predict(self, structures: Sequence[Atoms], *, stress: bool = True) -> list[Prediction]:
        """``stress=False``: leave stresses out (``None``); scoring needs only energies and
        forces, and the strain derivative is a large share of a forward pass."""
        ...

    def describe(self) -> dict:
        """Identity of the model for provenance: family, version/checkpoint, checksum."""
        ...

    def check_structures(self, structures: Sequence[Atoms]) -> None:
        """Raise ValueError when this potential cannot handle these structures (e.g. elements it
        has no parameters for). Run on the seeds before a run starts; optional (the default
        accepts any)."""

    def embed(self, structures: Sequence[Atoms]) -> list[np.ndarray]:
        """A descriptor per structure; only promised when ``supports_embeddings`` is True."""
        ...

    @classmethod
    def checkpoint_digest(cls, path: Path) -> str:
        """The digest the ``checkpoint_params`` digest param expects for ``path`` (a file's
        sha256, or a folder digest). Only promised when ``checkpoint_params`` is set."""
        ...


POTENTIAL_CONTRACT = Contract(
    methods=("predict", "describe"),
    defaults={
        "supports_embeddings": False,
        "checkpoint_params": None,
        "checkpoint_unpickles": "always",
        "trust_params": (),
        "check_structures": accepts_any_structures,
    },  # fmt: skip
    promises={"supports_embeddings": ("embed",), "checkpoint_params": ("checkpoint_digest",)},
)


class LazyModel:
    """Shared plumbing of potentials that load their model on first use: the device chosen
    once from ``params.device``, and pickling (Dask ships instances to workers) that sends
    the settings, never the loaded weights (``_transient`` is reset) or the locks
    (``_locks`` are made anew)."""

    _transient: ClassVar[tuple[str, ...]] = ("_model", "_device")
    _locks: ClassVar[tuple[str, ...]] = ("_lock",)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(dict.fromkeys(self._transient))
        for name in self._locks:
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in self._locks:
            setattr(self, name, threading.Lock())

    @property
    def device(self) -> str:
        if self._device is None:
            from pestle.devices import pick_device

            self._device = pick_device(self.params.device)
        return self._device


POTENTIALS: Registry[Potential] = Registry("potential", "pestle.potentials", POTENTIAL_CONTRACT)


def checkpoint_spec(name: str, params: Mapping[str, Any], path: str | Path) -> PluginSpec:
    """The spec of potential ``name`` loading the checkpoint at ``path``: ``params`` with the
    path and its digest (as the family computes it) in the params the class declares."""
    cls = POTENTIALS.get(name)
    if cls.checkpoint_params is None:
        raise ValueError(
            f"potential {name!r} declares no checkpoint_params: it loads no checkpoints"
        )
    path_key, digest_key = cls.checkpoint_params
    digest = cls.checkpoint_digest(Path(path))
    return PluginSpec(name=name, params={**params, path_key: str(path), digest_key: digest})


def from_checkpoint(name: str, params: Mapping[str, Any], path: str | Path) -> Potential:
    """Potential ``name`` with ``params``, loading the checkpoint at ``path`` (its digest is
    recorded in the params, so the potential verifies the file before deserialising it)."""
    return POTENTIALS.build_spec(checkpoint_spec(name, params, path))


import_submodules(__name__, __path__)  # registration
