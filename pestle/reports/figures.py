"""The reports' own figures (the evaluation's parity, force-error and softening plots come
from ``pestle.evaluation.plots``): learning curves, dataset distributions, DFT cost per label,
softening against the number of labels, dataset growth, job throughput and failures, the
daemon's decisions with their intervals, and equation-of-state checks.

Each function draws from plain data (lists and dicts read from the store by the report
modules) into a PNG and returns its path. Figures are ``matplotlib.figure.Figure`` on an Agg
canvas, never pyplot: no global state, headless.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pestle.evaluation import plots
from pestle.evaluation.intervals import Estimate
from pestle.evaluation.plots import save

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MARKERS = ("o", "s", "^", "D", "v", "P", "X")
FONT = 10.5


def new_figure(width: float, height: float) -> Figure:
    return plots.new_figure(width, height, dpi=110)


def _finite(values: Sequence[float | None]) -> np.ndarray:
    array = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return array[np.isfinite(array)]


# -- learning curves ------------------------------------------------------------------------


@dataclass
class Curves:
    """One fine-tune's history: per epoch, train and validation loss and force MAE (None
    where the family does not record it), the epoch kept and why."""

    label: str
    epochs: list[int]
    train_loss: list[float | None]
    val_loss: list[float | None]
    train_force_mae: list[float | None]
    val_force_mae: list[float | None]
    best_epoch: int | None
    selection: str = ""
    validation_is_training: bool = False  # no validation labels: "validation" = training set

    @property
    def empty(self) -> bool:
        return not self.epochs


def curves_from_metrics(label: str, metrics: Mapping[str, Any]) -> Curves:
    """The per-epoch history of a model's stored ``metrics`` whatever the family recorded:
    CHGNet (``train_loss``, ``val_loss``, ``train_mae.f``, ``val_mae.f``), MACE (``val_mae_f``,
    no training MAE), matgl (``val_mae.Force``). A linear correction has no epochs."""
    epochs = [e for e in metrics.get("epochs") or [] if isinstance(e, Mapping)]

    def number(value: Any) -> float | None:
        try:
            out = float(value)
        except (TypeError, ValueError):
            return None
        return out if math.isfinite(out) else None

    def force_mae(entry: Mapping[str, Any], phase: str) -> float | None:
        mae = entry.get(f"{phase}_mae")
        if isinstance(mae, Mapping):
            return number(mae.get("f", mae.get("Force")))
        return number(entry.get(f"{phase}_mae_f"))

    best = metrics.get("best_epoch")
    best = int(best) if isinstance(best, (int, float)) and best >= 0 else None
    return Curves(
        label=label,
        epochs=[int(e.get("epoch", i)) for i, e in enumerate(epochs)],
        train_loss=[number(e.get("train_loss")) for e in epochs],
        val_loss=[number(e.get("val_loss")) for e in epochs],
        train_force_mae=[force_mae(e, "train") for e in epochs],
        val_force_mae=[force_mae(e, "val") for e in epochs],
        best_epoch=best,
        selection=str(metrics.get("selection") or ""),
        validation_is_training=str(metrics.get("val_source", "")).startswith("train_set"),
    )


def _curve(ax: Axes, epochs: Sequence[int], values: Sequence[float | None], **style: Any) -> bool:
    points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
    if not points:
        return False
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, marker="o", markersize=4, **style)
    return True


def learning_curves_plot(curves: Sequence[Curves], path: Path) -> Path:
    """Per model (one row each): training and validation loss (left) and force MAE (right)
    per epoch; the epoch kept is a dashed vertical line with its validation points starred."""
    rows = [c for c in curves if not c.empty]
    fig = new_figure(11, 3.4 * max(len(rows), 1))
    axes = fig.subplots(max(len(rows), 1), 2, squeeze=False)
    for (loss_ax, mae_ax), c in zip(axes, rows, strict=False):
        val_name = "validation" + (" (= training set: no validation labels)"
                                   if c.validation_is_training else "")  # fmt: skip
        for ax, train, val, what in (
            (loss_ax, c.train_loss, c.val_loss, "loss (the trainer's own)"),
            (mae_ax, c.train_force_mae, c.val_force_mae, "force MAE (eV/Å)"),
        ):
            drew = _curve(ax, c.epochs, train, color="C0", label="training (during the epoch)")
            drew |= _curve(ax, c.epochs, val, color="C1", label=val_name, linestyle="--")
            if not drew:
                ax.text(0.5, 0.5, f"{what.split(' (')[0]} not recorded by this trainer",
                        ha="center", va="center", transform=ax.transAxes, color="0.4")  # fmt: skip
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            finite = _finite([*train, *val])
            if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
                ax.set_yscale("log")
            if c.best_epoch is not None:
                ax.axvline(c.best_epoch, color="0.3", linestyle=":", linewidth=1.2,
                           label=f"epoch kept: {c.best_epoch}")  # fmt: skip
                kept = [v for e, v in zip(c.epochs, val, strict=True) if e == c.best_epoch]
                if kept and kept[0] is not None:
                    ax.scatter([c.best_epoch], kept, marker="*", s=160, color="C1",
                               edgecolors="black", zorder=4)  # fmt: skip
            ax.set_xlabel("epoch")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small", loc="best")
            if len(c.epochs) <= 12:
                ax.set_xticks(c.epochs)
            ax.margins(x=0.06)
        loss_ax.set_title(f"{c.label}: loss", fontsize=FONT)
        mae_ax.set_title(f"{c.label}: force MAE", fontsize=FONT)
    fig.tight_layout()
    return save(fig, path)


# -- dataset distributions ---------------------------------------------------------------


@dataclass
class Strip:
    """One row of a distribution panel: a set of structures and one quantity of each."""

    label: str
    values: list[float]
    colour: str
    missing: str = ""  # why there are no values (shown in the row)


@dataclass
class Panel:
    title: str
    xlabel: str
    strips: list[Strip] = field(default_factory=list)


def distributions_plot(title: str, panels: Sequence[Panel], path: Path) -> Path:
    """Strip plots, one panel per quantity, one row per set of structures (the same rows in
    every panel): each structure a point (jittered vertically), the median a black bar.
    Rows without values say why in the row."""
    fig = new_figure(3.4 * len(panels) + 2.2, 0.7 * max(len(p.strips) for p in panels) + 1.5)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, panel in zip(axes, panels, strict=True):
        n = len(panel.strips)
        for row, strip in enumerate(panel.strips):
            y = n - 1 - row
            values = _finite(strip.values)
            if not values.size:
                ax.text(0.5, y, strip.missing or "none", ha="center", va="center",
                        transform=ax.get_yaxis_transform(), fontsize="small", color="0.45",
                        style="italic")  # fmt: skip
                continue
            jitter = rng.uniform(-0.22, 0.22, values.size) if values.size > 1 else np.zeros(1)
            size = 36 if values.size <= 20 else 16
            ax.scatter(values, y + jitter, s=size, color=strip.colour, alpha=0.75,
                       edgecolors="white", linewidths=0.4, zorder=3)  # fmt: skip
            median = float(np.median(values))
            ax.plot([median, median], [y - 0.32, y + 0.32], color="black", linewidth=2, zorder=4)
        ax.set_yticks(range(n))
        ax.set_yticklabels([s.label for s in reversed(panel.strips)])
        ax.set_ylim(-0.6, n - 0.4)
        ax.set_xlabel(panel.xlabel)
        ax.set_title(panel.title, fontsize=FONT)
        ax.grid(axis="x", alpha=0.3)
        for y in range(n - 1):
            ax.axhline(y + 0.5, color="0.85", linewidth=0.8)
    fig.suptitle(title, fontsize=FONT + 1)
    fig.tight_layout()
    return save(fig, path)


# -- DFT cost --------------------------------------------------------------------------------


def cost_plot(seconds: Mapping[str, Sequence[float]], path: Path, what: str) -> Path:
    """Wall time per label, one row per chemical system (log scale), median a black bar."""
    systems = sorted(seconds)
    fig = new_figure(8.5, 0.55 * len(systems) + 1.5)
    ax = fig.add_subplot()
    rng = np.random.default_rng(1)
    positive = _finite([v for s in systems for v in seconds[s]])
    positive = positive[positive > 0]
    # Times recorded as 0 (below the clock's resolution) sit at the left edge, hollow.
    floor = float(positive.min()) / 2 if positive.size else 1e-3
    zeros = False
    for row, system in enumerate(systems):
        y = len(systems) - 1 - row
        raw = _finite(seconds[system])
        if not raw.size:
            continue
        values = np.maximum(raw, floor)
        jitter = rng.uniform(-0.2, 0.2, values.size) if values.size > 1 else np.zeros(1)
        colour = f"C{row % 10}"
        timed = raw > 0
        ax.scatter(values[timed], (y + jitter)[timed], s=30, color=colour, alpha=0.75,
                   edgecolors="white", linewidths=0.4, zorder=3)  # fmt: skip
        if not timed.all():
            zeros = True
            ax.scatter(values[~timed], (y + jitter)[~timed], s=30, facecolors="none",
                       edgecolors=colour, zorder=3)  # fmt: skip
        median = float(np.median(values))
        ax.plot([median, median], [y - 0.3, y + 0.3], color="black", linewidth=2, zorder=4)
        ax.annotate(f"median {seconds_text(median)}, n = {values.size}", (median, y + 0.3),
                    textcoords="offset points", xytext=(4, 2), fontsize="small")  # fmt: skip
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    span = math.log10(float(positive.max()) / floor) if positive.size else 1.0
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if span > 2.5 else (1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: seconds_text(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if zeros:
        ax.text(0.005, 0.01, "hollow, at the left edge: recorded as 0 s (below the timer's "
                "resolution)", transform=ax.transAxes, fontsize="x-small", color="0.4")  # fmt: skip
    ax.set_yticks(range(len(systems)))
    ax.set_yticklabels(list(reversed(systems)))
    ax.set_ylim(-0.6, len(systems) - 0.2)
    ax.set_xlabel(f"{what} per label (log scale)")
    ax.set_title("reference-calculation cost per label", fontsize=FONT)
    ax.grid(axis="x", which="both", alpha=0.25)
    fig.tight_layout()
    return save(fig, path)


def seconds_text(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1000:.3g} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


# -- softening against the number of labels ------------------------------------------------


@dataclass
class LabelPoint:
    """One model version's softening scale of one system against the labels it trained on."""

    n_labels: int
    estimate: Estimate
    model: str
    kind: str = "fine-tuned"  # pretrained | fine-tuned | promoted


KIND_STYLE = {"pretrained": ("D", "0.35"), "fine-tuned": ("o", "C0"), "promoted": ("*", "C2")}


def softening_vs_labels_plot(points: Mapping[str, Sequence[LabelPoint]], path: Path) -> Path:
    """One panel per chemical system: each model version's evaluation-set softening scale
    (structure-level 95% interval) against the number of that system's labels it trained
    on; the pretrained model at 0. Points are not joined (each is a separate model).
    Too few structures: a hollow point without an interval."""
    systems = sorted(points)
    columns = min(len(systems), 3) or 1
    rows = math.ceil(len(systems) / columns) or 1
    fig = new_figure(4.3 * columns + 0.6, 3.5 * rows + 0.5)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    used_kinds: set[str] = set()
    too_few = False
    for ax, system in zip(axes, systems, strict=False):
        ax.axhline(1.0, color="black", linewidth=1)
        for p in points[system]:
            marker, colour = KIND_STYLE.get(p.kind, ("o", "C0"))
            size = 12 if marker == "*" else 7
            e = p.estimate
            if not math.isfinite(e.value):
                continue
            used_kinds.add(p.kind)
            if not e.enough:
                too_few = True
                ax.plot([p.n_labels], [e.value], marker=marker, markersize=size,
                        markerfacecolor="none", markeredgecolor=colour, linestyle="none")  # fmt: skip
                ax.annotate(f"n = {e.n_structures}", (p.n_labels, e.value),
                            textcoords="offset points", xytext=(0, 7), ha="center",
                            fontsize="x-small", color=colour)  # fmt: skip
                continue
            low = e.low if math.isfinite(e.low) else e.value
            high = e.high if math.isfinite(e.high) else e.value
            ax.errorbar([p.n_labels], [e.value],
                        yerr=[[max(0.0, e.value - low)], [max(0.0, high - e.value)]],
                        fmt=marker, color=colour, markersize=size, capsize=4)  # fmt: skip
        ax.set_title(system, fontsize=FONT)
        ax.set_xlabel(f"{system} labels trained on")
        ax.set_ylabel("softening scale (95% CI)")
        ax.margins(x=0.15, y=0.15)
        ax.set_xlim(left=min(-0.5, ax.get_xlim()[0]))
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[len(systems) :]:
        ax.set_visible(False)
    handles = []
    from matplotlib.lines import Line2D

    for kind in ("pretrained", "fine-tuned", "promoted"):
        if kind in used_kinds:
            marker, colour = KIND_STYLE[kind]
            handles.append(Line2D([], [], marker=marker, color=colour, linestyle="none",
                                  markersize=8, label=kind))  # fmt: skip
    if too_few:
        handles.append(Line2D([], [], marker="o", color="0.3", markerfacecolor="none",
                              linestyle="none", label="hollow: too few structures"))  # fmt: skip
    handles.append(Line2D([], [], color="black", label="1 = no softening"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small",
               frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.07 if rows == 1 else 0.04, 1, 1))
    return save(fig, path)


# -- dataset growth, jobs ---------------------------------------------------------------------


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def growth_plot(
    times: Mapping[str, Sequence[datetime]],
    per_sampler: Mapping[str, Mapping[str, int]],
    path: Path,
) -> Path:
    """Cumulative labels per chemical system over time (left); labels per system and
    sampler, stacked (right)."""
    import matplotlib.dates as mdates

    fig = new_figure(11.5, 4.2)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    every = sorted(_utc(m) for moments in times.values() for m in moments)
    start = every[0] if every else datetime.now(timezone.utc)
    # A short campaign on a clock axis is all ticks and no time: elapsed time instead.
    span = (every[-1] - start).total_seconds() if every else 0.0
    elapsed = bool(every) and span < 7200
    unit, per = ("seconds", 1.0) if span < 120 else ("minutes", 60.0)
    for index, (system, moments) in enumerate(sorted(times.items())):
        ordered = sorted(_utc(m) for m in moments)
        xs: Sequence[Any] = ordered
        if elapsed:
            xs = [(m - start).total_seconds() / per for m in ordered]
        left.step(xs, np.arange(1, len(ordered) + 1), where="post", label=system,
                  color=f"C{index % 10}", linewidth=1.8)  # fmt: skip
    if elapsed:
        left.set_xlabel(f"{unit} since the first label ({start:%Y-%m-%d %H:%M} UTC)")
    else:
        locator = mdates.AutoDateLocator(maxticks=7)
        left.xaxis.set_major_locator(locator)
        left.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=timezone.utc))
        left.set_xlabel("time (UTC)")
    left.set_ylabel("labels stored (cumulative)")
    left.set_title("dataset growth", fontsize=FONT)
    left.grid(alpha=0.3)
    if times:
        left.legend(fontsize="small", loc="upper left")
    systems = sorted(per_sampler)
    samplers = sorted({s for counts in per_sampler.values() for s in counts})
    bottom = np.zeros(len(systems))
    for index, sampler in enumerate(samplers):
        heights = np.array([per_sampler[s].get(sampler, 0) for s in systems], dtype=float)
        right.bar(systems, heights, bottom=bottom, label=sampler, color=f"C{index % 10}",
                  edgecolor="white")  # fmt: skip
        bottom += heights
    for x, total in enumerate(bottom):
        right.annotate(f"{total:.0f}", (x, total), textcoords="offset points", xytext=(0, 2),
                       ha="center", fontsize="small")  # fmt: skip
    right.set_ylabel("labels")
    right.set_title("labels per chemical system and sampler", fontsize=FONT)
    right.margins(y=0.1)
    if samplers:
        right.legend(fontsize="small")
    fig.tight_layout()
    return save(fig, path)


def _elapsed_unit(span_seconds: float) -> tuple[str, float]:
    if span_seconds < 120:
        return "seconds", 1.0
    if span_seconds < 3 * 3600:
        return "minutes", 60.0
    if span_seconds < 3 * 86400:
        return "hours", 3600.0
    return "days", 86400.0


def jobs_plot(
    finished: Sequence[tuple[datetime, str]], failures: Mapping[str, int], path: Path
) -> Path:
    """Jobs finished per time bin, stacked by final state (failed in red), against the time
    since the first job finished. With two or more kinds of error, a second panel counts the
    failed jobs per error (one kind is said in the report's table; nothing failed, no panel)."""
    panel = len(failures) >= 2
    fig = new_figure(11.5 if panel else 8.0, 4.0)
    ratios = {"width_ratios": [1.3, 1]} if panel else {}
    axes = fig.subplots(1, 2 if panel else 1, squeeze=False, gridspec_kw=ratios)[0]
    left = axes[0]
    stamps = sorted(_utc(t) for t, _ in finished)
    start = stamps[0] if stamps else datetime.now(timezone.utc)
    span = (stamps[-1] - start).total_seconds() if stamps else 0.0
    unit, per = _elapsed_unit(span)
    elapsed = [(_utc(t) - start).total_seconds() / per for t, _ in finished]
    top = max(elapsed, default=0.0)
    width = _nice_width(top / 30 if top > 0 else 1.0)
    edges = np.arange(0.0, top + width * 1.001, width)
    if len(edges) < 2:
        edges = np.array([0.0, width])
    states = sorted({s for _, s in finished})
    colours = {"done": "C2", "failed": "C3", "withdrawn": "0.6"}
    stacked = [[x for x, (_, s) in zip(elapsed, finished, strict=True) if s == state]
               for state in states]  # fmt: skip
    if stacked:
        left.hist(stacked, bins=edges, stacked=True, label=states, edgecolor="white",
                  color=[colours.get(s, "C0") for s in states])  # fmt: skip
        left.legend(fontsize="small")
    left.set_xlabel(f"{unit} since the first job finished; bins of {width:g} {unit}")
    left.set_ylabel("jobs finished per bin")
    left.yaxis.get_major_locator().set_params(integer=True)
    left.set_title(f"job throughput from {start:%Y-%m-%d %H:%M} UTC", fontsize=FONT)
    left.grid(axis="y", alpha=0.3)
    if panel:
        right = axes[1]
        names, counts = zip(*sorted(failures.items(), key=lambda kv: -kv[1])[:8], strict=True)
        right.barh(range(len(names)), counts, color="C3", height=0.6)
        right.set_yticks(range(len(names)))
        right.set_yticklabels([_wrap(n, 45) for n in names], fontsize="x-small")
        right.invert_yaxis()
        right.set_xlabel("failed jobs")
        right.set_title("failures by error", fontsize=FONT)
        right.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return save(fig, path)


def _nice_width(raw: float) -> float:
    """The smallest of 1, 2, 5 x 10^k at least ``raw``."""
    exponent = math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 5.0, 10.0):
        width = factor * 10.0**exponent
        if width >= raw * 0.999:
            return width
    return 10.0 ** (exponent + 1)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:2])


# -- decisions --------------------------------------------------------------------------------


@dataclass
class DecisionPoint:
    label: str  # e.g. "12-01 03:10\nmodel-1a2b3c4d"
    value: float  # relative change (candidate / incumbent - 1), in %
    low: float
    high: float
    outcome: str
    enough: bool = True
    n_structures: int = 0


def decisions_plot(points: Sequence[DecisionPoint], path: Path, metric: str) -> Path:
    """Each retraining's paired change of the promotion figure (candidate against the model
    it would replace, on the same evaluation-set structures) with its 95% interval; colour
    by outcome. Below zero: the candidate is better."""
    fig = new_figure(min(max(6.5, 1.3 * len(points) + 2.5), 16.0), 4.5)
    ax = fig.add_subplot()
    colours = {"promoted": "C2", "kept": "0.45", "failed": "C3", "postponed": "0.7"}
    ax.axhline(0.0, color="black", linewidth=1)
    seen: set[str] = set()
    for x, p in enumerate(points):
        colour = colours.get(p.outcome, "C0")
        label = p.outcome if p.outcome not in seen else None
        seen.add(p.outcome)
        if not p.enough or not math.isfinite(p.value):
            if math.isfinite(p.value):
                ax.plot([x], [p.value], "o", markerfacecolor="none", markeredgecolor=colour,
                        label=label)  # fmt: skip
            ax.annotate(f"n = {p.n_structures}", (x, p.value if math.isfinite(p.value) else 0),
                        textcoords="offset points", xytext=(0, 7), ha="center",
                        fontsize="x-small", color=colour)  # fmt: skip
            continue
        low = p.low if math.isfinite(p.low) else p.value
        high = p.high if math.isfinite(p.high) else p.value
        ax.errorbar([x], [p.value], yerr=[[max(0.0, p.value - low)], [max(0.0, high - p.value)]],
                    fmt="o",
                    color=colour, capsize=4, markersize=7, label=label)  # fmt: skip
    ax.set_xticks(range(len(points)))
    tilt = len(points) > 6
    ax.set_xticklabels([p.label for p in points], rotation=30 if tilt else 0,
                       ha="right" if tilt else "center", fontsize="small")  # fmt: skip
    ax.set_xlim(-0.6, len(points) - 0.4)
    ax.margins(y=0.15)
    ax.set_ylabel(f"candidate − incumbent: {metric} (95% CI)")
    ax.set_title("retraining decisions: paired change on the evaluation set", fontsize=FONT)
    ax.grid(axis="y", alpha=0.3)
    if seen:
        ax.legend(fontsize="small", title="outcome", title_fontsize="small")
    fig.tight_layout()
    return save(fig, path)


# -- model versions ---------------------------------------------------------------------------


def versions_plot(
    points: Mapping[str, Mapping[str, Estimate]],
    path: Path,
    title: str,
    xlabel: str = "chemical system",
) -> Path:
    """``points[category][model] = Estimate``: softening per chemical system (or system and
    sampler), the models side by side as points with error bars (categories not joined), the
    legend below the axes, where it hides no point; too few structures: hollow, "n = ..",
    no interval."""
    from matplotlib.lines import Line2D

    systems = list(points)
    models: list[str] = []
    for per in points.values():
        models += [m for m in per if m not in models]
    fig = new_figure(min(max(6.5, 1.0 * len(systems) * max(1, len(models)) ** 0.6 + 2.5), 16.0),
                     5.0)  # fmt: skip
    ax = fig.add_subplot()
    ax.axhline(1.0, color="black", linewidth=1)
    step = 0.7 / max(len(models), 1)
    too_few = False
    handles = [Line2D([], [], color="black", label="1 = no softening")]
    for index, model in enumerate(models):
        colour, marker = f"C{index % 10}", MARKERS[index % len(MARKERS)]
        handles.append(Line2D([], [], marker=marker, color=colour, linestyle="none",
                              markersize=7, label=model))  # fmt: skip
        for j, system in enumerate(systems):
            e = points[system].get(model)
            if e is None or not math.isfinite(e.value):
                continue
            x = j - 0.35 + (index + 0.5) * step
            if not e.enough:
                too_few = True
                ax.plot([x], [e.value], marker=marker, markerfacecolor="none",
                        markeredgecolor=colour, linestyle="none", markersize=7)  # fmt: skip
                ax.annotate(f"n = {e.n_structures}", (x, e.value), textcoords="offset points",
                            xytext=(0, 7), ha="center", fontsize="x-small", color=colour)  # fmt: skip
                continue
            low = e.low if math.isfinite(e.low) else e.value
            high = e.high if math.isfinite(e.high) else e.value
            ax.errorbar([x], [e.value], yerr=[[max(0.0, e.value - low)], [max(0.0, high - e.value)]],
                        fmt=marker, color=colour, capsize=4, markersize=7)  # fmt: skip
    if too_few:
        handles.append(Line2D([], [], marker="o", color="0.3", markerfacecolor="none",
                              linestyle="none", label="hollow: too few structures"))  # fmt: skip
    ax.set_xticks(range(len(systems)))
    tilt = len(systems) > 6
    ax.set_xticklabels(systems, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_xlim(-0.6, len(systems) - 0.4)
    ax.margins(y=0.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("softening scale (structure-level 95% CI)")
    ax.set_title(title, fontsize=FONT)
    ax.grid(axis="y", alpha=0.3)
    columns = min(len(handles), 5)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize="small", frameon=False)
    rows = math.ceil(len(handles) / columns)
    fig.tight_layout(rect=(0, 0.03 + 0.045 * rows, 1, 1))
    return save(fig, path)


# -- equation of state -----------------------------------------------------------------------


def ratio_points_plot(
    points: Mapping[str, Mapping[str, tuple[float, float, float]]],
    path: Path,
    title: str,
    ylabel: str,
) -> Path:
    """``points[category][model] = (value, low, high)`` as points with error bars around 1
    (e.g. bulk modulus of a model over the reference's); categories are not joined."""
    categories = list(points)
    models: list[str] = []
    for per in points.values():
        models += [m for m in per if m not in models]
    fig = new_figure(max(6.0, 1.3 * len(categories) + 3), 4.2)
    ax = fig.add_subplot()
    ax.axhline(1.0, color="black", linewidth=1, label="1 = reference")
    step = 0.6 / max(len(models), 1)
    for index, model in enumerate(models):
        xs, ys, lows, highs = [], [], [], []
        for j, category in enumerate(categories):
            if model not in points[category]:
                continue
            value, low, high = points[category][model]
            if not math.isfinite(value):
                continue
            xs.append(j - 0.3 + (index + 0.5) * step)
            ys.append(value)
            lows.append(max(0.0, value - (low if math.isfinite(low) else value)))
            highs.append(max(0.0, (high if math.isfinite(high) else value) - value))
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt=MARKERS[index % len(MARKERS)],
                    color=f"C{index}", capsize=4, markersize=7, linestyle="none", label=model)  # fmt: skip
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories)
    ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.margins(y=0.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=FONT)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save(fig, path)
