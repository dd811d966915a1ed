"""Structure-level intervals for the figures pestle reports and decides on.

The independent unit of a labelled data set is the *structure*: the force components of one
structure sum to zero, share one geometry and one model error (a structure the model softens
more than average softens every component), so an interval that treats components as
independent (``metrics.softening_scale``'s Student t) is far too narrow. Every figure here is
built from per-structure sums and gets an interval over structures:

- ``"cr2"`` (primary, the default): a cluster-robust standard error with the CR2 (Bell and
  McCaffrey) small-sample correction, and a Student t quantile whose degrees of freedom are
  the Bell-McCaffrey/Satterthwaite ones (Imbens and Kolesar 2016) under the working model
  of independent components. For the softening scale ``s = sum_g Sxy_g / sum_g Sxx_g`` the
  CR2 adjustment is closed form: the score of structure g, ``Sxy_g - s Sxx_g``, is divided
  by ``sqrt(1 - h_g)`` with leverage ``h_g = Sxx_g / Sxx``. The degrees of freedom fall
  towards 1 when a few structures carry most of ``Sxx`` (a handful of large rattles among
  small ones), which is exactly when few structures decide the figure.
- ``"bootstrap"``: percentile cluster bootstrap (resampling whole structures; within
  chemical systems where a figure combines systems). Kept as an alternative.

Error figures (MAEs) are means of non-negative, right-skewed per-structure errors that grow
with a structure's displacement: their CR2 interval is built on the log scale, and the working
variance of a structure in the degrees of freedom is the square of its own total error (a
paired difference: the square of its per-structure difference), so a few large-error
structures lower the degrees of freedom as a few large-force structures do for the slope.

Why CR2 is primary, measured by ``benchmarks/bench_interval_coverage.py`` (1000 simulated
campaigns per cell; 8-atom cells whose forces sum to zero; a per-structure slope deviation;
model errors correlated within a structure; rattle amplitudes equal or spread over a factor
of up to 30; 3 to 20 structures; nominal 95 %): the CR2 interval with Bell-McCaffrey degrees
of freedom covers the true slope in 93-98 % of campaigns in every cell. With G - 1 degrees of
freedom CR2 covers 80-95 % (below 90 % whenever amplitudes vary and G <= 15), CR1 67-95 %,
the percentile cluster bootstrap 73-93 % (73-84 % at 3-5 structures), and the component t
interval 20-41 % (93-95 % only without any per-structure slope deviation). Force MAE: 86-96 %
(86-89 % only with amplitudes spread 30-fold and at most 8 structures); energy MAE with the
offset removed 91-100 %; paired differences of the slope 93-97 %, of |1 - s| 92-97 %, of the
force MAE 87-97 %.

Below ``min_structures`` a figure is still computed but marked ``enough = False``;
``format_estimate`` prints it as "not enough structures (n = ...)" and the decision helpers
(``Estimate.inside``, ``Difference.improved``, ``Difference.worse``) answer False.

Paired comparisons: two models on the same structures give per-structure scores whose
difference is again a sum over structures, so ``candidate - baseline`` gets the same kind of
interval. Comparing two separate intervals would ignore that both models err most on the same
(large-displacement) structures; the paired interval accounts for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

DEFAULT_CONFIDENCE = 0.95
DEFAULT_MIN_STRUCTURES = 5
METHODS = ("cr2", "bootstrap")
# Above this many structures the Bell-McCaffrey degrees of freedom are not worth a G x G
# matrix: G - (number of strata) is used, where the t quantile is already close to normal.
_DOF_MATRIX_LIMIT = 400


@dataclass(frozen=True)
class IntervalOptions:
    """How intervals are computed: ``confidence`` (two-sided), ``min_structures`` (fewer
    structures than this: "not enough structures"), ``method`` (``"cr2"`` or
    ``"bootstrap"``), and the bootstrap's ``n_bootstrap`` replicates and ``seed``."""

    confidence: float = DEFAULT_CONFIDENCE
    min_structures: int = DEFAULT_MIN_STRUCTURES
    method: str = "cr2"
    n_bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.min_structures < 1:
            raise ValueError(f"min_structures must be at least 1, got {self.min_structures}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be at least 1, got {self.n_bootstrap}")


def _none_if_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _nan_if_none(value: Any) -> Any:
    return math.nan if value is None else value


def not_enough_text(n_structures: int) -> str:
    return f"not enough structures (n = {n_structures})"


class _Figure:
    """What ``Estimate`` and ``Difference`` share: the "enough structures" rule and the
    JSON-friendly dict form (undefined numbers as None, ``enough`` included)."""

    value: float
    n_structures: int
    min_structures: int

    @property
    def enough(self) -> bool:
        return self.n_structures >= self.min_structures and math.isfinite(self.value)

    def as_dict(self) -> dict[str, Any]:
        out = {k: _none_if_nan(v) for k, v in asdict(self).items()}  # type: ignore[call-overload]
        out["enough"] = self.enough
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: _nan_if_none(v) for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Estimate(_Figure):
    """A figure with its structure-level interval ``[low, high]``.

    ``n_values``: the values behind it (force components, stress components or structures).
    ``se`` and ``dof``: the standard error and the t degrees of freedom (``"cr2"``; NaN for
    the bootstrap). ``component_low``/``component_high``: the secondary interval that treats
    every value as independent (force figures only; too narrow, kept for comparison).
    ``enough``: at least ``min_structures`` structures and a defined value."""

    value: float
    low: float
    high: float
    n_structures: int
    n_values: int
    confidence: float = DEFAULT_CONFIDENCE
    method: str = "cr2"
    se: float = math.nan
    dof: float = math.nan
    min_structures: int = DEFAULT_MIN_STRUCTURES
    component_low: float = math.nan
    component_high: float = math.nan

    def inside(self, low: float, high: float) -> bool:
        """The whole interval lies in ``[low, high]`` (and there are enough structures):
        an equivalence test at level (1 - confidence) / 2 on each side."""
        return (
            self.enough
            and math.isfinite(self.low)
            and math.isfinite(self.high)
            and low <= self.low
            and self.high <= high
        )

    def text(self, digits: int = 3, scale: float = 1.0) -> str:
        return format_estimate(self, digits, scale)


@dataclass(frozen=True)
class Difference(_Figure):
    """``candidate - baseline`` of one figure on the same structures, with its paired
    structure-level interval ``[low, high]``; ``ratio`` (candidate / baseline) and the
    difference's interval relative to the baseline's value, ``1 + [low, high] / baseline``
    (the scale ``improved``/``worse`` use for a relative margin; NaN where the baseline is
    not positive).
    ``lower_is_better``: True for errors and |1 - s|, None for the softening scale itself
    (neither direction is better)."""

    metric: str
    candidate: float
    baseline: float
    value: float
    low: float
    high: float
    n_structures: int
    lower_is_better: bool | None = True
    ratio: float = math.nan
    ratio_low: float = math.nan
    ratio_high: float = math.nan
    confidence: float = DEFAULT_CONFIDENCE
    method: str = "cr2"
    se: float = math.nan
    dof: float = math.nan
    min_structures: int = DEFAULT_MIN_STRUCTURES

    def _directed(self) -> None:
        if self.lower_is_better is None:
            raise ValueError(f"{self.metric}: neither direction is an improvement")

    def improved(self, min_improvement: float = 0.0) -> bool:
        """The candidate is better by more than ``min_improvement`` (relative to the
        baseline's value, as ``daemon.retrain.min_improvement``) with the whole interval:
        for a lower-is-better figure ``high < -min_improvement * |baseline|``. False with
        too few structures."""
        self._directed()
        if not self.enough or not math.isfinite(self.high):
            return False
        margin = min_improvement * abs(self.baseline)
        if self.lower_is_better:
            return self.high < -margin
        return self.low > margin

    def worse(self, tolerance: float = 0.0) -> bool:
        """The candidate is worse with the whole interval (beyond ``tolerance`` relative to
        the baseline's value): ``low > tolerance * |baseline|`` for a lower-is-better figure.
        False with too few structures (nothing is shown to be worse)."""
        self._directed()
        if not self.enough or not math.isfinite(self.low):
            return False
        margin = tolerance * abs(self.baseline)
        if self.lower_is_better:
            return self.low > margin
        return self.high < -margin

    def text(self, digits: int = 3, scale: float = 1.0) -> str:
        return format_difference(self, digits, scale)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def format_estimate(
    estimate: Estimate | Mapping[str, Any], digits: int = 3, scale: float = 1.0
) -> str:
    """``"1.059 [0.645, 1.143]"``; ``"not enough structures (n = 3)"`` below the minimum;
    ``"n/a"`` when undefined. ``scale`` multiplies the numbers (e.g. 1000 for meV)."""
    e = estimate if isinstance(estimate, Estimate) else Estimate.from_dict(estimate)
    if e.n_structures < e.min_structures:
        return not_enough_text(e.n_structures)
    if not _finite(e.value):
        return "n/a"
    text = f"{scale * e.value:.{digits}f}"
    if _finite(e.low) and _finite(e.high):
        text += f" [{scale * e.low:.{digits}f}, {scale * e.high:.{digits}f}]"
    return text


def format_difference(
    difference: Difference | Mapping[str, Any],
    digits: int = 3,
    scale: float = 1.0,
    relative: bool = False,
) -> str:
    """``"-0.012 [-0.020, -0.004]"`` (``relative``: ``"-31% [-45%, -12%]"`` from the ratio);
    ``"not enough structures (n = 3)"`` below the minimum."""
    d = difference if isinstance(difference, Difference) else Difference.from_dict(difference)
    if d.n_structures < d.min_structures:
        return not_enough_text(d.n_structures)
    if relative:
        if not _finite(d.ratio):
            return "n/a"
        text = f"{100 * (d.ratio - 1):+.0f}%"
        if _finite(d.ratio_low) and _finite(d.ratio_high):
            text += f" [{100 * (d.ratio_low - 1):+.0f}%, {100 * (d.ratio_high - 1):+.0f}%]"
        return text
    if not _finite(d.value):
        return "n/a"
    text = f"{scale * d.value:+.{digits}f}"
    if _finite(d.low) and _finite(d.high):
        text += f" [{scale * d.low:+.{digits}f}, {scale * d.high:+.{digits}f}]"
    return text


# -- the linearised statistic ------------------------------------------------------------
@dataclass
class _Linear:
    """A figure as value + sum of per-structure influences ``u`` (the first-order expansion
    of the estimator), with what CR2 and its degrees of freedom need: the leverage ``h`` of
    each structure, a per-structure coefficient ``c`` and working-model variance ``w``
    (the influence is ``c_g`` times a residual of the stratum's regression), the stratum of
    each structure, and ``replicate`` (structure indices (R, G) -> R bootstrap values).

    ``totals``: for error figures, each structure's own total (|error| summed); their
    squares are then the working variances (``w``), and a paired difference uses the squared
    per-structure differences. ``log_scale``: the CR2 interval is built for log(value) (a
    positive, right-skewed error figure) and mapped back."""

    value: float
    u: np.ndarray
    h: np.ndarray
    c: np.ndarray
    w: np.ndarray
    strata: np.ndarray
    replicate: Callable[[np.ndarray], np.ndarray]
    dof_loss: int = 0  # further parameters estimated (e.g. energy offsets)
    totals: np.ndarray | None = None
    log_scale: bool = False
    resample_strata: np.ndarray | None = None  # bootstrap strata when not ``strata``


def _bell_mccaffrey_dof(lin: _Linear) -> float:
    """Satterthwaite degrees of freedom of the CR2 variance under the working model of
    independent values (variance of a structure's sum proportional to ``w``)."""
    strata = lin.strata
    groups = np.unique(strata)
    n = lin.u.size
    if n > _DOF_MATRIX_LIMIT:
        return float(max(n - groups.size - lin.dof_loss, 1))
    same = strata[:, None] == strata[None, :]
    # L[g, j] = c_g (delta_gj - h_g [j in stratum of g]): influence = L @ (stratum sums)
    residual_maker = np.eye(n) - np.where(same, lin.h[:, None], 0.0)
    a = (lin.c / np.sqrt(1.0 - lin.h))[:, None] * residual_maker * np.sqrt(lin.w)[None, :]
    gram = a @ a.T
    denominator = float(np.sum(gram**2))
    if denominator <= 0:
        return float(max(n - groups.size - lin.dof_loss, 1))
    dof = float(np.trace(gram)) ** 2 / denominator - lin.dof_loss
    return max(dof, 1.0)


def _resample(strata: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """Bootstrap structure indices (n_bootstrap, G), resampling within each stratum."""
    rng = np.random.default_rng(seed)
    picks = np.empty((n_bootstrap, strata.size), dtype=int)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        picks[:, members] = members[rng.integers(0, members.size, (n_bootstrap, members.size))]
    return picks


def _interval(lin: _Linear, options: IntervalOptions) -> tuple[float, float, float, float]:
    """(low, high, se, dof) of the figure."""
    from scipy.special import stdtrit

    n = lin.u.size
    if not math.isfinite(lin.value) or n < 2 or np.any(lin.h >= 1.0):
        return math.nan, math.nan, math.nan, math.nan
    if options.method == "bootstrap":
        strata = lin.strata if lin.resample_strata is None else lin.resample_strata
        values = lin.replicate(_resample(strata, options.n_bootstrap, options.seed))
        tail = 50 * (1 - options.confidence)
        values = values[np.isfinite(values)]
        if not values.size:
            return math.nan, math.nan, math.nan, math.nan
        low, high = np.percentile(values, [tail, 100 - tail])
        return float(low), float(high), float(np.std(values, ddof=1)), math.nan
    se = math.sqrt(float(np.sum(lin.u**2 / (1.0 - lin.h))))
    dof = _bell_mccaffrey_dof(lin)
    quantile = float(stdtrit(dof, 0.5 + options.confidence / 2))
    if lin.log_scale and lin.value > 0:
        factor = _exp(quantile * se / lin.value)
        return lin.value / factor, lin.value * factor, se, dof
    return lin.value - quantile * se, lin.value + quantile * se, se, dof


def _estimate(
    lin: _Linear | None,
    n_structures: int,
    n_values: int,
    options: IntervalOptions,
    component: tuple[float, float] = (math.nan, math.nan),
    nonnegative: bool = False,
) -> Estimate:
    """``nonnegative``: an error (MAE), whose interval is clipped at zero."""
    if lin is None:
        return Estimate(math.nan, math.nan, math.nan, n_structures, n_values,
                        options.confidence, options.method, math.nan, math.nan,
                        options.min_structures, *component)  # fmt: skip
    low, high, se, dof = _interval(lin, options)
    if nonnegative and math.isfinite(low):
        low = max(low, 0.0)
    return Estimate(lin.value, low, high, n_structures, n_values, options.confidence,
                    options.method, se, dof, options.min_structures, *component)  # fmt: skip


# -- building blocks: ratios of per-structure sums -----------------------------------------
def _strata_of(strata: Sequence[Any] | None, n: int) -> np.ndarray:
    if strata is None:
        return np.zeros(n, dtype=int)
    if len(strata) != n:
        raise ValueError(f"{len(strata)} strata for {n} structures")
    _, codes = np.unique(np.asarray([str(s) for s in strata]), return_inverse=True)
    return codes.astype(int)


def _ratio(a: np.ndarray, b: np.ndarray, error: bool = False) -> _Linear | None:
    """``sum a / sum b`` over structures (slope through the origin: a = Sxy, b = Sxx; mean
    of values: a = sum, b = count). None when undefined. ``error``: a mean of non-negative
    errors (working variance a_g^2, log-scale interval)."""
    total = float(b.sum())
    if a.size == 0 or total <= 0:
        return None
    value = float(a.sum()) / total
    h = b / total

    def replicate(picks: np.ndarray) -> np.ndarray:
        denominator = b[picks].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, a[picks].sum(1) / denominator, np.nan)

    return _Linear(value, (a - value * b) / total, h, np.full(a.size, 1.0 / total),
                   a**2 if error else b, np.zeros(a.size, dtype=int), replicate,
                   totals=a if error else None, log_scale=error)  # fmt: skip


def _stratified_ratios(
    a: np.ndarray, b: np.ndarray, strata: np.ndarray, transform: str
) -> _Linear | None:
    """Mean over strata of f(sum_k a / sum_k b) with f = identity or |1 - .|."""
    codes = np.unique(strata)
    if a.size == 0:
        return None
    totals = np.array([b[strata == k].sum() for k in codes])
    if np.any(totals <= 0):
        return None
    ratios = np.array([a[strata == k].sum() for k in codes]) / totals
    index = np.searchsorted(codes, strata)
    if transform == "distance":
        values, slope = np.abs(1.0 - ratios), np.sign(ratios - 1.0)
    else:
        values, slope = ratios, np.ones_like(ratios)
    k = codes.size
    coefficient = slope[index] / (k * totals[index])
    u = coefficient * (a - ratios[index] * b)

    def replicate(picks: np.ndarray) -> np.ndarray:
        out = np.zeros(picks.shape[0])
        for code in codes:
            cols = picks[:, strata == code]
            with np.errstate(invalid="ignore", divide="ignore"):
                r = a[cols].sum(1) / b[cols].sum(1)
            out += np.abs(1.0 - r) if transform == "distance" else r
        return out / k

    return _Linear(float(values.mean()), u, b / totals[index], coefficient, b, strata, replicate)


def _energy_mae(
    per_atom_errors: np.ndarray, strata: np.ndarray, offset_removed: bool
) -> _Linear | None:
    """Mean over structures of |d_g| (``offset_removed``: |d_g - mean of d in its stratum|,
    strata being chemical systems: each system's zero of energy differs between codes).
    With offsets removed, systems with a single structure are left out (no relative energy)."""
    d = per_atom_errors
    if not offset_removed:
        if d.size == 0:
            return None
        return _ratio(np.abs(d), np.ones_like(d), error=True)
    codes = np.unique(strata)
    if d.size == 0:
        return None
    index = np.searchsorted(codes, strata)
    counts = np.bincount(index, minlength=codes.size).astype(float)
    means = np.bincount(index, weights=d, minlength=codes.size) / counts
    residual = d - means[index]
    n = d.size
    value = float(np.mean(np.abs(residual)))
    signs = np.bincount(index, weights=np.sign(residual), minlength=codes.size)
    # d(value)/d(offset_k) = -sum_k sign / n; the offset's influence is (d_g - mean_k) / n_k.
    u = (np.abs(residual) - value - signs[index] / counts[index] * residual) / n

    def replicate(picks: np.ndarray) -> np.ndarray:
        out = np.zeros(picks.shape[0])
        for j in range(codes.size):
            cols = picks[:, index == j]
            values = d[cols]
            out += np.abs(values - values.mean(1, keepdims=True)).sum(1)
        return out / n

    ones = np.ones(n)
    return _Linear(value, u, ones / n, ones / n, residual**2, np.zeros(n, dtype=int), replicate,
                   dof_loss=codes.size, totals=np.abs(residual), log_scale=True,
                   resample_strata=index)  # fmt: skip


def _difference(candidate: _Linear, baseline: _Linear) -> _Linear:
    """candidate - baseline on the same structures."""

    def replicate(picks: np.ndarray) -> np.ndarray:
        return candidate.replicate(picks) - baseline.replicate(picks)

    errors = candidate.totals is not None and baseline.totals is not None
    w = (candidate.totals - baseline.totals) ** 2 if errors else candidate.w
    return _Linear(candidate.value - baseline.value, candidate.u - baseline.u, candidate.h,
                   candidate.c, w, candidate.strata, replicate, candidate.dof_loss,
                   resample_strata=candidate.resample_strata)  # fmt: skip


def _exp(value: float) -> float:
    if not math.isfinite(value):
        return value if math.isnan(value) else (math.inf if value > 0 else 0.0)
    return math.exp(value) if value < 700 else math.inf


def _paired(
    metric: str,
    candidate: _Linear | None,
    baseline: _Linear | None,
    n_structures: int,
    options: IntervalOptions,
    lower_is_better: bool | None,
) -> Difference:
    nan = math.nan
    if candidate is None or baseline is None:
        return Difference(metric, nan if candidate is None else candidate.value,
                          nan if baseline is None else baseline.value, nan, nan, nan,
                          n_structures, lower_is_better, nan, nan, nan, options.confidence,
                          options.method, nan, nan, options.min_structures)  # fmt: skip
    diff = _difference(candidate, baseline)
    low, high, se, dof = _interval(diff, options)
    ratio = ratio_low = ratio_high = nan
    if baseline.value > 0:
        ratio = candidate.value / baseline.value
        ratio_low, ratio_high = 1 + low / baseline.value, 1 + high / baseline.value
    return Difference(metric, candidate.value, baseline.value, diff.value, low, high,
                      n_structures, lower_is_better, ratio, ratio_low, ratio_high,
                      options.confidence, options.method, se, dof,
                      options.min_structures)  # fmt: skip


# -- per-structure inputs --------------------------------------------------------------
def _flat_pairs(
    model: Sequence[Any], reference: Sequence[Any], what: str = "model"
) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(model) != len(reference):
        raise ValueError(f"{len(model)} {what} structures but {len(reference)} reference ones")
    out = []
    for index, (m, r) in enumerate(zip(model, reference, strict=True)):
        y = np.asarray(m, dtype=float).ravel()
        x = np.asarray(r, dtype=float).ravel()
        if x.shape != y.shape:
            raise ValueError(f"structure {index}: {what} has {y.size} components, reference "
                             f"{x.size}")  # fmt: skip
        out.append((y, x))
    return out


def _options(options: IntervalOptions | None, **overrides: Any) -> IntervalOptions:
    base = options or IntervalOptions()
    given = {k: v for k, v in overrides.items() if v is not None}
    return IntervalOptions(**{**asdict(base), **given}) if given else base


def _component_t(y: np.ndarray, x: np.ndarray, confidence: float) -> tuple[float, float]:
    from pestle.evaluation.metrics import softening_scale

    fit = softening_scale(y, x, confidence)
    return fit.ci_low, fit.ci_high


def _component_mean_t(values: np.ndarray, confidence: float) -> tuple[float, float]:
    from scipy.special import stdtrit

    if values.size < 2:
        return math.nan, math.nan
    half = float(stdtrit(values.size - 1, 0.5 + confidence / 2)) * float(
        np.std(values, ddof=1) / math.sqrt(values.size)
    )
    mean = float(values.mean())
    return mean - half, mean + half


def _softening_sums(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([float(x @ y) for y, x in pairs]),
            np.array([float(x @ x) for _, x in pairs]))  # fmt: skip


def softening_interval(
    model_forces: Sequence[Any],
    reference_forces: Sequence[Any],
    *,
    strata: Sequence[Any] | None = None,
    options: IntervalOptions | None = None,
    confidence: float | None = None,
    min_structures: int | None = None,
    method: str | None = None,
) -> Estimate:
    """Softening scale (slope through the origin of model against reference force
    components) with its structure-level interval; one array of forces per structure.

    With ``strata`` (e.g. the chemical system of each structure) the figure is the mean over
    strata of each stratum's slope, not one slope pooled across them. The component t
    interval is kept as ``component_low``/``component_high`` (pooled fit only)."""
    opts = _options(options, confidence=confidence, min_structures=min_structures,
                    method=method)  # fmt: skip
    pairs = _flat_pairs(model_forces, reference_forces)
    a, b = _softening_sums(pairs)
    n_values = sum(x.size for _, x in pairs)
    if strata is None:
        lin = _ratio(a, b)
        y = np.concatenate([p[0] for p in pairs]) if pairs else np.empty(0)
        x = np.concatenate([p[1] for p in pairs]) if pairs else np.empty(0)
        return _estimate(lin, len(pairs), n_values, opts, _component_t(y, x, opts.confidence))
    lin = _stratified_ratios(a, b, _strata_of(strata, len(pairs)), "identity")
    return _estimate(lin, len(pairs), n_values, opts)


def softening_distance_interval(
    model_forces: Sequence[Any],
    reference_forces: Sequence[Any],
    *,
    strata: Sequence[Any] | None = None,
    options: IntervalOptions | None = None,
    confidence: float | None = None,
    min_structures: int | None = None,
    method: str | None = None,
) -> Estimate:
    """|1 - s| (mean over ``strata`` of each stratum's |1 - s| when given), delta method."""
    opts = _options(options, confidence=confidence, min_structures=min_structures,
                    method=method)  # fmt: skip
    pairs = _flat_pairs(model_forces, reference_forces)
    a, b = _softening_sums(pairs)
    lin = _stratified_ratios(a, b, _strata_of(strata, len(pairs)), "distance")
    return _estimate(lin, len(pairs), sum(x.size for _, x in pairs), opts)


def _abs_sums(pairs: list[tuple[np.ndarray, np.ndarray]], power: int) -> tuple[np.ndarray, ...]:
    a = np.array([float(np.sum(np.abs(y - x) ** power)) for y, x in pairs])
    b = np.array([float(x.size) for _, x in pairs])
    return a, b


def mae_interval(
    model: Sequence[Any],
    reference: Sequence[Any],
    *,
    options: IntervalOptions | None = None,
    confidence: float | None = None,
    min_structures: int | None = None,
    method: str | None = None,
) -> Estimate:
    """Mean absolute error over all components (force or stress components, one array per
    structure) with its structure-level interval; component t interval as secondary."""
    opts = _options(options, confidence=confidence, min_structures=min_structures,
                    method=method)  # fmt: skip
    pairs = [(y, x) for y, x in _flat_pairs(model, reference) if x.size]
    a, b = _abs_sums(pairs, 1)
    errors = np.concatenate([np.abs(y - x) for y, x in pairs]) if pairs else np.empty(0)
    return _estimate(_ratio(a, b, error=True), len(pairs), int(b.sum()), opts,
                     _component_mean_t(errors, opts.confidence), nonnegative=True)  # fmt: skip


def rmse_interval(
    model: Sequence[Any],
    reference: Sequence[Any],
    *,
    options: IntervalOptions | None = None,
    confidence: float | None = None,
    min_structures: int | None = None,
    method: str | None = None,
) -> Estimate:
    """Root-mean-square error over all components; the interval is the square root of the
    mean squared error's interval (its lower end clipped at zero)."""
    opts = _options(options, confidence=confidence, min_structures=min_structures,
                    method=method)  # fmt: skip
    pairs = [(y, x) for y, x in _flat_pairs(model, reference) if x.size]
    a, b = _abs_sums(pairs, 2)
    mse = _estimate(_ratio(a, b, error=True), len(pairs), int(b.sum()), opts, nonnegative=True)
    return _sqrt_estimate(mse)


def _sqrt_estimate(mse: Estimate) -> Estimate:
    def root(v: float) -> float:
        return math.sqrt(max(v, 0.0)) if math.isfinite(v) else math.nan

    se = mse.se / (2 * root(mse.value)) if root(mse.value) > 0 else math.nan
    return Estimate(root(mse.value), root(mse.low), root(mse.high), mse.n_structures,
                    mse.n_values, mse.confidence, mse.method, se, mse.dof,
                    mse.min_structures)  # fmt: skip


def _energy_inputs(model_energies: Any, reference_energies: Any, n_atoms: Any) -> np.ndarray:
    y = np.asarray(model_energies, dtype=float).ravel()
    x = np.asarray(reference_energies, dtype=float).ravel()
    counts = np.asarray(n_atoms, dtype=float).ravel()
    if not (x.shape == y.shape == counts.shape):
        raise ValueError(f"{y.size} model energies, {x.size} reference, {counts.size} counts")
    return (y - x) / counts if x.size else np.empty(0)


def _energy_strata(d: np.ndarray, strata: Sequence[Any] | None, offset_removed: bool):
    codes = _strata_of(strata, d.size)
    if not offset_removed:
        return d, codes
    keep = np.bincount(codes)[codes] >= 2 if d.size else np.zeros(0, dtype=bool)
    return d[keep], codes[keep]


def energy_mae_interval(
    model_energies: Any,
    reference_energies: Any,
    n_atoms: Any,
    *,
    offset_removed: bool = True,
    strata: Sequence[Any] | None = None,
    options: IntervalOptions | None = None,
    confidence: float | None = None,
    min_structures: int | None = None,
    method: str | None = None,
) -> Estimate:
    """Energy MAE per atom over structures (total energies and atom counts). With
    ``offset_removed`` the mean per-atom offset of each stratum (chemical system) is removed
    first (two codes put the zero of energy in different places); strata with a single
    structure are left out then, having no relative energy."""
    opts = _options(options, confidence=confidence, min_structures=min_structures,
                    method=method)  # fmt: skip
    d, codes = _energy_strata(_energy_inputs(model_energies, reference_energies, n_atoms),
                              strata, offset_removed)  # fmt: skip
    return _estimate(_energy_mae(d, codes, offset_removed), d.size, d.size, opts,
                     nonnegative=True)  # fmt: skip


# -- paired comparisons ----------------------------------------------------------------
def paired_softening(
    candidate_forces: Sequence[Any],
    baseline_forces: Sequence[Any],
    reference_forces: Sequence[Any],
    *,
    distance: bool = False,
    strata: Sequence[Any] | None = None,
    options: IntervalOptions | None = None,
    confidence: float | None = None,
    min_structures: int | None = None,
    method: str | None = None,
) -> Difference:
    """Candidate minus baseline softening scale on the same structures (``distance``:
    |1 - s_candidate| - |1 - s_baseline|, lower is better). With ``strata``, each figure is
    the mean over strata of the stratum's figure."""
    opts = _options(options, confidence=confidence, min_structures=min_structures,
                    method=method)  # fmt: skip
    cand = _flat_pairs(candidate_forces, reference_forces, "candidate")
    base = _flat_pairs(baseline_forces, reference_forces, "baseline")
    codes = _strata_of(strata, len(cand))
    transform = "distance" if distance else "identity"
    a_c, b = _softening_sums(cand)
    a_b, _ = _softening_sums(base)
    if strata is None and not distance:
        lins = _ratio(a_c, b), _ratio(a_b, b)
    else:
        lins = (_stratified_ratios(a_c, b, codes, transform),
                _stratified_ratios(a_b, b, codes, transform))  # fmt: skip
    metric = "softening_distance" if distance else "softening"
    return _paired(metric, *lins, len(cand), opts, True if distance else None)


def paired_mae(
    candidate: Sequence[Any],
    baseline: Sequence[Any],
    reference: Sequence[Any],
    *,
    metric: str = "force_mae",
    options: IntervalOptions | None = None,
    confidence: float | None = None,
    min_structures: int | None = None,
    method: str | None = None,
) -> Difference:
    """Candidate minus baseline MAE over all components (forces or stresses, one array per
    structure) on the same structures; lower is better."""
    opts = _options(options, confidence=confidence, min_structures=min_structures,
                    method=method)  # fmt: skip
    cand = _flat_pairs(candidate, reference, "candidate")
    base = _flat_pairs(baseline, reference, "baseline")
    keep = [i for i, (_, x) in enumerate(cand) if x.size]
    a_c, b = _abs_sums([cand[i] for i in keep], 1)
    a_b, _ = _abs_sums([base[i] for i in keep], 1)
    return _paired(metric, _ratio(a_c, b, error=True), _ratio(a_b, b, error=True), len(keep),
                   opts, True)  # fmt: skip


def paired_error_ratio(
    candidate: Sequence[Any],
    baseline: Sequence[Any],
    reference: Sequence[Any],
    *,
    metric: str = "force_mae_ratio",
    options: IntervalOptions | None = None,
    confidence: float | None = None,
    min_structures: int | None = None,
) -> Difference:
    """How the candidate changes each structure's own error, equally weighted per structure:
    the geometric mean over structures of MAE_candidate / MAE_baseline (one array of
    components per structure), with a t interval on the mean of the per-structure log
    ratios (G - 1 degrees of freedom: the structures are the independent unit). ``value``,
    ``low`` and ``high`` are that ratio minus one times the baseline's pooled MAE, so
    ``improved(m)`` means the whole interval of the ratio lies below 1 - m.

    The pooled ``paired_mae`` answers how the average error changes; one strongly distorted
    structure can carry most of it, which leaves its interval wide however many structures
    agree. This one answers whether the candidate is better across structures, the question
    a promotion asks."""
    from scipy import stats

    opts = _options(options, confidence=confidence, min_structures=min_structures, method=None)
    cand = _flat_pairs(candidate, reference, "candidate")
    base = _flat_pairs(baseline, reference, "baseline")
    logs, pooled_c, pooled_b, n_values = [], 0.0, 0.0, 0
    for (y_c, x), (y_b, _) in zip(cand, base, strict=True):
        if not x.size:
            continue
        e_c, e_b = float(np.mean(np.abs(y_c - x))), float(np.mean(np.abs(y_b - x)))
        pooled_c, pooled_b, n_values = (
            pooled_c + e_c * x.size,
            pooled_b + e_b * x.size,
            n_values + x.size,
        )
        if e_c > 0 and e_b > 0:
            logs.append(math.log(e_c / e_b))
    nan = math.nan
    g = len(logs)
    c_mae = pooled_c / n_values if n_values else nan
    b_mae = pooled_b / n_values if n_values else nan
    if g < 2 or not b_mae > 0:
        return Difference(metric, c_mae, b_mae, nan, nan, nan, g, True, nan, nan, nan,
                          opts.confidence, "log-ratio t", nan, nan, opts.min_structures)  # fmt: skip
    mean = float(np.mean(logs))
    se = float(np.std(logs, ddof=1) / math.sqrt(g))
    half = float(stats.t.ppf(0.5 + opts.confidence / 2, g - 1)) * se
    ratio, ratio_low, ratio_high = math.exp(mean), math.exp(mean - half), math.exp(mean + half)
    return Difference(metric, c_mae, b_mae, (ratio - 1) * b_mae, (ratio_low - 1) * b_mae,
                      (ratio_high - 1) * b_mae, g, True, ratio, ratio_low, ratio_high,
                      opts.confidence, "log-ratio t", se, g - 1, opts.min_structures)  # fmt: skip


def paired_energy_mae(
    candidate_energies: Any,
    baseline_energies: Any,
    reference_energies: Any,
    n_atoms: Any,
    *,
    offset_removed: bool = True,
    strata: Sequence[Any] | None = None,
    options: IntervalOptions | None = None,
    confidence: float | None = None,
    min_structures: int | None = None,
    method: str | None = None,
) -> Difference:
    """Candidate minus baseline energy MAE per atom (as ``energy_mae_interval``)."""
    opts = _options(options, confidence=confidence, min_structures=min_structures,
                    method=method)  # fmt: skip
    d_c, codes = _energy_strata(
        _energy_inputs(candidate_energies, reference_energies, n_atoms), strata, offset_removed
    )
    d_b, _ = _energy_strata(
        _energy_inputs(baseline_energies, reference_energies, n_atoms), strata, offset_removed
    )
    metric = "energy_mae_per_atom" + ("_offset_removed" if offset_removed else "")
    return _paired(metric, _energy_mae(d_c, codes, offset_removed),
                   _energy_mae(d_b, codes, offset_removed), d_c.size, opts, True)  # fmt: skip
