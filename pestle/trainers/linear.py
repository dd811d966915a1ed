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
from typing import Any, Literal

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


# -- one scale per chemical system or per element -------------------------------------------
#
# One model-wide scale cannot fix systems that soften differently (pretrained CHGNet is soft
# on LiF and stiff on Si in the same campaign). The same closed-form fit generalises to one
# scale per *group*: the non-reference energy is split into parts, one per group, and each
# part gets its own scale. A group is a chemical system (a structure's whole non-reference
# energy is its system's part) or an element (the part is the sum of the site energies of
# that element's atoms, and its forces and stress are that sum's derivatives, so forces and
# stress stay exact gradients of the corrected energy).

Scope = Literal["model", "system", "element"]


@dataclass
class ScaleTerms:
    """``terms`` (labels, element references, totals) with the non-reference energy, forces
    and stress split into one column per group (``groups``); ``*_rest`` is the part of groups
    not fitted (scale 1; zero on the set the scales are fitted on). ``systems``: the chemical
    system of each structure, for per-system figures and the refusal of one model-wide
    scale."""

    terms: LinearTerms
    groups: list[str]
    e_by: np.ndarray  # (structures, groups), eV/atom
    f_by: np.ndarray  # (force components, groups)
    s_by: np.ndarray  # (stress components, groups)
    systems: list[str]
    e_rest: np.ndarray | None = None
    f_rest: np.ndarray | None = None
    s_rest: np.ndarray | None = None

    @classmethod
    def by_system(
        cls, terms: LinearTerms, systems: Sequence[str], groups: Sequence[str] | None = None
    ) -> ScaleTerms:
        """One group per chemical system (``groups``: the fitted ones, default every system
        in ``systems``; a structure of another system goes to the unscaled rest). Needs
        only the totals, so every family has it."""
        groups = sorted(set(systems)) if groups is None else list(groups)
        column = {g: k for k, g in enumerate(groups)}
        n = len(systems)
        e_by = np.zeros((n, len(groups)))
        f_by = np.zeros((terms.f_net.size, len(groups)))
        s_by = np.zeros((terms.s_net.size, len(groups)))
        e_rest, f_rest, s_rest = np.zeros(n), np.zeros(terms.f_net.size), np.zeros(terms.s_net.size)
        f_at, s_at = np.cumsum([0, *terms.n_forces]), np.cumsum([0, *terms.n_stresses])
        for i, system in enumerate(systems):
            fs, ss = slice(f_at[i], f_at[i + 1]), slice(s_at[i], s_at[i + 1])
            k = column.get(system)
            if k is None:
                e_rest[i], f_rest[fs], s_rest[ss] = terms.e_net[i], terms.f_net[fs], terms.s_net[ss]
            else:
                e_by[i, k], f_by[fs, k], s_by[ss, k] = (
                    terms.e_net[i],
                    terms.f_net[fs],
                    terms.s_net[ss],
                )
        return cls(terms, groups, e_by, f_by, s_by, list(systems), e_rest, f_rest, s_rest)

    @classmethod
    def model_wide(cls, terms: LinearTerms, systems: Sequence[str]) -> ScaleTerms:
        return cls(terms, ["model"], terms.e_net[:, None], terms.f_net[:, None],
                   terms.s_net[:, None], list(systems))  # fmt: skip

    @property
    def n_structures(self) -> int:
        return len(self.systems)

    def predictions(self, scales: np.ndarray, shift: np.ndarray | None) -> dict[str, np.ndarray]:
        t = self.terms
        energy = t.e_refs + self.e_by @ scales + _or_zero(self.e_rest, t.e_net.shape)
        if shift is not None:
            energy = energy + t.features @ shift
        return {
            "e": energy,
            "f": self.f_by @ scales + _or_zero(self.f_rest, t.f_net.shape),
            "s": self.s_by @ scales + _or_zero(self.s_rest, t.s_net.shape),
        }

    def maes(self, scales: np.ndarray, shift: np.ndarray | None) -> dict[str, float | None]:
        predicted = self.predictions(scales, shift)
        return {
            key: float(np.mean(np.abs(predicted[key] - ref))) if ref.size else None
            for key, ref in self.terms.references().items()
        }

    def system_force_maes(self, scales: np.ndarray) -> dict[str, float]:
        """Force MAE per chemical system (pooled over its structures' components)."""
        predicted = self.predictions(scales, None)["f"]
        at = np.cumsum([0, *self.terms.n_forces])
        errors: dict[str, list[np.ndarray]] = {}
        for i, system in enumerate(self.systems):
            part = slice(at[i], at[i + 1])
            errors.setdefault(system, []).append(np.abs(predicted[part] - self.terms.f_ref[part]))
        return {s: float(np.mean(np.concatenate(e))) for s, e in sorted(errors.items())}

    def structures(self, keep: Sequence[int]) -> ScaleTerms:
        """The terms of the structures ``keep`` (indices), in that order."""
        t = self.terms
        f_at, s_at = np.cumsum([0, *t.n_forces]), np.cumsum([0, *t.n_stresses])
        f_idx = np.concatenate([np.arange(f_at[i], f_at[i + 1]) for i in keep] or [[]]).astype(int)
        s_idx = np.concatenate([np.arange(s_at[i], s_at[i + 1]) for i in keep] or [[]]).astype(int)
        keep = list(keep)
        sub = LinearTerms(
            e_ref=t.e_ref[keep], e_refs=t.e_refs[keep], e_net=t.e_net[keep],
            features=t.features[keep], f_ref=t.f_ref[f_idx], f_net=t.f_net[f_idx],
            s_ref=t.s_ref[s_idx], s_net=t.s_net[s_idx],
            n_forces=[t.n_forces[i] for i in keep], n_stresses=[t.n_stresses[i] for i in keep],
        )  # fmt: skip
        return ScaleTerms(
            sub, list(self.groups), self.e_by[keep], self.f_by[f_idx], self.s_by[s_idx],
            [self.systems[i] for i in keep],
            None if self.e_rest is None else self.e_rest[keep],
            None if self.f_rest is None else self.f_rest[f_idx],
            None if self.s_rest is None else self.s_rest[s_idx],
        )  # fmt: skip


def _or_zero(values: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape) if values is None else values


@dataclass
class ScaleFit:
    """Fitted scales per group with structure-level intervals (leave-one-structure-out
    jackknife, t quantile on n - 1 degrees of freedom, n the structures that inform the
    group), the element-reference shift (or None) and what the fit saw."""

    scope: str
    groups: list[str]
    scales: np.ndarray
    shift: np.ndarray | None
    low: np.ndarray
    high: np.ndarray
    n_structures: list[int]  # per group: structures with a non-zero part of it
    confidence: float
    ridge: float

    def as_dict(self) -> dict[str, dict[str, float | int | None]]:
        return {
            g: {
                "scale": float(s),
                "low": _finite_or_none(lo),
                "high": _finite_or_none(hi),
                "n_structures": n,
            }
            for g, s, lo, hi, n in zip(
                self.groups, self.scales, self.low, self.high, self.n_structures, strict=True
            )
        }

    def text(self, group: str) -> str:
        k = self.groups.index(group)
        interval = (
            f" [{self.low[k]:.3f}, {self.high[k]:.3f}]"
            if np.isfinite(self.low[k]) and np.isfinite(self.high[k])
            else " [interval undefined: fewer than 2 structures]"
        )
        return f"{group} {self.scales[k]:.3f}{interval}"


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _solve_scales(
    st: ScaleTerms, weights: dict[str, float], refit_references: bool, ridge: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Weighted least squares over (scales, reference shift), the loss of
    ``fit_linear_scale`` with one scale per group, plus ``ridge`` times each scale's own
    curvature times (s - 1)^2: negligible where the labels determine a scale, and it keeps
    a scale the labels barely see (two elements always in the same ratio, whose split the
    forces hardly resolve) near 1 instead of wherever noise puts it."""
    t = st.terms
    k = len(st.groups)
    n_shift = t.features.shape[1] if refit_references else 0
    blocks, targets = [], []

    def add(rows: np.ndarray, target: np.ndarray, weight: float, shift_rows: np.ndarray | None):
        if not target.size or not weight:
            return
        w = np.sqrt(weight / target.size)
        extra = shift_rows if shift_rows is not None else np.zeros((target.size, n_shift))
        blocks.append(w * np.hstack([rows, extra[:, :n_shift]]))
        targets.append(w * target)

    e_target = t.e_ref - t.e_refs - _or_zero(st.e_rest, t.e_ref.shape)
    add(st.e_by, e_target, weights["e"], t.features if refit_references else None)
    add(st.f_by, t.f_ref - _or_zero(st.f_rest, t.f_ref.shape), weights["f"], None)
    add(st.s_by, t.s_ref - _or_zero(st.s_rest, t.s_ref.shape), weights.get("s", 0.0), None)
    if not blocks:
        raise ValueError("linear_correction has nothing to fit: no labels with weight")
    a, y = np.vstack(blocks), np.concatenate(targets)
    curvature = np.einsum("ij,ij->j", a[:, :k], a[:, :k])
    if not np.all(curvature > 0):
        empty = [g for g, c in zip(st.groups, curvature, strict=True) if not c > 0]
        raise ValueError(
            f"linear_correction cannot fit a scale for {', '.join(empty)}: the model "
            "predicts no forces, stresses or energy differences for it on the training set"
        )
    if ridge > 0:
        penalty = np.zeros((k, k + n_shift))
        penalty[:, :k] = np.diag(np.sqrt(ridge * curvature))
        a = np.vstack([a, penalty])
        y = np.concatenate([y, np.sqrt(ridge * curvature)])
    solution, *_ = np.linalg.lstsq(a, y, rcond=None)
    scales = solution[:k]
    if not refit_references:
        return scales, None
    # The minimum-norm shift at these scales (zero for elements absent from the labels), as
    # ``fit_linear_scale`` gives it.
    residual = t.e_ref - st.predictions(scales, None)["e"]
    return scales, np.linalg.pinv(t.features) @ residual


def fit_scales(
    st: ScaleTerms,
    weights: dict[str, float],
    *,
    refit_references: bool,
    scope: str,
    ridge: float = 0.0,
    confidence: float = 0.95,
) -> ScaleFit:
    """One scale per group of ``st`` (and the reference shift), fitted jointly in closed
    form, with a structure-level interval per scale: the leave-one-structure-out jackknife
    (close to the CR3 cluster-robust variance, conservative with few structures; the
    structures are the independent unit, not the force components), t quantile on n - 1
    degrees of freedom where n is the number of structures the group appears in."""
    from scipy import stats

    scales, shift = _solve_scales(st, weights, refit_references, ridge)
    present = [
        [i for i in range(st.n_structures) if _touches(st, i, k)] for k in range(len(st.groups))
    ]
    replicates = []
    for drop in range(st.n_structures):
        keep = [i for i in range(st.n_structures) if i != drop]
        try:
            replicates.append(_solve_scales(st.structures(keep), weights, refit_references,
                                            ridge)[0])  # fmt: skip
        except (ValueError, np.linalg.LinAlgError):
            replicates.append(np.full(len(st.groups), np.nan))
    reps = np.asarray(replicates).reshape(st.n_structures, len(st.groups))
    low, high = np.full(len(st.groups), np.nan), np.full(len(st.groups), np.nan)
    for k, members in enumerate(present):
        n = len(members)
        values = reps[members, k]
        if n < 2 or not np.all(np.isfinite(values)):
            continue
        se = float(np.sqrt((n - 1) / n * np.sum((values - values.mean()) ** 2)))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
        low[k], high[k] = scales[k] - half, scales[k] + half
    return ScaleFit(scope, list(st.groups), scales, shift, low, high,
                    [len(m) for m in present], confidence, ridge)  # fmt: skip


def _touches(st: ScaleTerms, i: int, k: int) -> bool:
    at = np.cumsum([0, *st.terms.n_forces])
    return bool(st.e_by[i, k] != 0 or np.any(st.f_by[at[i] : at[i + 1], k] != 0))


class DisagreeingScales(ValueError):
    """One model-wide scale was asked for where the systems need different ones."""


def check_one_scale(per_system: ScaleFit) -> None:
    """Refuse one model-wide scale when two chemical systems' own fitted scales disagree
    beyond their intervals (the intervals do not overlap): the message names every system
    with its scale and interval, and the pairs that disagree."""
    groups = per_system.groups
    pairs = [
        (a, b)
        for i, a in enumerate(groups)
        for b in groups[i + 1 :]
        if _apart(per_system, groups.index(a), groups.index(b))
    ]
    if not pairs:
        return
    listed = "; ".join(per_system.text(g) for g in groups)
    apart = ", ".join(f"{a} vs {b}" for a, b in pairs)
    raise DisagreeingScales(
        f"refusing one model-wide linear-correction scale: the chemical systems' own fitted "
        f"scales disagree beyond their {100 * per_system.confidence:.0f}% intervals ({listed}; "
        f"no overlap: {apart}). One scale would over-correct one system and under-correct "
        "another; use linear_scope: system or element."
    )


def _apart(fit: ScaleFit, i: int, j: int) -> bool:
    lo, hi = fit.low, fit.high
    if not all(np.isfinite(v) for v in (lo[i], hi[i], lo[j], hi[j])):
        return False  # an undefined interval shows no disagreement
    return bool(hi[i] < lo[j] or hi[j] < lo[i])


def scale_metrics(
    fit: ScaleFit,
    train: ScaleTerms,
    val: ScaleTerms | None,
    weights: dict[str, float],
) -> dict[str, Any]:
    """What a scoped linear correction reports: its scales with intervals, MAEs before and
    after (overall and per system's forces)."""
    ones = np.ones(len(fit.groups))
    return {
        "linear_scope": fit.scope,
        "linear_scales": fit.as_dict(),
        "linear_scale_confidence": fit.confidence,
        "linear_ridge": fit.ridge,
        "loss_weights": weights,
        "train_mae_before": train.maes(ones, None),
        "train_mae_after": train.maes(fit.scales, fit.shift),
        "val_mae_before": val.maes(ones, None) if val is not None else None,
        "val_mae_after": val.maes(fit.scales, fit.shift) if val is not None else None,
        "train_force_mae_by_system_before": train.system_force_maes(ones),
        "train_force_mae_by_system_after": train.system_force_maes(fit.scales),
        "epochs": [],
        "best_epoch": None,
        "best_val_loss": None,
        "selection": f"closed-form weighted least squares (one scale per {fit.scope})",
        "trainable_parameters": len(fit.groups),
    }


def check_scaled(
    after: LinearTerms, expected: ScaleTerms, fit: ScaleFit, *, rtol: float = 1e-4,
    atol: float = 1e-4,
) -> None:  # fmt: skip
    """The saved scaled model predicts on one structure (``after``: its totals) what the fit
    assumed (``expected``: that structure's split terms)."""
    want = expected.predictions(fit.scales, fit.shift)
    got = np.concatenate([after.e_refs + after.e_net, after.f_net, after.s_net])
    wanted = np.concatenate([want["e"], want["f"], want["s"]])
    if got.shape != wanted.shape or not np.allclose(got, wanted, rtol=rtol, atol=atol):
        worst = np.max(np.abs(got - wanted)) if got.shape == wanted.shape else np.nan
        raise RuntimeError(
            f"the saved model with per-{fit.scope} scales does not predict what the fit "
            f"assumed (largest deviation {worst:.3g})"
        )
