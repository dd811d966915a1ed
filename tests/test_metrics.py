"""Softening fit, error helpers and the parity plot on synthetic data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pestle.evaluation.metrics import (
    energy_mae_per_atom,
    force_mae,
    force_rmse,
    softening_scale,
)
from pestle.evaluation.plots import parity_plot


def test_recovers_softening_from_noisy_data() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 1.0, size=(200, 3))
    model = 0.8 * reference + rng.normal(0.0, 0.1, size=reference.shape)
    fit = softening_scale(model, reference)
    assert fit.n == 600
    assert fit.ci_low < 0.8 < fit.ci_high
    assert fit.ci_low < fit.slope < fit.ci_high
    assert fit.slope == pytest.approx(0.8, abs=0.02)
    assert fit.ci_high - fit.ci_low < 0.05


def test_interval_has_its_nominal_coverage() -> None:
    rng = np.random.default_rng(1)
    hits = 0
    trials = 400
    for _ in range(trials):
        x = rng.normal(0.0, 1.0, 30)
        y = 0.8 * x + rng.normal(0.0, 0.2, 30)
        fit = softening_scale(y, x, confidence=0.9)
        hits += fit.ci_low <= 0.8 <= fit.ci_high
    assert 0.85 <= hits / trials <= 0.95


def test_exact_data_gives_exact_slope() -> None:
    reference = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.5]])
    fit = softening_scale(0.8 * reference, reference)
    assert fit.slope == pytest.approx(0.8, rel=1e-14)
    assert fit.ci_low == pytest.approx(0.8, rel=1e-14)
    assert fit.ci_high == pytest.approx(0.8, rel=1e-14)
    assert fit.n == 6


def test_degenerate_fits_are_nan() -> None:
    assert math.isnan(softening_scale([], []).slope)
    assert math.isnan(softening_scale([0.0, 0.0], [0.0, 0.0]).slope)
    one = softening_scale([2.0], [1.0])
    assert one.slope == 2.0 and math.isnan(one.ci_low)
    with pytest.raises(ValueError):
        softening_scale([1.0, 2.0], [1.0])


def test_error_helpers() -> None:
    reference = np.array([[1.0, 0.0, -1.0]])
    model = np.array([[1.5, 0.0, -2.0]])
    assert force_mae(model, reference) == pytest.approx(0.5)
    assert force_rmse(model, reference) == pytest.approx(math.sqrt((0.25 + 1.0) / 3))
    assert energy_mae_per_atom([-10.0, -4.0], [-12.0, -4.5], [2, 1]) == pytest.approx(0.75)


def test_parity_plot_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(0.0, 1.0, 150)
    path = parity_plot(
        reference,
        {
            "pretrained": 0.8 * reference + rng.normal(0.0, 0.05, 150),
            "fine-tuned": reference + rng.normal(0.0, 0.05, 150),
        },
        tmp_path / "plots" / "parity.png",
        title="Si: held-out forces",
    )
    assert path == tmp_path / "plots" / "parity.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    with pytest.raises(ValueError):
        parity_plot(reference, {"bad": reference[:-1]}, tmp_path / "x.png", title="x")


def test_energy_offset_between_codes_is_removed() -> None:
    from pestle.evaluation.metrics import energy_mae_per_atom, energy_mae_per_atom_offset_removed

    reference = np.array([-80.0, -79.2, -78.4])
    n_atoms = np.array([8, 8, 8])
    # A model on another energy zero (+1.5 eV/atom) whose relative energies are exact...
    shifted = reference + 1.5 * n_atoms
    assert energy_mae_per_atom(shifted, reference, n_atoms) == pytest.approx(1.5)
    assert energy_mae_per_atom_offset_removed(shifted, reference, n_atoms) == pytest.approx(0.0)
    # ...and one whose relative energies are off by +-0.1 eV/atom around the offset.
    noisy = shifted + np.array([0.8, -0.8, 0.0])
    assert energy_mae_per_atom_offset_removed(noisy, reference, n_atoms) == pytest.approx(
        (0.1 + 0.1 + 0.0) / 3
    )
