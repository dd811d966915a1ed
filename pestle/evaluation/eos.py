"""Equation of state: an energy-volume scan of a seed, a third-order Birch-Murnaghan fit
(V0, E0, B0, B0') with intervals, and a model's fit against a reference (DFT) fit.

The scan scales the seed cell isotropically (fractional coordinates fixed) over volumes
``(1 - volume_range) V .. (1 + volume_range) V``: the same structures for the model and the
reference, so the reference labels are computed once and reused for every model version.
Internal coordinates are not relaxed, which is exact for crystals without free internal
parameters (diamond, rock salt, fcc, bcc) and an approximation otherwise.

Uncertainty: the least-squares covariance of the four parameters, scaled by the residual
variance of the fit, with Student-t quantiles on n - 4 degrees of freedom. The points of one
scan are not random draws: the residuals are the Birch-Murnaghan form's misfit plus numerical
noise (SCF, basis), and the covariance turns exactly that misfit into an interval: a scan the
form describes well gives a narrow interval, a ragged or too-wide one a wide interval. The t
quantile accounts for estimating the residual scale from a handful of points. A leave-one-out
jackknife of B0 is reported beside it as a check on a single point's leverage (with 7 points
it is dominated by the end points, so it is not used for the interval). Model-to-reference
ratios combine the two fits' relative errors in quadrature on a log scale (independent fits)
with the t quantile of the smaller of their degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from ase import Atoms, units

from pestle.structures import pressure_gpa

if TYPE_CHECKING:
    from pestle.potentials import Potential

MIN_POINTS = 5  # four parameters and at least one degree of freedom for an interval


def eos_structures(seed: Atoms, *, volume_range: float = 0.08, points: int = 7) -> list[Atoms]:
    """``points`` copies of ``seed`` scaled isotropically to volumes evenly spaced over
    ``[1 - volume_range, 1 + volume_range]`` times the seed's; ``info["volume_scale"]``
    holds the factor. Deterministic."""
    if not 0 < volume_range < 0.5:
        raise ValueError(f"volume_range must be in (0, 0.5), got {volume_range}")
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    if not seed.pbc.all():
        raise ValueError("an equation of state needs a periodic seed")
    out = []
    for scale in np.linspace(1 - volume_range, 1 + volume_range, points):
        atoms = Atoms(seed.numbers, seed.positions, cell=seed.cell, pbc=True)
        atoms.set_cell(seed.cell.array * scale ** (1 / 3), scale_atoms=True)
        atoms.info["volume_scale"] = float(scale)
        out.append(atoms)
    return out


def birch_murnaghan(volume: Any, e0: float, v0: float, b0: float, b0_prime: float) -> Any:
    """Third-order Birch-Murnaghan energy (units of e0 and of b0 * v0)."""
    eta = (v0 / np.asarray(volume, dtype=float)) ** (2 / 3) - 1
    return e0 + 9 * v0 * b0 / 16 * (eta**3 * b0_prime + eta**2 * (6 - 4 * (eta + 1)))


Status = Literal["ok", "too_few_points", "fit_failed", "minimum_outside_scan"]


@dataclass
class EOSFit:
    """Birch-Murnaghan fit of a scan, per atom. ``ok`` only for status "ok"; otherwise the
    numbers that exist are kept and ``message`` says what is wrong."""

    status: Status
    message: str
    n_points: int
    volumes: list[float]  # Å^3/atom, the points used
    energies: list[float]  # eV/atom
    v0: float = math.nan  # Å^3/atom
    e0: float = math.nan  # eV/atom
    b0: float = math.nan  # GPa
    b0_prime: float = math.nan
    v0_se: float = math.nan
    e0_se: float = math.nan
    b0_se: float = math.nan  # GPa
    b0_prime_se: float = math.nan
    b0_jackknife_se: float = math.nan  # GPa, leave-one-out, a leverage check
    dof: int = 0
    confidence: float = 0.95
    v0_interval: tuple[float, float] = (math.nan, math.nan)
    b0_interval: tuple[float, float] = (math.nan, math.nan)  # GPa
    rms_residual: float = math.nan  # eV/atom

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _t(confidence: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, dof)) if dof > 0 else math.inf


def _least_squares(v: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parameters (e0, v0 [Å^3], b0 [eV/Å^3], b0') and their covariance; raises
    RuntimeError when the data have no minimum or the fit does not converge."""
    from scipy.optimize import curve_fit

    a, b, c = np.polyfit(v, e, 2)
    if a <= 0:
        raise RuntimeError("the energies do not curve upwards: no minimum to fit")
    v_guess = -b / (2 * a)
    guess = [c - b * b / (4 * a), v_guess, 2 * a * v_guess, 4.0]
    with np.errstate(all="ignore"):
        params, cov = curve_fit(birch_murnaghan, v, e, p0=guess, maxfev=20000)
    if not np.all(np.isfinite(params)) or params[2] <= 0 or params[1] <= 0:
        raise RuntimeError(f"fit ended at unphysical parameters {params.tolist()}")
    return params, cov


def fit_birch_murnaghan(
    volumes: Sequence[float],
    energies: Sequence[float],
    *,
    confidence: float = 0.95,
    min_points: int = MIN_POINTS,
) -> EOSFit:
    """Fit E(V) (per atom, or any consistent normalisation: B0 is unchanged) by least
    squares. Non-finite points are dropped. Outcomes other than "ok": fewer than
    ``min_points`` points, a fit that fails or lands on unphysical parameters, or an
    equilibrium volume outside the scanned range (an extrapolated B0)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    v = np.asarray(volumes, dtype=float).ravel()
    e = np.asarray(energies, dtype=float).ravel()
    if v.shape != e.shape:
        raise ValueError(f"{v.size} volumes but {e.size} energies")
    keep = np.isfinite(v) & np.isfinite(e)
    v, e = v[keep], e[keep]
    order = np.argsort(v)
    v, e = v[order], e[order]
    n = int(v.size)
    base = {"n_points": n, "volumes": v.tolist(), "energies": e.tolist(), "confidence": confidence}
    if n < max(min_points, MIN_POINTS):
        return EOSFit(
            status="too_few_points",
            message=f"not enough points: {n} (need at least {max(min_points, MIN_POINTS)} "
            "for four parameters and an interval)",
            **base,
        )
    try:
        params, cov = _least_squares(v, e)
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
        return EOSFit(status="fit_failed", message=f"fit failed: {exc}", **base)
    e0, v0, b0, bp = (float(p) for p in params)
    se = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else np.full(4, np.nan)
    dof = n - 4
    t = _t(confidence, dof)
    residual = e - birch_murnaghan(v, *params)
    gpa = units.GPa
    jackknife = []
    for drop in range(n):
        mask = np.arange(n) != drop
        try:
            jackknife.append(_least_squares(v[mask], e[mask])[0][2])
        except (RuntimeError, ValueError, np.linalg.LinAlgError):
            continue
    jack_se = (
        math.sqrt((len(jackknife) - 1) / len(jackknife) * np.sum((np.array(jackknife) - np.mean(jackknife)) ** 2))
        / gpa
        if len(jackknife) >= 3
        else math.nan
    )  # fmt: skip
    fit = EOSFit(
        status="ok",
        message="",
        v0=v0,
        e0=e0,
        b0=b0 / gpa,
        b0_prime=bp,
        v0_se=float(se[1]),
        e0_se=float(se[0]),
        b0_se=float(se[2]) / gpa,
        b0_prime_se=float(se[3]),
        b0_jackknife_se=jack_se,
        dof=dof,
        v0_interval=(v0 - t * float(se[1]), v0 + t * float(se[1])),
        b0_interval=((b0 - t * float(se[2])) / gpa, (b0 + t * float(se[2])) / gpa),
        rms_residual=float(np.sqrt(np.mean(residual**2))),
        **base,
    )
    if not v[0] <= v0 <= v[-1]:
        fit.status = "minimum_outside_scan"
        fit.message = (
            f"the fitted equilibrium volume {v0:.3f} Å^3/atom lies outside the scan "
            f"[{v[0]:.3f}, {v[-1]:.3f}]: B0 is an extrapolation; widen volume_range or centre "
            "the scan on this model's equilibrium"
        )
    return fit


# ---------------------------------------------------------------------------------------------
# Scans


def potential_scan(potential: Potential, structures: Sequence[Atoms], **fit_options: Any) -> EOSFit:
    """Fit of a potential's energies on the scan structures (no stresses asked for)."""
    predictions = potential.predict(list(structures), stress=False)
    return fit_birch_murnaghan(
        [a.get_volume() / len(a) for a in structures],
        [p.energy / len(a) for p, a in zip(predictions, structures, strict=True)],
        **fit_options,
    )


def labelled_scan(structures: Sequence[Atoms], **fit_options: Any) -> EOSFit:
    """Fit of reference labels: structures carrying their energy in ``atoms.calc`` (as the
    store's labelled structures and extxyz files give them). A structure without an energy
    is left out, and counts against the minimum number of points."""
    volumes, energies = [], []
    for atoms in structures:
        results = atoms.calc.results if atoms.calc is not None else {}
        energy = results.get("energy")
        volumes.append(atoms.get_volume() / len(atoms))
        energies.append(math.nan if energy is None else float(energy) / len(atoms))
    return fit_birch_murnaghan(volumes, energies, **fit_options)


def labeller_scan(
    labeller: Any, structures: Sequence[Atoms], workdir: str | Path, **fit_options: Any
) -> EOSFit:
    """Label the scan with a labeller (``label(atoms, workdir)``) and fit it. A failed
    calculation (LabelError) leaves its point out."""
    from pestle.labellers import LabelError

    volumes, energies = [], []
    for index, atoms in enumerate(structures):
        volumes.append(atoms.get_volume() / len(atoms))
        try:
            result = labeller.label(atoms, Path(workdir) / f"eos-{index:02d}")
        except LabelError:
            energies.append(math.nan)
            continue
        energies.append(result.energy / len(atoms))
    return fit_birch_murnaghan(volumes, energies, **fit_options)


# ---------------------------------------------------------------------------------------------
# The reference's own consistency: its energies against its stresses


def birch_murnaghan_pressure(volume: Any, v0: float, b0: float, b0_prime: float) -> Any:
    """Third-order Birch-Murnaghan pressure, -dE/dV of ``birch_murnaghan`` (units of b0)."""
    x = (v0 / np.asarray(volume, dtype=float)) ** (2 / 3)
    return 1.5 * b0 * (x**3.5 - x**2.5) * (1 + 0.75 * (b0_prime - 4) * (x - 1))


def stress_consistency(
    structures: Sequence[Atoms], energy_fit: EOSFit, tolerance: float = 0.05
) -> dict[str, Any]:
    """Whether a labelled scan's stresses tell the same equation of state as its energies.

    A converged calculation's pressure is -dE/dV; a plane-wave basis that is not converged
    for the stress (a Pulay stress: the basis changes with the volume) gives a pressure
    offset, so the V0 and B0 of a Birch-Murnaghan fit of the pressures differ from the
    energies'. A model fine-tuned on those stresses then cannot match the energies' B0. The
    scan is flagged ``consistent: False`` when the two B0 differ by more than ``tolerance``
    (relative; the ratio's interval, from both fits, is reported beside it); ``None`` when
    there is nothing to compare (no stresses, a failed fit)."""
    from scipy.optimize import curve_fit

    volumes, pressures = [], []
    for atoms in structures:
        results = atoms.calc.results if atoms.calc is not None else {}
        stress = results.get("stress")
        if stress is None:
            continue
        volumes.append(atoms.get_volume() / len(atoms))
        pressures.append(pressure_gpa(stress) * units.GPa)  # eV/Å^3, as the fit's B0
    out: dict[str, Any] = {"consistent": None, "n_points": len(volumes), "tolerance": tolerance}
    if not energy_fit.ok or len(volumes) < MIN_POINTS - 1:
        out["message"] = "no stresses to compare" if not volumes else "nothing to compare"
        return out
    guess = (energy_fit.v0, energy_fit.b0 * units.GPa, energy_fit.b0_prime)
    try:
        with np.errstate(all="ignore"):
            (v0, b0, bp), cov = curve_fit(birch_murnaghan_pressure, volumes, pressures,
                                          p0=guess, maxfev=20000)  # fmt: skip
    except (RuntimeError, ValueError) as exc:
        out["message"] = f"the pressures' fit failed: {exc}"
        return out
    b0_gpa = float(b0) / units.GPa
    # The ratio's interval as compare_eos gives a model's: both fits' errors, log scale, the
    # t quantile of the smaller degrees of freedom (the pressure fit has n - 3).
    b0_se = math.sqrt(cov[1, 1]) / units.GPa if np.isfinite(cov[1, 1]) else math.nan
    t = _t(energy_fit.confidence, min(energy_fit.dof, len(volumes) - 3))
    ratio, low, high = _log_ratio_interval(b0_gpa, b0_se, energy_fit.b0, energy_fit.b0_se, t)
    v0_percent = 100 * (float(v0) / energy_fit.v0 - 1)
    pressure_at_v0 = float(birch_murnaghan_pressure(energy_fit.v0, v0, b0, bp)) / units.GPa
    out.update(
        consistent=bool(abs(ratio - 1) <= tolerance),
        b0_from_stress=b0_gpa,
        b0_from_energy=energy_fit.b0,
        b0_ratio=ratio,
        b0_ratio_interval=(low, high),
        v0_from_stress=float(v0),
        v0_difference_percent=v0_percent,
        pressure_at_energy_v0=pressure_at_v0,
    )
    out["message"] = (
        f"stresses and energies agree: B0 {b0_gpa:.1f} vs {energy_fit.b0:.1f} GPa (ratio "
        f"{ratio:.3f} [{low:.3f}, {high:.3f}])"
        if out["consistent"]
        else f"the scan's stresses and energies disagree: B0 {b0_gpa:.1f} GPa from the "
        f"pressures, {energy_fit.b0:.1f} GPa from the energies (ratio {ratio:.3f} "
        f"[{low:.3f}, {high:.3f}]); V0 "
        f"{v0_percent:+.2f} %; the pressure at the energies' V0 is {pressure_at_v0:+.2f} GPa, "
        "not 0: a stress not converged in the basis (Pulay stress); a model trained on these "
        "stresses cannot match both, so this seed's B0 check is uncertain by that much; raise "
        "the cut-off until the stress converges"
    )
    return out


# ---------------------------------------------------------------------------------------------
# Model against reference


@dataclass
class EOSComparison:
    status: Literal["ok", "model_failed", "reference_failed"]
    message: str
    b0_ratio: float = math.nan  # B0 model / B0 reference
    b0_ratio_interval: tuple[float, float] = (math.nan, math.nan)
    v0_difference_percent: float = math.nan  # 100 (V0 model / V0 reference - 1)
    v0_difference_interval: tuple[float, float] = (math.nan, math.nan)
    confidence: float = 0.95
    model: dict[str, Any] = field(default_factory=dict)  # the model's EOSFit.as_dict()
    reference: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _log_ratio_interval(
    num: float, num_se: float, den: float, den_se: float, t: float
) -> tuple[float, float, float]:
    ratio = num / den
    se = math.hypot(num_se / num, den_se / den)
    # A fit that determines nothing gives an unbounded interval, not an overflow.
    width = t * se
    spread = width if math.isnan(width) else math.inf if width > 700 else math.exp(width)
    return ratio, ratio / spread, ratio * spread


def compare_eos(model: EOSFit, reference: EOSFit, confidence: float = 0.95) -> EOSComparison:
    """B0 ratio and V0 difference of a model's fit against a reference fit, with intervals.
    Not "ok" when either fit is not: the message says which and why."""
    base = {"confidence": confidence, "model": model.as_dict(), "reference": reference.as_dict()}
    if not reference.ok:
        return EOSComparison("reference_failed", f"reference EOS: {reference.message}", **base)
    if not model.ok:
        return EOSComparison("model_failed", f"model EOS: {model.message}", **base)
    t = _t(confidence, min(model.dof, reference.dof))
    ratio, low, high = _log_ratio_interval(model.b0, model.b0_se, reference.b0, reference.b0_se, t)
    v_ratio, v_low, v_high = _log_ratio_interval(
        model.v0, model.v0_se, reference.v0, reference.v0_se, t
    )
    message = (
        f"B0 {model.b0:.1f} GPa vs reference {reference.b0:.1f} GPa: ratio {ratio:.3f} "
        f"[{low:.3f}, {high:.3f}]; V0 {100 * (v_ratio - 1):+.2f} % "
        f"[{100 * (v_low - 1):+.2f}, {100 * (v_high - 1):+.2f}]"
    )
    return EOSComparison(
        "ok",
        message,
        b0_ratio=ratio,
        b0_ratio_interval=(low, high),
        v0_difference_percent=100 * (v_ratio - 1),
        v0_difference_interval=(100 * (v_low - 1), 100 * (v_high - 1)),
        **base,
    )
