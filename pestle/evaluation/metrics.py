"""Error metrics and the softening scale of a potential against reference (DFT) labels.

The softening scale is the slope of the least-squares line through the origin of model force
components (y) against reference force components (x): 1 means no softening, below 1 means the
model under-predicts forces off equilibrium.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pestle.structures import chemical_system

if TYPE_CHECKING:
    from pestle.potentials import Potential
    from pestle.trainers import LabelledStructure


@dataclass
class SofteningFit:
    slope: float
    ci_low: float
    ci_high: float
    n: int  # force components in the fit

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _paired(model: Any, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(model, dtype=float).ravel()
    x = np.asarray(reference, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"model has {y.size} components, reference has {x.size}")
    return y, x


def softening_scale(
    model_forces: Any, reference_forces: Any, confidence: float = 0.95
) -> SofteningFit:
    """Slope of ``model = s * reference`` by least squares through the origin.

    The interval is ``s +/- t * se(s)`` with a Student t quantile on n - 1 degrees of
    freedom. It treats components as independent; components of one structure are
    correlated (they sum to zero), so read it as a lower bound on the real uncertainty.
    Undefined quantities (no data, all-zero reference, n = 1 for the interval) are NaN.
    """
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y, x = _paired(model_forces, reference_forces)
    n = int(x.size)
    sxx = float(x @ x)
    if n == 0 or sxx == 0.0:
        return SofteningFit(math.nan, math.nan, math.nan, n)
    slope = float(x @ y) / sxx
    if n < 2:
        return SofteningFit(slope, math.nan, math.nan, n)
    residual = y - slope * x
    se = math.sqrt(float(residual @ residual) / (n - 1) / sxx)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return SofteningFit(slope, slope - half, slope + half, n)


def force_mae(model_forces: Any, reference_forces: Any) -> float:
    """Mean absolute error over force components (eV/A)."""
    y, x = _paired(model_forces, reference_forces)
    return float(np.mean(np.abs(y - x))) if x.size else math.nan


def force_rmse(model_forces: Any, reference_forces: Any) -> float:
    """Root-mean-square error over force components (eV/A)."""
    y, x = _paired(model_forces, reference_forces)
    return float(np.sqrt(np.mean((y - x) ** 2))) if x.size else math.nan


def energy_mae_per_atom(
    model_energies: Any, reference_energies: Any, n_atoms: Sequence[int] | np.ndarray
) -> float:
    """Mean over structures of |E_model - E_ref| / n_atoms (eV/atom), from total energies."""
    y, x = _paired(model_energies, reference_energies)
    counts = np.asarray(n_atoms, dtype=float).ravel()
    if counts.shape != x.shape:
        raise ValueError(f"{x.size} energies but {counts.size} atom counts")
    return float(np.mean(np.abs(y - x) / counts)) if x.size else math.nan


def energy_mae_per_atom_offset_removed(
    model_energies: Any, reference_energies: Any, n_atoms: Sequence[int] | np.ndarray
) -> float:
    """Energy MAE (eV/atom) after removing the mean per-atom offset between model and
    reference. Two codes (VASP-trained CHGNet, GPAW) put the zero of energy in different
    places; only relative energies can be compared across them."""
    y, x = _paired(model_energies, reference_energies)
    if not x.size:
        return math.nan
    difference = (y - x) / np.asarray(n_atoms, dtype=float).ravel()
    return float(np.mean(np.abs(difference - difference.mean())))


def evaluate_potential(
    potential: Potential, labelled: Sequence[LabelledStructure]
) -> dict[str, dict]:
    """Errors and softening scale per chemical system (e.g. ``"F-Li"``).

    Each entry holds JSON-friendly scalars plus ``"arrays"`` (numpy arrays of reference and
    predicted force components, and per-atom energies) for plots; drop ``"arrays"`` before
    storing. Energy MAE compares absolute energies, so it means something only when the
    model's reference energies were refit to the labeller's scale; it is reported anyway.
    """
    groups: dict[str, list[LabelledStructure]] = defaultdict(list)
    for ls in labelled:
        groups[chemical_system(ls.atoms)].append(ls)

    predictions = potential.predict([ls.atoms for ls in labelled])
    by_id = {id(ls): pred for ls, pred in zip(labelled, predictions, strict=True)}

    out: dict[str, dict] = {}
    for system in sorted(groups):
        members = groups[system]
        ref_f, pred_f = [], []
        ref_e, pred_e, counts = [], [], []
        for ls in members:
            results = ls.atoms.calc.results if ls.atoms.calc is not None else {}
            pred = by_id[id(ls)]
            if results.get("forces") is not None:
                ref_f.append(np.asarray(results["forces"], dtype=float).ravel())
                pred_f.append(np.asarray(pred.forces, dtype=float).ravel())
            if results.get("energy") is not None:
                ref_e.append(float(results["energy"]))
                pred_e.append(float(pred.energy))
                counts.append(len(ls.atoms))
        reference = np.concatenate(ref_f) if ref_f else np.empty(0)
        predicted = np.concatenate(pred_f) if pred_f else np.empty(0)
        n_atoms = np.asarray(counts, dtype=float)
        out[system] = {
            "n_structures": len(members),
            "n_force_components": int(reference.size),
            "softening": softening_scale(predicted, reference).as_dict(),
            "force_mae": force_mae(predicted, reference),
            "force_rmse": force_rmse(predicted, reference),
            "energy_mae_per_atom": energy_mae_per_atom(pred_e, ref_e, n_atoms),
            "energy_mae_per_atom_offset_removed": energy_mae_per_atom_offset_removed(
                pred_e, ref_e, n_atoms
            ),
            "arrays": {
                "reference": reference,
                "predicted": predicted,
                "reference_energy_per_atom": np.asarray(ref_e) / n_atoms if counts else n_atoms,
                "predicted_energy_per_atom": np.asarray(pred_e) / n_atoms if counts else n_atoms,
            },
        }
    return out
