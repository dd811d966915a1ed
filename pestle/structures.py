"""Structure identity and serialisation.

A *fingerprint* is a canonical hash of a periodic structure: invariant to atom order and to
wrapping atoms back into the cell, sensitive to any displacement above ``DISTANCE_TOL``.
It keys candidates (deduplication across samplers and runs) and, with a labeller's settings
hash, labels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

# Positions are compared on a 1e-4 Angstrom grid: far below any physical displacement a
# sampler makes, far above floating-point noise from a round trip through the store.
DISTANCE_TOL = 1e-4


@dataclass
class LabelledStructure:
    """Geometry with reference results attached in ``atoms.calc`` (SinglePointCalculator)
    and the ids that tie it to the store."""

    atoms: Atoms
    structure_id: str
    label_id: str


def pressure_gpa(stress: Any) -> float:
    """Pressure in GPa (positive = compressed) of an ASE stress in eV/Å^3 (ASE's sign:
    positive = tensile), Voigt 6 or 3 x 3."""
    from ase import units

    s = np.asarray(stress, dtype=float)
    diagonal = np.diag(s) if s.shape == (3, 3) else s.ravel()[:3]
    return -float(np.mean(diagonal)) / units.GPa


def chemical_system(atoms: Atoms) -> str:
    """Materials Project style chemical system, e.g. ``F-Li``."""
    return "-".join(sorted(set(atoms.get_chemical_symbols())))


def reduced_formula(atoms: Atoms) -> str:
    from pymatgen.core import Composition

    return Composition(atoms.get_chemical_formula()).reduced_formula


def fingerprint(atoms: Atoms) -> str:
    cell = np.asarray(atoms.cell.array, dtype=float)
    if atoms.pbc.all():
        frac = atoms.get_scaled_positions(wrap=True)
        # Snap to the grid in Cartesian units, then wrap 1.0 to 0.0 so that an atom sitting
        # on the boundary hashes the same whichever side float noise puts it.
        lengths = np.maximum(atoms.cell.lengths(), 1e-12)
        grid = np.rint(frac * lengths / DISTANCE_TOL).astype(np.int64)
        grid = np.mod(grid, np.rint(lengths / DISTANCE_TOL).astype(np.int64))
    else:
        grid = np.rint(atoms.positions / DISTANCE_TOL).astype(np.int64)
    numbers = atoms.numbers.astype(np.int64)
    rows = np.column_stack([numbers, grid])
    rows = rows[np.lexsort(rows.T[::-1])]
    cell_grid = np.rint(cell / DISTANCE_TOL).astype(np.int64)
    digest = hashlib.sha256()
    digest.update(cell_grid.tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=np.int8).tobytes())
    digest.update(rows.tobytes())
    return digest.hexdigest()[:32]


def atoms_to_dict(atoms: Atoms) -> dict[str, Any]:
    """Plain JSON/BSON-safe form of the geometry (no calculator, no arrays beyond positions)."""
    return {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
        "pbc": [bool(p) for p in atoms.pbc],
    }


def atoms_from_dict(data: dict[str, Any]) -> Atoms:
    return Atoms(
        numbers=data["numbers"],
        positions=data["positions"],
        cell=data["cell"],
        pbc=data["pbc"],
    )


def settings_hash(settings: dict[str, Any]) -> str:
    """Stable hash of a JSON-serialisable settings mapping (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
