"""Physical sanity checks every candidate passes before it is stored.

A rattle at a large amplitude can push two atoms almost on top of each other; such a
structure costs a DFT calculation that will not converge and teaches the model nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list


def check_structure(
    atoms: Atoms, min_distance_fraction: float = 0.5, max_atoms: int = 512
) -> str | None:
    """Why ``atoms`` is not a usable candidate, or None if it is.

    Rejects: too many atoms, non-finite positions, a degenerate cell, and any pair closer than
    ``min_distance_fraction`` times the sum of their covalent radii.
    """
    if len(atoms) == 0:
        return "no atoms"
    if len(atoms) > max_atoms:
        return f"{len(atoms)} atoms exceed the limit of {max_atoms}"
    if not np.all(np.isfinite(atoms.positions)):
        return "non-finite positions"
    if atoms.pbc.any():
        volume = abs(atoms.cell.volume) if atoms.cell.rank == 3 else 0.0
        if volume < 1e-3 * len(atoms):
            return f"degenerate cell (volume {volume:.3g} A^3)"
    radii = covalent_radii[atoms.numbers]
    cutoff = float(2 * radii.max() * min_distance_fraction)
    first, second, distances = neighbor_list("ijd", atoms, cutoff)
    if len(distances):
        allowed = min_distance_fraction * (radii[first] + radii[second])
        too_close = distances < allowed
        if too_close.any():
            k = int(np.argmax(allowed - distances))
            return (
                f"atoms {first[k]} ({atoms[first[k]].symbol}) and {second[k]} "
                f"({atoms[second[k]].symbol}) are {distances[k]:.2f} A apart, below "
                f"{min_distance_fraction} x the sum of covalent radii ({allowed[k]:.2f} A)"
            )
    return None


def check_within_limits(atoms: Atoms, limits: Any) -> str | None:
    """``check_structure`` with a campaign's ``limits`` (``LimitsSpec``: ``max_atoms``,
    ``min_distance_fraction``): the one check seeds and candidates pass."""
    return check_structure(atoms, limits.min_distance_fraction, limits.max_atoms)
