"""Plots of an evaluation: parity (forces, energies, stresses), force error against the
reference force, and softening scales with their structure-level intervals as points with
error bars (no lines between categories).

Every figure is a ``matplotlib.figure.Figure`` on an Agg canvas, never pyplot: no global
state, safe in worker threads and headless.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pestle.evaluation.intervals import Estimate
from pestle.evaluation.metrics import softening_scale

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pestle.evaluation.evaluate import Evaluation

MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def new_figure(width: float, height: float, dpi: int = 120) -> Figure:
    """A figure on its own Agg canvas: no pyplot, no global state, headless. (The
    reports' figures use it too.)"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    """The figure as a PNG at ``path`` (its folder made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "all"


def parity_plot(
    reference: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    path: Path,
    title: str,
    quantity: str = "force component",
    unit: str = "eV/Å",
    fit: bool = True,
) -> Path:
    """PNG of each model's predictions against ``reference``; with ``fit``, each model's
    through-origin fit as a dashed line whose slope is in the legend (the softening scale
    when the quantity is a force component). The y = x line is "no softening"."""
    x = np.asarray(reference, dtype=float).ravel()
    series = {name: np.asarray(y, dtype=float).ravel() for name, y in predictions.items()}
    for name, y in series.items():
        if y.shape != x.shape:
            raise ValueError(f"{name}: {y.size} predictions for {x.size} reference values")

    fig = new_figure(5.5, 5.5)
    ax = fig.add_subplot()
    values = np.concatenate([x, *series.values()]) if x.size else np.zeros(1)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if fit:  # forces: symmetric about zero, the fit goes through the origin
        bound = max(abs(low), abs(high))
        low, high = -bound, bound
    pad = 0.05 * (high - low) if high > low else 1.0
    low, high = low - pad, high + pad
    line = np.array([low, high])
    ax.plot(line, line, color="black", linewidth=1,
            label="y = x (no softening)" if fit else "y = x")  # fmt: skip
    alpha = 0.6 if x.size < 500 else 0.3
    for index, (name, y) in enumerate(series.items()):
        colour = f"C{index}"
        label = name
        if fit:
            slope = softening_scale(y, x)
            ax.plot(line, slope.slope * line, color=colour, linestyle="--", linewidth=1.5)
            label = f"{name}: slope {slope.slope:.3f}"
        ax.scatter(x, y, s=14, alpha=alpha, color=colour, marker=MARKERS[index % len(MARKERS)],
                   edgecolors="none", label=label)  # fmt: skip
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", markerscale=1.5)
    fig.tight_layout()
    return save(fig, path)


def force_error_plot(
    atom_force_norm: np.ndarray,
    errors: Mapping[str, np.ndarray],
    path: Path,
    title: str,
    edges: Sequence[float] | None = None,
) -> Path:
    """Per-atom force error |F_model - F_ref| against |F_ref| (eV/A), every model on one
    plot, with each model's mean error per bin of |F_ref| as larger points."""
    x = np.asarray(atom_force_norm, dtype=float).ravel()
    fig = new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    top = float(x.max()) if x.size else 1.0
    if edges is None:
        edges = np.linspace(0.0, top, 7) if top > 0 else np.array([0.0, 1.0])
    edges = np.asarray([e if math.isfinite(e) else max(top, 1e-9) * 1.0001 for e in edges])
    names = list(errors)
    width = np.diff(edges)
    for index, name in enumerate(names):
        y = np.asarray(errors[name], dtype=float).ravel()
        if y.shape != x.shape:
            raise ValueError(f"{name}: {y.size} errors for {x.size} atoms")
        colour, marker = f"C{index}", MARKERS[index % len(MARKERS)]
        ax.scatter(x, y, s=12, alpha=0.45, color=colour, marker=marker, edgecolors="none",
                   label=f"{name} (atoms)")  # fmt: skip
        centres, means = [], []
        for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            mask = (x >= lo) & (x < hi)
            if mask.any():
                # Dodge the models inside a bin so their points do not hide each other.
                offset = (index + 1) / (len(names) + 1)
                centres.append(lo + offset * width[j])
                means.append(float(y[mask].mean()))
        ax.scatter(centres, means, s=60, color=colour, marker=marker, edgecolors="black",
                   linewidths=0.8, zorder=3, label=f"{name} (mean per bin)")  # fmt: skip
    for edge in edges[1:-1]:
        ax.axvline(edge, color="grey", linewidth=0.5, alpha=0.5)
    ax.set_xlim(0, 1.03 * edges[-1])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("reference force per atom |F_ref| (eV/Å)")
    ax.set_ylabel("force error per atom |F_model − F_ref| (eV/Å)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return save(fig, path)


def _as_estimate(value: Estimate | Mapping[str, Any] | None) -> Estimate | None:
    if value is None or isinstance(value, Estimate):
        return value
    return Estimate.from_dict(value)


def softening_points_plot(
    points: Mapping[str, Mapping[str, Estimate | Mapping[str, Any] | None]],
    path: Path,
    title: str,
    xlabel: str = "",
    band: tuple[float, float] | None = None,
    ylabel: str = "softening scale (structure-level 95% CI)",
) -> Path:
    """Softening scales as points with error bars: ``points[category][model]`` (an
    ``Estimate`` or its dict). Categories (systems, samplers, force bins) are not joined by
    lines; models are side by side within a category. A figure with too few structures is a
    hollow grey point without an interval, marked "n = ..". ``band``: shaded (e.g. the
    daemon's stop band)."""
    categories = list(points)
    models: list[str] = []
    for per_model in points.values():
        models += [m for m in per_model if m not in models]
    width = max(5.0, 1.1 * len(categories) * max(1, len(models)) ** 0.5 + 2.0)
    fig = new_figure(min(width, 16.0), 4.8)
    ax = fig.add_subplot()
    ax.axhline(1.0, color="black", linewidth=1, label="1 = no softening")
    if band is not None:
        ax.axhspan(band[0], band[1], color="green", alpha=0.1, label=f"band {band[0]}–{band[1]}")
    spread = 0.6
    step = spread / max(len(models), 1)
    too_few = False
    for index, name in enumerate(models):
        colour, marker = f"C{index}", MARKERS[index % len(MARKERS)]
        xs, ys, lows, highs = [], [], [], []
        for j, category in enumerate(categories):
            estimate = _as_estimate(points[category].get(name))
            if estimate is None or not math.isfinite(estimate.value):
                continue
            x = j - spread / 2 + (index + 0.5) * step
            if not estimate.enough:
                # Hollow, no interval: a point to place the model, not a measurement.
                ax.scatter([x], [estimate.value], s=45, facecolors="none", edgecolors=colour,
                           marker=marker, zorder=3)  # fmt: skip
                ax.annotate(f"n = {estimate.n_structures}", (x, estimate.value),
                            textcoords="offset points", xytext=(0, 7), ha="center",
                            fontsize="x-small", color=colour)  # fmt: skip
                too_few = True
                continue
            xs.append(x)
            ys.append(estimate.value)
            low = estimate.low if math.isfinite(estimate.low) else estimate.value
            high = estimate.high if math.isfinite(estimate.high) else estimate.value
            lows.append(estimate.value - low)
            highs.append(high - estimate.value)
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt=marker, color=colour, capsize=4,
                    markersize=7, linestyle="none", label=name)  # fmt: skip
    if too_few:
        ax.scatter([], [], s=45, facecolors="none", edgecolors="black", marker="o",
                   label="hollow: too few structures (no interval)")  # fmt: skip
    ax.set_xticks(range(len(categories)))
    tilt = len(categories) > 5 and not any("\n" in c for c in categories)
    ax.set_xticklabels(categories, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.margins(y=0.12)
    ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return save(fig, path)


def softening_summary_plot(
    evaluation: Evaluation,
    path: Path,
    level: str = "chemical_system",
    labels: Mapping[str, str] | None = None,
    band: tuple[float, float] | None = None,
) -> Path:
    """Softening scale of every model per group of ``level`` (e.g. per system, or per
    system and sampler): before and after, as points with error bars. ``labels``: display
    names of the models."""
    labels = labels or {}
    points = {
        key.replace("/", " / "): {
            labels.get(name, name): metrics.softening for name, metrics in result.models.items()
        }
        for key, result in evaluation.levels[level].items()
    }
    what = level.replace("chemical_system", "chemical system").replace("+", " and ")
    return softening_points_plot(points, path, f"softening scale per {what}", band=band)


def softening_by_force_plot(
    evaluation: Evaluation,
    key: str,
    path: Path,
    level: str = "chemical_system",
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Softening scale of every model in bins of the reference force per atom, for one
    group (e.g. one chemical system): stiff at small forces and soft at large ones shows as
    points above 1 on the left and below 1 on the right."""
    labels = labels or {}
    result = evaluation.group(level, key)
    points: dict[str, dict[str, Estimate]] = {}
    for name, metrics in result.models.items():
        for fbin in metrics.softening_by_force:
            category = f"{fbin.label}\n({fbin.n_atoms} atoms)"
            points.setdefault(category, {})[labels.get(name, name)] = fbin.softening
    return softening_points_plot(points, path, f"{key}: softening by reference force",
                                 xlabel="|F_ref| per atom (eV/Å)")  # fmt: skip


def evaluation_plots(
    evaluation: Evaluation,
    out_dir: Path,
    level: str = "chemical_system",
    labels: Mapping[str, str] | None = None,
    band: tuple[float, float] | None = None,
) -> dict[str, dict[str, Path]]:
    """Every plot of an evaluation into ``out_dir``: per group of ``level`` (chemical
    system) force, energy and stress parity (all models on each), force error against
    reference force, softening by force bin; and the softening summaries per level.
    Returns ``{group key or "summary": {plot kind: path}}``."""
    labels = labels or {}
    out_dir = Path(out_dir)
    name = {m: labels.get(m, m) for m in evaluation.models}
    written: dict[str, dict[str, Path]] = {}
    others = [lv for lv in evaluation.levels if lv != "all"]
    per_group = level if level in evaluation.levels else next(iter(others), None)
    # (plot kind, reference array, model arrays, title, what is plotted and its unit)
    parities = (
        ("forces", "reference_forces", "forces", "forces", {}),
        ("energy", "reference_energy", "energy", "energy per atom, each mean removed",
         {"quantity": "energy", "unit": "eV/atom", "fit": False}),
        ("stress", "reference_stress", "stress", "stress (Voigt components)",
         {"quantity": "stress component", "unit": "GPa", "fit": False}),
    )  # fmt: skip
    for key in evaluation.levels.get(per_group, {}) if per_group else ():
        arrays = evaluation.arrays(per_group, key)
        slug = _slug(key)
        plots: dict[str, Path] = {}
        for kind, reference, model, title, options in parities:
            if arrays[reference].size >= 2:  # energies: one per structure, two to compare
                plots[kind] = parity_plot(
                    arrays[reference],
                    {name[m]: arrays[model][m] for m in evaluation.models},
                    out_dir / f"parity-{kind}-{slug}.png",
                    title=f"{key}: {title}",
                    **options,
                )
        if arrays["reference_forces"].size:
            plots["force_error"] = force_error_plot(
                arrays["atom_force_norm"],
                {name[m]: arrays["atom_force_error"][m] for m in evaluation.models},
                out_dir / f"force-error-{slug}.png",
                title=f"{key}: force error against reference force",
                edges=_finite_edges(evaluation, arrays["atom_force_norm"]),
            )
            plots["softening_by_force"] = softening_by_force_plot(
                evaluation, key, out_dir / f"softening-by-force-{slug}.png", per_group, labels
            )
        written[key] = plots
    written["summary"] = {
        lv: softening_summary_plot(evaluation, out_dir / f"softening-{_slug(lv)}.png", lv,
                                   labels, band)
        for lv in others
    }  # fmt: skip
    return written


def _finite_edges(evaluation: Evaluation, norms: np.ndarray) -> list[float] | None:
    edges = evaluation.settings.get("force_bins")
    if not isinstance(edges, list):
        return None
    top = float(norms.max()) if norms.size else 1.0
    finite = [e for e in edges if e is not None and e < top]
    return [*finite, top * 1.0001]
