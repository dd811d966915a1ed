"""Error metrics and the softening scale of a potential against reference (DFT) labels.

The softening scale is the slope of the least-squares line through the origin of model force
components (y) against reference force components (x): 1 means no softening, below 1 means the
model under-predicts forces off equilibrium.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

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
    """Slope of ``model = s * reference`` by least squares through the origin, with the
    component t interval: ``s +/- t * se(s)`` on n - 1 degrees of freedom.

    That interval treats components as independent; the components of one structure are
    correlated (they sum to zero, share one geometry and one model error), so it is far too
    narrow: it covers the true slope in 20-40 % of simulated campaigns at nominal 95 %. It
    is the secondary interval; the one to show and decide on is structure-level
    (``pestle.evaluation.intervals.softening_interval``). Undefined quantities (no data,
    all-zero reference, n = 1 for the interval) are NaN.
    """
    from scipy.special import stdtrit

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
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * se
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


def legacy_metrics(metrics: Any) -> dict[str, Any]:
    """A ``ModelMetrics`` in the per-system shape stored before structure-level intervals
    (``softening`` {slope, ci_low, ci_high, n}, errors as plain floats), for callers not yet
    switched to ``evaluate``. ``ci_low``/``ci_high`` are now the structure-level interval;
    the component t interval is ``component_ci_low``/``component_ci_high``; ``enough`` and
    ``note`` say when there are too few structures; ``intervals`` holds every figure with
    its interval (``Estimate.as_dict``)."""
    from pestle.evaluation.intervals import not_enough_text

    soft = metrics.softening
    return {
        "n_structures": metrics.n_structures,
        "n_force_components": metrics.n_force_components,
        "softening": {
            "slope": soft.value,
            "ci_low": soft.low,
            "ci_high": soft.high,
            "n": soft.n_values,
            "n_structures": soft.n_structures,
            "enough": soft.enough,
            "confidence": soft.confidence,
            "interval": "structure",
            "component_ci_low": soft.component_low,
            "component_ci_high": soft.component_high,
            "note": "" if soft.enough else not_enough_text(soft.n_structures),
        },
        "force_mae": metrics.force_mae.value,
        "force_rmse": metrics.force_rmse.value,
        "energy_mae_per_atom": metrics.energy_mae_per_atom.value,
        "energy_mae_per_atom_offset_removed": metrics.energy_mae_per_atom_offset_removed.value,
        "stress_mae_gpa": metrics.stress_mae_gpa.value,
        "intervals": {name: getattr(metrics, name).as_dict() for name in metrics.ESTIMATES},
        "softening_by_force": [b.as_dict() for b in metrics.softening_by_force],
    }


def evaluate_potential(
    potential: Potential,
    labelled: Sequence[LabelledStructure],
    *,
    min_structures: int | None = None,
    stress: bool = True,
) -> dict[str, dict]:
    """Errors and softening scale per chemical system (e.g. ``"F-Li"``), in the shape of
    ``legacy_metrics``: a thin layer over ``pestle.evaluation.evaluate.evaluate``, kept
    until its callers switch.

    Each entry also holds ``"arrays"`` (numpy arrays of reference and predicted force
    components, and per-atom energies) for plots; drop ``"arrays"`` before storing.
    """
    from pestle.evaluation.evaluate import evaluate
    from pestle.evaluation.intervals import DEFAULT_MIN_STRUCTURES

    if not labelled:
        return {}
    result = evaluate(
        {"model": potential},
        labelled,
        groups=("chemical_system",),
        min_structures=DEFAULT_MIN_STRUCTURES if min_structures is None else min_structures,
        stress=stress,
    )
    out: dict[str, dict] = {}
    for system, group in result.levels["chemical_system"].items():
        arrays = result.arrays("chemical_system", system)
        out[system] = {
            **legacy_metrics(group.models["model"]),
            "arrays": {
                "reference": arrays["reference_forces"],
                "predicted": arrays["forces"]["model"],
                "reference_energy_per_atom": arrays["reference_energy_absolute"],
                "predicted_energy_per_atom": arrays["energy_absolute"]["model"],
            },
        }
    return out
