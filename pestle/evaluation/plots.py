"""Parity plots of model predictions against reference labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pestle.evaluation.metrics import softening_scale


def parity_plot(
    reference: np.ndarray,
    predictions: dict[str, np.ndarray],
    path: Path,
    title: str,
    quantity: str = "force component",
    unit: str = "eV/Å",
) -> Path:
    """PNG of each model's predictions against ``reference`` with its through-origin fit.

    The y = x line is "no softening"; each model's dashed line has the slope given in the
    legend (the softening scale when the quantity is a force component).
    """
    # Figure + Agg canvas, not pyplot: no global state, safe in worker threads and headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(reference, dtype=float).ravel()
    series = {name: np.asarray(y, dtype=float).ravel() for name, y in predictions.items()}
    for name, y in series.items():
        if y.shape != x.shape:
            raise ValueError(f"{name}: {y.size} predictions for {x.size} reference values")

    fig = Figure(figsize=(5.5, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = np.concatenate([x, *series.values()]) if x.size else np.zeros(1)
    finite = values[np.isfinite(values)]
    bound = float(np.max(np.abs(finite))) if finite.size else 1.0
    bound = 1.05 * bound if bound > 0 else 1.0
    line = np.array([-bound, bound])
    ax.plot(line, line, color="black", linewidth=1, label="y = x (no softening)")

    for index, (name, y) in enumerate(series.items()):
        colour = f"C{index}"
        ax.scatter(x, y, s=8, alpha=0.5, color=colour, edgecolors="none")
        fit = softening_scale(y, x)
        ax.plot(
            line,
            fit.slope * line,
            color=colour,
            linestyle="--",
            linewidth=1.5,
            label=f"{name}: slope {fit.slope:.3f} (n={fit.n})",
        )

    ax.set_xlim(-bound, bound)
    ax.set_ylim(-bound, bound)
    ax.set_aspect("equal")
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
