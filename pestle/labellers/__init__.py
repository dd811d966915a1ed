"""Labellers: reference (DFT or other) energies, forces and stresses for one structure.

Protocol: a registered class with a nested pydantic ``Params`` model, picklable (it travels
to Dask workers), with
- ``level_of_theory() -> dict``: everything that defines the numbers (code and version,
  functional, cutoff, k-points, smearing, setups...). Its hash keys labels, so the same
  structure at the same level of theory is never computed twice.
- ``label(atoms, workdir) -> LabelResult``: raises ``LabelError`` for a calculation that
  ran but must not become a label (SCF not converged, unparsable output).
- ``resources() -> Resources``: what one calculation occupies on a Dask worker (cores).
- ``convergence_settings() -> tuple[ConvergenceSetting, ...]``: the numerical settings whose
  convergence the labels depend on (a plane-wave cutoff, a k-point density), each with its
  configured value and how to raise it; ``()`` when there is nothing to converge (EMT, a
  potential). ``with_setting(name, value) -> Labeller``: a copy with one of them changed.
  Optionally ``basis_error(symbols, value) -> {element: eV per atom}``: an estimate, from the
  element's pseudopotential, of the energy missing at cutoff ``value`` (names the element a
  failed cutoff check blames). pestle/labellers/convergence.py uses them.
- ``energy_convention(level_of_theory) -> dict`` (a staticmethod; optional): which energy the
  labels hold, from a stored label's level of theory (see :func:`energy_convention`); the
  exports write it beside every label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from ase import Atoms
from pydantic import BaseModel

from pestle.plugins import (
    Contract,
    Registry,
    RegistryError,
    Resources,
    accepts_any_structures,
    import_submodules,
)
from pestle.structures import settings_hash


class LabelError(RuntimeError):
    """A calculation finished without a trustworthy result (e.g. SCF not converged)."""


@dataclass
class LabelResult:
    energy: float  # eV, total
    forces: np.ndarray  # (n, 3) eV/A
    stress: np.ndarray | None  # (6,) Voigt eV/A^3, ASE order and sign
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. scf iterations, magmoms


@dataclass(frozen=True)
class ConvergenceSetting:
    """One numerical setting a labeller's numbers converge in, and its ladder of raised values.

    Each rung is the previous value times ``factor`` (below 1 for a spacing, which is raised
    by making it smaller), rounded away from the previous value to a multiple of ``quantum``;
    the ladder ends at ``limit``."""

    name: str  # parameter name, as with_setting takes it: "ecut"
    field: str  # the config field a user edits: "labeller.params.ecut"
    value: float  # the configured value
    unit: str  # "eV", "per Å⁻¹" (k-points per reciprocal length), "1/Å" (a k-spacing)
    kind: Literal["basis", "sampling"]  # basis: an element can be at fault; sampling: the BZ
    factor: float  # one rung up multiplies the value by this
    quantum: float  # rungs are multiples of this
    limit: float  # no rung beyond this
    description: str = ""  # "plane-wave cutoff"
    # A plane-wave kinetic-energy cutoff: the stress it leaves out (Pulay stress) follows from
    # how the energy changes with it, which the convergence gate estimates.
    plane_wave_cutoff: bool = False

    def next_value(self, value: float) -> float | None:
        """The rung above ``value``, or None past the limit."""
        target = value * self.factor
        steps = target / self.quantum
        rounded = math.ceil(steps - 1e-9) if self.factor > 1 else math.floor(steps + 1e-9)
        out = float(round(rounded * self.quantum, 10))
        if out == value:  # rounding must never stand still
            out = float(round(value + math.copysign(self.quantum, self.factor - 1), 10))
        beyond = out > self.limit if self.factor > 1 else out < self.limit
        return None if beyond else out


class Labeller(Protocol):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def level_of_theory(self) -> dict[str, Any]: ...

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult: ...

    def check_structures(self, structures: Sequence[Atoms]) -> None:
        """Raise ValueError when this labeller cannot handle these structures (e.g. elements it
        has no parameters for). Run on the seeds before a run starts; optional (the default
        accepts any)."""

    def resources(self) -> Resources: ...

    def convergence_settings(self) -> tuple[ConvergenceSetting, ...]: ...

    def with_setting(self, name: str, value: float) -> Labeller: ...


def level_of_theory_hash(labeller: Labeller) -> str:
    return settings_hash(labeller.level_of_theory())


# The energy a label holds, in ``energy_convention``:
#   free          the Mermin free energy E - TS at the stated smearing: the energy the forces
#                 and stress are derivatives of (ASE's force_consistent=True, VASP's TOTEN)
#   extrapolated  extrapolated to zero smearing (ASE's default energy, VASP's energy(sigma->0))
#   total         no electronic smearing involved (a classical or machine-learned potential)
#   unknown       a labeller that does not say
ENERGY_CONVENTIONS = ("free", "extrapolated", "total", "unknown")
# The keys exports write (flat, so every format can carry them: extxyz info, ase.db
# key-value pairs, CHGNet JSON entries); smearing keys only where there is smearing.
ENERGY_KEYS = ("energy_convention", "energy_code", "energy_smearing", "energy_smearing_width")


def convention(kind: str, code: str, smearing: str | None = None,
               width: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The ``ENERGY_KEYS`` mapping of one convention (``width`` in eV)."""
    if kind not in ENERGY_CONVENTIONS:
        raise ValueError(f"unknown energy convention {kind!r} (known: {ENERGY_CONVENTIONS})")
    out: dict[str, Any] = {"energy_convention": kind, "energy_code": code}
    if smearing is not None:
        out["energy_smearing"] = smearing
    if width is not None:
        out["energy_smearing_width"] = float(width)
    return out


def _unknown_energy_convention(level_of_theory: dict[str, Any]) -> dict[str, Any]:
    """The default for a labeller that does not declare its energy."""
    return convention("unknown", str(level_of_theory.get("code") or "unknown"))


def energy_convention(labeller: str, level_of_theory: dict[str, Any]) -> dict[str, Any]:
    """Which energy labels of ``labeller`` at ``level_of_theory`` hold (``ENERGY_KEYS``):
    what a stored label says about itself, for the exports. A labeller no longer installed
    gives ``unknown``."""
    try:
        cls = LABELLERS.get(labeller)
    except RegistryError:
        return _unknown_energy_convention(level_of_theory)
    return cls.energy_convention(level_of_theory)


def _nothing_to_converge(self: Any) -> tuple[ConvergenceSetting, ...]:
    """The default for a labeller that declares no numerical settings (the gate passes)."""
    return ()


def _no_settings(self: Any, name: str, value: float) -> Labeller:
    raise ValueError(f"labeller {self.name!r} has no setting {name!r} to change")


LABELLERS: Registry[Labeller] = Registry(
    "labeller",
    "pestle.labellers",
    Contract(
        methods=("level_of_theory", "label", "resources", "convergence_settings", "with_setting"),
        defaults={
            "convergence_settings": _nothing_to_converge,
            "with_setting": _no_settings,
            "check_structures": accepts_any_structures,
            "energy_convention": staticmethod(_unknown_energy_convention),
        },
    ),
)

import_submodules(__name__, __path__)  # registration
