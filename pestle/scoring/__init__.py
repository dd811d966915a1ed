"""Scores that say which candidates deserve a reference label.

- ``softening``: the softening scale s fitted per chemical system and sampler kind from the
  labels already stored (model forces against reference forces), with a prior while a group
  has too few labels; a candidate's expected softening error is |1/s - 1| * |F_pred|.
- ``committee``: disagreement between several potentials (force spread, and energy-per-atom
  spread after removing each model's per-element reference energies).
- ``combine``: rank-normalised weighted sum of any scores.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from ase import Atoms

from pestle.evaluation.metrics import softening_scale
from pestle.potentials import Potential, Prediction
from pestle.structures import pressure_gpa


@dataclass(frozen=True)
class SofteningEstimate:
    slope: float
    ci_low: float
    ci_high: float
    n_components: int
    source: str  # "system+sampler", "system" or "prior"

    def as_dict(self) -> dict:
        return asdict(self)


class SofteningModel:
    """Softening scales per chemical system and group of structures, fitted on reference
    labels. A structure belongs to groups from the finest to the coarsest (e.g. its
    sampler and amplitude, then its sampler); a group with fewer than ``min_components``
    labelled force components defers to the next, then to the system, then to a prior."""

    def __init__(
        self,
        fits: Mapping[tuple[str, str | None], SofteningEstimate],
        prior: float = 0.85,
        min_components: int = 30,
    ) -> None:
        self.fits = dict(fits)
        self.prior = prior
        self.min_components = min_components

    @classmethod
    def fit(
        cls,
        potential: Potential,
        labelled: Sequence[tuple[Atoms, str, str | Sequence[str] | None]],
        prior: float = 0.85,
        min_components: int = 30,
    ) -> SofteningModel:
        """``labelled``: (atoms with reference forces in ``atoms.calc``, chemical system,
        its group or groups, finest first). The model's forces come from ``potential``."""
        predicted = potential.predict([atoms for atoms, _, _ in labelled], stress=False)
        pairs: dict[tuple[str, str | None], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        for (atoms, system, groups), prediction in zip(labelled, predicted, strict=True):
            reference = np.asarray(atoms.calc.results["forces"], dtype=float).ravel()
            model = np.asarray(prediction.forces, dtype=float).ravel()
            for group in (*_groups(groups), None):
                pairs[(system, group)].append((model, reference))
        fits = {}
        for (system, group), members in pairs.items():
            fit = softening_scale(
                np.concatenate([m for m, _ in members]), np.concatenate([r for _, r in members])
            )
            source = "system" if group is None else f"system+{group}"
            fits[(system, group)] = SofteningEstimate(
                fit.slope, fit.ci_low, fit.ci_high, fit.n, source
            )
        return cls(fits, prior, min_components)

    def estimate(self, system: str, groups: str | Sequence[str] | None = None) -> SofteningEstimate:
        for group in (*_groups(groups), None):
            fit = self.fits.get((system, group))
            if fit is not None and fit.n_components >= self.min_components and fit.slope > 0:
                return fit
        return SofteningEstimate(self.prior, self.prior, self.prior, 0, "prior")


def _groups(groups: str | Sequence[str] | None) -> tuple[str, ...]:
    if groups is None:
        return ()
    return (groups,) if isinstance(groups, str) else tuple(groups)


def softening_error(force: float, slope: float) -> float:
    """The force error a softening scale implies: the reference force is about F_pred / s,
    so the model misses |1/s - 1| * |F_pred| (eV/A)."""
    return float(abs(1.0 / slope - 1.0) * force)


def expected_softening_error(forces: np.ndarray, slope: float) -> float:
    """``softening_error`` of the atom with the largest predicted force."""
    norms = np.linalg.norm(np.asarray(forces, dtype=float).reshape(-1, 3), axis=1)
    return softening_error(float(norms.max()), slope) if norms.size else 0.0


def _element_reference_residuals(structures: Sequence[Atoms], energies: np.ndarray) -> np.ndarray:
    """Energy per atom minus a least-squares per-element reference fitted on this batch:
    models trained on different data put each element's zero of energy differently."""
    elements = sorted({z for atoms in structures for z in atoms.numbers})
    counts = np.array([[np.count_nonzero(a.numbers == z) for z in elements] for a in structures])
    coefficients, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return (energies - counts @ coefficients) / counts.sum(axis=1)


def committee_disagreement(
    structures: Sequence[Atoms], predictions: Sequence[Sequence[Prediction]]
) -> list[dict[str, float]]:
    """Per structure: ``committee_force`` (largest per-atom norm of the force standard
    deviation across models, eV/A), ``committee_force_mean`` and ``committee_energy``
    (standard deviation of energy per atom across models after removing each model's
    per-element references, eV/atom; needs several structures to be meaningful)."""
    if len(predictions) < 2:
        raise ValueError("a committee needs at least two potentials")
    forces = [np.stack([np.asarray(p.forces) for p in per_structure])
              for per_structure in zip(*predictions, strict=True)]  # fmt: skip
    energies = np.array([[p.energy for p in model] for model in predictions])  # (models, n)
    residuals = np.array([_element_reference_residuals(structures, e) for e in energies])
    energy_spread = residuals.std(axis=0)
    out = []
    for stack, spread in zip(forces, energy_spread, strict=True):
        per_atom = np.linalg.norm(stack.std(axis=0), axis=1)
        out.append(
            {
                "committee_force": float(per_atom.max()),
                "committee_force_mean": float(per_atom.mean()),
                "committee_energy": float(spread),
            }
        )
    return out


def force_scores(atoms: Atoms, prediction: Prediction) -> dict[str, float]:
    """How hard the model pushes the atoms: the first-order proxy for how far from
    equilibrium (and how softened) a structure is."""
    norms = np.linalg.norm(prediction.forces, axis=1)
    scores = {
        "max_force": float(norms.max()),
        "mean_force": float(norms.mean()),
        "energy_per_atom": float(prediction.energy) / len(atoms),
    }
    if prediction.stress is not None and len(prediction.stress) >= 3:
        # Pressure, GPa (positive = compressed): for the candidates' distribution in reports.
        scores["pressure"] = pressure_gpa(prediction.stress)
    return scores


def score_batch(
    structures: Sequence[Atoms],
    potential: Potential,
    committee: Sequence[Potential] = (),
    embeddings: bool = False,
    *,
    pressure: bool = True,
) -> tuple[list[dict[str, float]], list[np.ndarray] | None]:
    """Scores of one batch of candidates (force scores, the committee's spread when there is
    a committee) and the main potential's descriptors when asked. The committee's energy
    spread is relative to per-element references fitted on the batch, so callers score the
    same batches wherever they run."""
    # The main model's pressure feeds the reports' distributions; with CHGNet it makes
    # scoring about 1.6x slower (measured on 64-atom Si), so it can be switched off.
    predictions = potential.predict(structures, stress=pressure)
    scores = [force_scores(a, p) for a, p in zip(structures, predictions, strict=True)]
    if committee:
        others = [member.predict(structures, stress=False) for member in committee]
        spread = committee_disagreement(structures, [predictions, *others])
        scores = [{**s, **extra} for s, extra in zip(scores, spread, strict=True)]
    vectors = potential.embed(structures) if embeddings else None
    return scores, vectors


def rank_normalise(values: Sequence[float]) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share their mean rank): scores in different units
    become comparable, and one outlier cannot dominate the sum."""
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=float)
    if values.size <= 1:
        return np.ones_like(values)
    return (rankdata(values) - 1) / (values.size - 1)


def combine(scores: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> np.ndarray:
    """Rank-normalised weighted sum of the named scores (weights need not sum to 1)."""
    missing = set(weights) - set(scores)
    if missing:
        raise KeyError(f"no scores named {sorted(missing)} (have {sorted(scores)})")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("score weights must sum to a positive number")
    return sum(w * rank_normalise(scores[name]) for name, w in weights.items()) / total
