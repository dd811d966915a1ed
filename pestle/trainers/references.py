"""The reference labels the trainers fit, and per-element reference energies fitted to them.

Another DFT code (or functional) puts energies on another absolute scale than the one a
foundation model learnt; a per-element constant absorbs most of that, so every family shifts
its per-element reference energies (CHGNet's AtomRef, MACE's E0s, matgl's element refs) by a
least-squares fit over compositions before (or while) fitting anything else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms

from pestle.trainers import LabelledStructure, reference_results


def reference_labels(ls: LabelledStructure) -> tuple[float, np.ndarray, np.ndarray | None]:
    """``reference_results``, with no stress for structures that are not periodic in 3D."""
    energy, forces, stress = reference_results(ls)
    if not np.all(ls.atoms.pbc):
        stress = None  # no volume, no stress
    return energy, forces, stress


def composition_matrix(structures: Sequence[Atoms], numbers: Sequence[int]) -> np.ndarray:
    """Atom counts per structure (rows) and element (columns, in ``numbers`` order)."""
    column = {int(z): i for i, z in enumerate(numbers)}
    counts = np.zeros((len(structures), len(numbers)))
    for row, atoms in enumerate(structures):
        for z in atoms.numbers:
            counts[row, column[int(z)]] += 1
    return counts


def least_squares_shift(
    structures: Sequence[Atoms], residuals: Sequence[float], numbers: Sequence[int]
) -> np.ndarray:
    """Per-element energies c minimising |counts @ c - residuals|; the minimum-norm solution,
    so an element absent from ``structures`` gets 0 and elements that always appear in the
    same ratio (Li and F in LiF) share their sum equally."""
    counts = composition_matrix(structures, numbers)
    shift, *_ = np.linalg.lstsq(counts, np.asarray(residuals, dtype=float), rcond=None)
    return shift
