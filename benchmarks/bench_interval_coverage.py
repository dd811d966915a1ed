"""Coverage of the softening-scale and error intervals on simulated campaigns (numpy only).

Each simulated campaign has G structures of 8 atoms whose reference forces sum to zero, with
a rattle amplitude per structure spread over a range (the force scale of a structure); the
model force is ``s_g F_ref + e`` with a per-structure slope deviation ``s_g - s`` and a
model error ``e`` that is correlated within a structure (a sublattice pattern shared by the
atoms) plus independent noise, projected to zero sum. A second ("candidate") model on the
same structures has its own slope, its per-structure deviation correlated with the first's.
The true softening scale is ``s``; true MAEs come from a large Monte Carlo sample.

Prints, for each scenario and number of structures, the fraction of campaigns whose nominal
95 % interval covers the truth: CR2 with Bell-McCaffrey degrees of freedom (pestle's primary),
CR2 and CR1 with G - 1 degrees of freedom, the percentile cluster bootstrap, and the
component t interval; then the force MAE, energy MAE (offset removed) and the paired
differences (candidate - baseline) of the slope, |1 - s| and the force MAE.

    PYTHONPATH=. python benchmarks/bench_interval_coverage.py [--campaigns 1000]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy import stats

from pestle.evaluation.intervals import (
    IntervalOptions,
    energy_mae_interval,
    mae_interval,
    paired_mae,
    paired_softening,
    softening_interval,
)

TRUE_SLOPE = 0.85
CANDIDATE_SLOPE = 0.97


def campaign(rng, g, *, slope_sd=0.08, noise=0.08, amplitudes=(0.3, 2.0), atoms=8):
    """(reference, baseline, candidate) force arrays per structure, and per-atom energy
    errors of the baseline (offset 0.3 eV/atom plus a per-structure error)."""
    amp = np.exp(rng.uniform(np.log(amplitudes[0]), np.log(amplitudes[1]), g))
    sublattice = np.where(np.arange(atoms) % 2 == 0, 1.0, -1.0)[:, None]
    reference, baseline, candidate = [], [], []
    for k in range(g):
        z = rng.normal(size=(atoms, 3))
        x = amp[k] * (z - z.mean(0))
        shared = rng.normal(size=(1, 3))
        deviation = slope_sd * rng.normal()
        models = []
        for slope, dev, scale in ((TRUE_SLOPE, deviation, 1.0),
                                  (CANDIDATE_SLOPE, 0.5 * deviation + 0.3 * slope_sd
                                   * rng.normal(), 0.6)):  # fmt: skip
            error = scale * noise * (0.7 * sublattice * shared + 0.7 * rng.normal(size=x.shape))
            y = (slope + dev) * x + error
            models.append(y - y.mean(0))
        reference.append(x)
        baseline.append(models[0])
        candidate.append(models[1])
    energy = 0.3 + 0.01 * amp**2 * rng.normal(size=g) + 0.003 * rng.normal(size=g)
    return reference, baseline, candidate, energy


def truths(rng, scenario) -> dict[str, float]:
    ref, base, cand, energy = campaign(rng, 20000, **scenario)
    x, yb, yc = (np.concatenate([a.ravel() for a in arrays]) for arrays in (ref, base, cand))
    return {
        "force_mae": float(np.mean(np.abs(yb - x))),
        "force_mae_diff": float(np.mean(np.abs(yc - x)) - np.mean(np.abs(yb - x))),
        "energy_mae": float(np.mean(np.abs(energy - energy.mean()))),
    }


def covers(estimate, truth) -> bool:
    return bool(estimate.low <= truth <= estimate.high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--campaigns", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(2024)
    scenarios = {
        "amplitudes 0.3-2 (default)": {},
        "equal amplitudes": {"amplitudes": (1.0, 1.0001)},
        "amplitudes 0.1-3": {"amplitudes": (0.1, 3.0)},
        "no slope deviation": {"slope_sd": 0.0},
        "large slope deviation": {"slope_sd": 0.2},
    }
    boot = IntervalOptions(method="bootstrap", n_bootstrap=args.bootstrap, min_structures=1)
    started = time.perf_counter()
    print(f"Nominal 95 %, {args.campaigns} campaigns per cell, 8-atom cells.\n")
    print(
        "| scenario | G | slope: CR2 BM dof | CR2 G-1 | CR1 G-1 | bootstrap | component t | "
        "force MAE CR2 | energy MAE CR2 | Δ slope | Δ abs(1-s) | Δ force MAE | median BM dof |"
    )
    print("|---|" + "---|" * 13)
    for label, scenario in scenarios.items():
        truth = truths(rng, scenario)
        for g in (3, 5, 8, 10, 15, 20):
            hits = np.zeros(10)
            dofs = []
            for _ in range(args.campaigns):
                ref, base, cand, energy = campaign(rng, g, **scenario)
                fit = softening_interval(base, ref, min_structures=1)
                dofs.append(fit.dof)
                a = np.array([float(x.ravel() @ y.ravel()) for x, y in zip(ref, base, strict=True)])
                b = np.array([float(x.ravel() @ x.ravel()) for x in ref])
                u = a - fit.value * b
                q = stats.t.ppf(0.975, g - 1)
                se_cr2 = math.sqrt(np.sum(u**2 / (1 - b / b.sum()))) / b.sum()
                se_cr1 = math.sqrt(np.sum(u**2) * g / (g - 1)) / b.sum()
                hits[0] += covers(fit, TRUE_SLOPE)
                hits[1] += abs(fit.value - TRUE_SLOPE) <= q * se_cr2
                hits[2] += abs(fit.value - TRUE_SLOPE) <= q * se_cr1
                hits[3] += covers(softening_interval(base, ref, options=boot), TRUE_SLOPE)
                hits[4] += fit.component_low <= TRUE_SLOPE <= fit.component_high
                hits[5] += covers(mae_interval(base, ref, min_structures=1), truth["force_mae"])
                hits[6] += covers(
                    energy_mae_interval(energy, np.zeros(g), np.ones(g), min_structures=1),
                    truth["energy_mae"],
                )
                hits[7] += covers(paired_softening(cand, base, ref, min_structures=1),
                                  CANDIDATE_SLOPE - TRUE_SLOPE)  # fmt: skip
                hits[8] += covers(
                    paired_softening(cand, base, ref, distance=True, min_structures=1),
                    abs(1 - CANDIDATE_SLOPE) - abs(1 - TRUE_SLOPE),
                )
                hits[9] += covers(paired_mae(cand, base, ref, min_structures=1),
                                  truth["force_mae_diff"])  # fmt: skip
            cells = " | ".join(f"{h / args.campaigns:.3f}" for h in hits)
            print(f"| {label} | {g} | {cells} | {np.median(dofs):.1f} |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
