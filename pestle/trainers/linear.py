"""The linear correction of Deng et al. (2025) (``mode: linear_correction``): one scale ``s``
on the model's energy without its per-element reference energies, so forces and stress scale
by ``s`` too, everything else frozen. Every prediction is linear in ``s`` (and in a
per-element reference shift), so the weighted least-squares optimum has a closed form
(:func:`fit_linear_scale`), the point gradient descent on ``s`` alone would converge to. The
trainers bake it into the model, so the checkpoint is an ordinary model of its family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase.stress import voigt_6_to_full_3x3_stress

from pestle.trainers import LabelledStructure
from pestle.trainers.references import reference_labels


@dataclass
class LinearTerms:
    """What the linear correction needs of a data set, in the units of the family's loss:
    energies per atom (eV/atom), forces (eV/A) and 3x3 stresses (times ``stress_factor``:
    1 for eV/A^3, 1/units.GPa for GPa). ``e_refs`` is the model's element-reference energy,
    ``e_net`` the rest of its energy (the part the scale multiplies), ``features`` the element
    fractions (columns in the order of the model's elements). Stresses are kept only where a
    label has one."""

    e_ref: np.ndarray
    e_refs: np.ndarray
    e_net: np.ndarray
    features: np.ndarray
    f_ref: np.ndarray
    f_net: np.ndarray
    s_ref: np.ndarray
    s_net: np.ndarray
    n_forces: list[int]  # force components per structure, to pick out the first ones
    n_stresses: list[int]

    @classmethod
    def collect(
        cls,
        potential: Any,
        labelled: Sequence[LabelledStructure],
        numbers: Sequence[int],
        references: Sequence[float],
        stress_factor: float = 1.0,
    ) -> LinearTerms:
        """``potential``: a pestle Potential of the model (float64 where the family allows);
        ``references``: its per-element reference energies (eV/atom, ``numbers`` order)."""
        column = {int(z): i for i, z in enumerate(numbers)}
        refs = np.asarray(references, dtype=float)
        preds = potential.predict([ls.atoms for ls in labelled])
        e_ref, e_refs, e_net, features = [], [], [], []
        f_ref, f_net, s_ref, s_net, n_forces, n_stresses = [], [], [], [], [], []
        for ls, pred in zip(labelled, preds, strict=True):
            energy, forces, stress = reference_labels(ls)
            counts = np.zeros(len(numbers))
            for z in ls.atoms.numbers:
                counts[column[int(z)]] += 1
            n_atoms = counts.sum()
            reference_energy = float(counts @ refs)
            e_ref.append(energy / n_atoms)
            e_refs.append(reference_energy / n_atoms)
            e_net.append((pred.energy - reference_energy) / n_atoms)
            features.append(counts / n_atoms)
            f_ref.append(forces.ravel())
            f_net.append(np.asarray(pred.forces, dtype=float).ravel())
            n_forces.append(forces.size)
            if stress is not None and pred.stress is not None:
                s_ref.append(voigt_6_to_full_3x3_stress(stress).ravel() * stress_factor)
                s_net.append(voigt_6_to_full_3x3_stress(pred.stress).ravel() * stress_factor)
                n_stresses.append(9)
            else:
                n_stresses.append(0)
        return cls(
            e_ref=np.asarray(e_ref),
            e_refs=np.asarray(e_refs),
            e_net=np.asarray(e_net),
            features=np.asarray(features).reshape(len(e_ref), len(numbers)),
            f_ref=joined_arrays(f_ref),
            f_net=joined_arrays(f_net),
            s_ref=joined_arrays(s_ref),
            s_net=joined_arrays(s_net),
            n_forces=n_forces,
            n_stresses=n_stresses,
        )

    def predictions(self, scale: float, shift: np.ndarray | None) -> dict[str, np.ndarray]:
        """Per-atom energies, forces and stresses after scaling the non-reference energy by
        ``scale`` and shifting the element references by ``shift`` (eV/atom per element)."""
        energy = self.e_refs + scale * self.e_net
        if shift is not None:
            energy = energy + self.features @ shift
        return {"e": energy, "f": scale * self.f_net, "s": scale * self.s_net}

    def references(self) -> dict[str, np.ndarray]:
        return {"e": self.e_ref, "f": self.f_ref, "s": self.s_ref}

    def loss(self, scale: float, shift: np.ndarray | None, weights: dict[str, float]) -> float:
        """The weighted MSE loss over the whole set as one batch."""
        predicted = self.predictions(scale, shift)
        total = 0.0
        for key, ref in self.references().items():
            if ref.size and weights[key]:
                total += weights[key] * float(np.mean((predicted[key] - ref) ** 2))
        return total

    def maes(self, scale: float, shift: np.ndarray | None) -> dict[str, float | None]:
        predicted = self.predictions(scale, shift)
        return {
            key: float(np.mean(np.abs(predicted[key] - ref))) if ref.size else None
            for key, ref in self.references().items()
        }


def joined_arrays(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(float) if parts else np.empty(0)


def fit_linear_scale(
    terms: LinearTerms, weights: dict[str, float], refit_references: bool
) -> tuple[float, np.ndarray | None]:
    """The scale ``s`` (and, with ``refit_references``, the per-element reference shift
    ``c``) minimising ``w_e mean(r_e^2) + w_f mean(r_f^2) + w_s mean(r_s^2)`` with

        r_e = e_ref - (e_refs + X c + s e_net),  r_f = F_ref - s F_net,  r_s = S_ref - s S_net

    (energies per atom, X the element fractions). The loss is a convex quadratic in the
    unknowns, so its stationary point is the global minimum, the point gradient descent on
    ``s`` alone (everything else frozen) converges to on the same full-batch loss.

    With the references refitted, minimising over ``c`` first projects the energy residual
    off the span of the compositions (P = I - X X^+): only energy differences between
    structures inform ``s``, and an absolute offset between codes goes entirely into the
    references instead of biasing the scale. That is the joint optimum; refitting the
    references at s = 1 and then fitting ``s`` with them held would let ``s`` absorb part of
    the offset. ``c`` is then the minimum-norm least-squares fit at that ``s`` (zero for
    elements absent from the labels)."""
    a = terms.e_ref - terms.e_refs
    b = terms.e_net
    if refit_references:
        x = terms.features
        projector = np.eye(len(a)) - x @ np.linalg.pinv(x)
        a, b = projector @ a, projector @ b

    def mean_weight(key: str, size: int) -> float:
        return weights[key] / size if size else 0.0

    w_e = mean_weight("e", a.size)
    w_f = mean_weight("f", terms.f_ref.size)
    w_s = mean_weight("s", terms.s_ref.size)
    numerator = w_e * a @ b + w_f * terms.f_ref @ terms.f_net + w_s * terms.s_ref @ terms.s_net
    denominator = w_e * b @ b + w_f * terms.f_net @ terms.f_net + w_s * terms.s_net @ terms.s_net
    if not denominator > 0:
        raise ValueError(
            "linear_correction cannot fit a scale: the model predicts zero forces and stresses "
            "(and no energy differences) on the training set"
        )
    scale = float(numerator / denominator)
    if not refit_references:
        return scale, None
    residual = terms.e_ref - terms.e_refs - scale * terms.e_net
    shift = np.linalg.pinv(terms.features) @ residual
    return scale, shift


def check_baked(
    after: LinearTerms,
    before: LinearTerms,
    scale: float,
    shift: np.ndarray | None,
    *,
    what: str,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> None:
    """The baked model predicts on the first training structure what the fit assumed.
    ``after``: the terms of that structure collected from the baked (or saved and reloaded)
    model; ``before``: the training set's terms the scale was fitted on. Guards against a
    model whose energy is more than element references plus the part we scaled."""
    want = before.predictions(scale, shift)
    n_f, n_s = before.n_forces[0], before.n_stresses[0]
    got = np.concatenate([after.e_refs + after.e_net, after.f_net, after.s_net])
    expected = np.concatenate([want["e"][:1], want["f"][:n_f], want["s"][:n_s]])
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=rtol, atol=atol):
        worst = np.max(np.abs(got - expected)) if got.shape == expected.shape else np.nan
        raise RuntimeError(
            f"baking the linear-correction scale {scale:.5f} into the {what} did not scale "
            f"its predictions as assumed (largest deviation {worst:.3g}); this version's "
            "energy may not be element references + the scaled part"
        )


def linear_metrics(
    train: LinearTerms,
    val: LinearTerms | None,
    scale: float,
    shift: np.ndarray | None,
    weights: dict[str, float],
) -> dict[str, Any]:
    """Losses and MAEs before and after the correction, as the CHGNet trainer reports them."""
    return {
        "linear_correction_scale": scale,
        "loss_weights": weights,
        "train_loss_before": train.loss(1.0, None, weights),
        "train_loss_after": train.loss(scale, shift, weights),
        "train_mae_before": train.maes(1.0, None),
        "train_mae_after": train.maes(scale, shift),
        "val_mae_before": val.maes(1.0, None) if val is not None else None,
        "val_mae_after": val.maes(scale, shift) if val is not None else None,
        "epochs": [],
        "best_epoch": None,
        "best_val_loss": None,
        "selection": "closed-form weighted least squares (one scale)",
        "trainable_parameters": 1,
    }
