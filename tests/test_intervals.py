"""Structure-level intervals: coverage on simulated campaigns (correlated components within a
structure), the CR2 algebra, paired comparisons and the decision helpers, the "not enough
structures" rule, and the one evaluation path (``evaluate``) with its table and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from pestle.evaluation.evaluate import evaluate
from pestle.evaluation.intervals import (
    Difference,
    Estimate,
    IntervalOptions,
    energy_mae_interval,
    format_difference,
    format_estimate,
    mae_interval,
    paired_error_ratio,
    paired_mae,
    paired_softening,
    softening_distance_interval,
    softening_interval,
)
from pestle.evaluation.metrics import energy_mae_per_atom_offset_removed, softening_scale
from pestle.potentials import Prediction
from pestle.potentials.emt import EMTPotential

TRUE_SLOPE = 0.85
CANDIDATE_SLOPE = 0.97


def simulated_campaign(rng: np.random.Generator, n_structures: int, atoms: int = 8):
    """Reference forces (zero sum per structure, a rattle amplitude per structure spread
    over a factor ~7), and two models on the same structures: per-structure slope deviation
    (the candidate's correlated with the baseline's) plus a model error shared by a
    sublattice (correlated within the structure) and independent noise, both zero-sum."""
    g = n_structures
    amplitude = np.exp(rng.uniform(np.log(0.3), np.log(2.0), (g, 1, 1)))
    sublattice = np.where(np.arange(atoms) % 2 == 0, 1.0, -1.0)[None, :, None]
    z = rng.normal(size=(g, atoms, 3))
    x = amplitude * (z - z.mean(1, keepdims=True))
    deviation = 0.08 * rng.normal(size=(g, 1, 1))
    models = []
    for slope, dev, scale in (
        (TRUE_SLOPE, deviation, 1.0),
        (CANDIDATE_SLOPE, 0.5 * deviation + 0.024 * rng.normal(size=(g, 1, 1)), 0.6),
    ):
        pattern = sublattice * rng.normal(size=(g, 1, 3))
        error = scale * 0.08 * (0.7 * pattern + 0.7 * rng.normal(size=x.shape))
        y = (slope + dev) * x + error
        models.append(y - y.mean(1, keepdims=True))
    return list(x), list(models[0]), list(models[1])


def test_structure_interval_covers_and_component_t_does_not() -> None:
    """The coverage test: nominal 95 % over a few hundred simulated campaigns of 5-15
    structures. Run with ``pytest -s`` to see the figures."""
    rng = np.random.default_rng(13)
    # True force-MAE difference (candidate - baseline) from a large sample.
    ref, base, cand = simulated_campaign(rng, 20000)
    x, yb, yc = (np.concatenate([a.ravel() for a in arrays]) for arrays in (ref, base, cand))
    true_mae_difference = float(np.mean(np.abs(yc - x)) - np.mean(np.abs(yb - x)))
    # True geometric-mean ratio of per-structure force MAEs (what a promotion decides on).
    true_log_ratio = float(np.mean([np.log(np.abs(c - r).mean() / np.abs(b - r).mean())
                                    for r, b, c in zip(ref, base, cand, strict=True)]))  # fmt: skip
    campaigns = 300
    print(f"\ncoverage of nominal 95 % intervals, {campaigns} simulated campaigns each:")
    for n in (5, 10, 15):
        hits = dict.fromkeys(
            ("structure", "component t", "paired slope", "paired MAE", "paired MAE ratio"), 0
        )
        for _ in range(campaigns):
            ref, base, cand = simulated_campaign(rng, n)
            fit = softening_interval(base, ref)
            hits["structure"] += fit.low <= TRUE_SLOPE <= fit.high
            hits["component t"] += fit.component_low <= TRUE_SLOPE <= fit.component_high
            diff = paired_softening(cand, base, ref)
            hits["paired slope"] += diff.low <= CANDIDATE_SLOPE - TRUE_SLOPE <= diff.high
            mae = paired_mae(cand, base, ref)
            hits["paired MAE"] += mae.low <= true_mae_difference <= mae.high
            ratio = paired_error_ratio(cand, base, ref)
            hits["paired MAE ratio"] += (
                ratio.ratio_low <= np.exp(true_log_ratio) <= ratio.ratio_high
            )
        coverage = {k: v / campaigns for k, v in hits.items()}
        print(f"  {n:2d} structures: " + ", ".join(f"{k} {v:.3f}" for k, v in coverage.items()))
        assert coverage["structure"] >= 0.90
        assert coverage["component t"] <= 0.60
        assert coverage["paired slope"] >= 0.90
        assert coverage["paired MAE"] >= 0.85
        assert coverage["paired MAE ratio"] >= 0.90


def test_cr2_algebra() -> None:
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(8, 3)) * a for a in (0.5, 1.0, 1.5, 2.0, 3.0)]
    model = [(0.9 + 0.05 * rng.normal()) * x + 0.05 * rng.normal(size=x.shape) for x in ref]
    fit = softening_interval(model, ref)
    a = np.array([float(x.ravel() @ y.ravel()) for x, y in zip(ref, model, strict=True)])
    b = np.array([float(x.ravel() @ x.ravel()) for x in ref])
    slope = a.sum() / b.sum()
    assert fit.value == pytest.approx(slope)
    assert fit.value == pytest.approx(
        softening_scale(np.concatenate(model), np.concatenate(ref)).slope
    )
    se = math.sqrt(np.sum((a - slope * b) ** 2 / (1 - b / b.sum()))) / b.sum()
    assert fit.se == pytest.approx(se)
    assert 1 <= fit.dof < 4  # unequal structures: fewer degrees of freedom than G - 1
    assert fit.n_structures == 5 and fit.n_values == 120

    # Equal structures: Bell-McCaffrey degrees of freedom are G - 1.
    ref = [np.eye(3) * k for k in (1, -1, 1, -1)]
    model = [0.8 * x + 0.01 * i for i, x in enumerate(ref)]
    assert softening_interval(model, ref, min_structures=1).dof == pytest.approx(3)

    # An exact model: zero width.
    exact = softening_interval([0.8 * x for x in ref], ref, min_structures=1)
    assert exact.low == pytest.approx(0.8) and exact.high == pytest.approx(0.8)


def test_not_enough_structures_and_formatting() -> None:
    rng = np.random.default_rng(1)
    ref = [rng.normal(size=(8, 3)) for _ in range(3)]
    model = [0.9 * x + 0.05 * rng.normal(size=x.shape) for x in ref]
    few = softening_interval(model, ref)  # default minimum is 5
    assert not few.enough and math.isfinite(few.value) and math.isfinite(few.low)
    assert format_estimate(few) == "not enough structures (n = 3)"
    assert format_estimate(few.as_dict()) == "not enough structures (n = 3)"
    assert not few.inside(0.0, 2.0)
    ok = softening_interval(model, ref, min_structures=3)
    assert ok.enough and ok.inside(0.0, 2.0) and not ok.inside(0.99, 1.01)
    assert format_estimate(ok).startswith(f"{ok.value:.3f} [")
    assert format_estimate(mae_interval(model, ref, min_structures=3), 1, 1000.0).count(".") == 3
    one = softening_interval(model[:1], ref[:1], min_structures=1)
    assert math.isnan(one.low) and format_estimate(one) == f"{one.value:.3f}"
    empty = softening_interval([], [])
    assert math.isnan(empty.value) and format_estimate(empty) == "not enough structures (n = 0)"
    with pytest.raises(ValueError, match="components"):
        softening_interval([np.zeros(3)], [np.zeros(6)])
    with pytest.raises(ValueError, match="method"):
        IntervalOptions(method="jackknife")

    # JSON-friendly: NaN becomes None, and back.
    data = one.as_dict()
    assert data["low"] is None and data["enough"] is True  # enough by min_structures=1
    assert not one.inside(0.0, 2.0)  # but no interval to decide on
    json.dumps(data, allow_nan=False)
    back = Estimate.from_dict(data)
    assert back.value == one.value and math.isnan(back.low)


def test_bootstrap_is_seeded_and_resamples_structures() -> None:
    rng = np.random.default_rng(3)
    ref = [rng.normal(size=(8, 3)) for _ in range(12)]
    model = [(0.8 + 0.1 * rng.normal()) * x for x in ref]
    options = IntervalOptions(method="bootstrap", n_bootstrap=500, seed=4)
    first = softening_interval(model, ref, options=options)
    assert first == softening_interval(model, ref, options=options)
    assert first.low < 0.8 < first.high and math.isnan(first.dof)
    cr2 = softening_interval(model, ref)
    # Both far wider than the component t interval, which ignores the per-structure slopes.
    width = cr2.component_high - cr2.component_low
    assert first.high - first.low > 3 * width and cr2.high - cr2.low > 3 * width


def test_paired_decisions() -> None:
    rng = np.random.default_rng(5)
    ref, base, cand = simulated_campaign(rng, 12)
    mae = paired_mae(cand, base, ref)
    assert mae.metric == "force_mae" and mae.lower_is_better
    assert mae.value == pytest.approx(mae.candidate - mae.baseline)
    assert mae.ratio == pytest.approx(mae.candidate / mae.baseline)
    assert mae.high < 0 and mae.improved() and not mae.worse()
    assert mae.ratio_high < 1
    # A margin the improvement does not reach is not an improvement.
    assert not mae.improved(min_improvement=0.99)
    reverse = paired_mae(base, cand, ref)
    assert reverse.worse() and not reverse.improved()
    assert format_difference(mae).startswith(f"{mae.value:+.3f} [")
    assert format_difference(mae, relative=True).endswith("%]")

    slope = paired_softening(cand, base, ref)
    assert slope.value == pytest.approx(
        softening_interval(cand, ref).value - softening_interval(base, ref).value
    )
    assert slope.lower_is_better is None
    with pytest.raises(ValueError, match="neither direction"):
        slope.improved()
    distance = paired_softening(cand, base, ref, distance=True)
    assert distance.value < 0 and distance.low < distance.value < distance.high
    # Both on the same side of 1: |1 - s| moves with s and the paired intervals agree.
    halfway = [0.5 * (b + c) for b, c in zip(base, cand, strict=True)]
    closer = paired_softening(halfway, base, ref, distance=True)
    along = paired_softening(halfway, base, ref)
    assert closer.value == pytest.approx(-along.value)
    assert closer.low == pytest.approx(-along.high) and closer.improved()

    # Both models err more on the same (large-displacement) structures: the paired standard
    # error is smaller than that of two independent figures.
    separate = mae_interval(cand, ref), mae_interval(base, ref)
    assert mae.se < math.hypot(*(e.se for e in separate))

    # Too few structures: no decision either way.
    few = paired_mae(cand[:3], base[:3], ref[:3])
    assert not few.enough and not few.improved() and not few.worse()
    assert format_difference(few) == "not enough structures (n = 3)"
    assert Difference.from_dict(few.as_dict()).n_structures == 3


def test_stratified_figures_and_energy() -> None:
    rng = np.random.default_rng(7)
    ref = [rng.normal(size=(8, 3)) for _ in range(8)]
    model = [(0.8 if i < 4 else 1.1) * x for i, x in enumerate(ref)]
    strata = ["A"] * 4 + ["B"] * 4
    mean_slope = softening_interval(model, ref, strata=strata)
    assert mean_slope.value == pytest.approx((0.8 + 1.1) / 2)
    distance = softening_distance_interval(model, ref, strata=strata)
    assert distance.value == pytest.approx((0.2 + 0.1) / 2)
    assert distance.low == pytest.approx(distance.value)  # exact models: zero width

    reference = np.array([-80.0, -79.2, -78.4, -77.9, -81.0, -30.0])
    n_atoms = np.full(6, 8)
    model_e = reference + 1.5 * n_atoms + np.array([0.8, -0.8, 0.0, 0.4, -0.4, 5.0])
    systems = ["Si"] * 5 + ["Cu"]
    mae = energy_mae_interval(model_e, reference, n_atoms, strata=systems, min_structures=1)
    # The single Cu structure has no relative energy and is left out.
    assert mae.n_structures == 5
    assert mae.value == pytest.approx(
        energy_mae_per_atom_offset_removed(model_e[:5], reference[:5], n_atoms[:5])
    )
    assert 0 <= mae.low <= mae.value <= mae.high
    # An error's interval is built on the log scale: longer above than below.
    assert mae.high - mae.value > mae.value - mae.low > 0
    # The bootstrap resamples within each system (the offsets stay per system).
    two = np.array(["Si"] * 3 + ["Cu"] * 3)
    shifted = reference + n_atoms * np.where(two == "Si", 1.5, -7.0)
    boot = energy_mae_interval(
        shifted + np.array([0.8, -0.8, 0.0, 0.4, -0.4, 0.1]), reference, n_atoms,
        strata=list(two), options=IntervalOptions(method="bootstrap", n_bootstrap=300,
                                                  min_structures=1),
    )  # fmt: skip
    assert boot.high < 0.2  # a mixed-up offset (8.5 eV/atom apart) would show


class Scaled:
    """EMT scaled by ``scale`` (forces, energy, stress), optionally with noise, that counts
    its predict calls."""

    def __init__(self, scale: float, noise: float = 0.0, stress: bool = True) -> None:
        self.scale, self.noise, self.stress, self.calls = scale, noise, stress, 0
        self.rng = np.random.default_rng(0)

    def predict(self, structures: Sequence[Atoms], *, stress: bool = True) -> list[Prediction]:
        self.calls += 1
        out = []
        for p in EMTPotential().predict(structures, stress=stress):
            forces = self.scale * p.forces + self.noise * self.rng.normal(size=p.forces.shape)
            forces -= forces.mean(0)
            s = None if p.stress is None or not self.stress else self.scale * p.stress
            out.append(Prediction(self.scale * p.energy + 3.0 * len(p.forces), forces, s))
        return out

    def describe(self) -> dict:
        return {"family": "scaled", "scale": self.scale}


def labelled_set() -> list:
    from test_compare import emt_labelled

    out = []
    for element, a in (("Cu", 3.61), ("Al", 4.05)):
        ideal = bulk(element, "fcc", a=a, cubic=True)
        for seed in range(6):
            rattled = ideal.copy()
            rattled.rattle(0.05 + 0.02 * seed, seed=seed)
            out.append(emt_labelled(rattled, f"{element}r{seed}", "rattle"))
        for seed in range(2):
            strained = ideal.copy()
            strained.set_cell(strained.cell * (1.01 + 0.01 * seed), scale_atoms=True)
            strained.rattle(0.05, seed=10 + seed)
            out.append(emt_labelled(strained, f"{element}s{seed}", "strain"))
    return out


def test_evaluate_one_path(tmp_path: Path) -> None:
    labelled = labelled_set()
    soft, good = Scaled(0.8), Scaled(1.0, noise=0.01, stress=False)
    result = evaluate(
        {"pretrained": soft, "fine-tuned": good}, labelled, force_bins=(0, 0.5, 1, 2, 4, math.inf)
    )
    assert soft.calls == 1 and good.calls == 1  # once per model, not once per group
    assert list(result.levels) == ["all", "chemical_system", "chemical_system+sampler"]
    assert set(result.levels["chemical_system"]) == {"Al", "Cu"}
    assert set(result.levels["chemical_system+sampler"]) == {"Al/rattle", "Al/strain",
                                                             "Cu/rattle", "Cu/strain"}  # fmt: skip
    cu = result.metrics("pretrained", "chemical_system", "Cu")
    assert cu.n_structures == 8 and cu.n_force_components == 8 * 4 * 3
    assert cu.softening.value == pytest.approx(0.8) and cu.softening.enough
    assert cu.softening.low == pytest.approx(0.8) and cu.softening.high == pytest.approx(0.8)
    assert cu.softening_distance.value == pytest.approx(0.2)
    assert result.metrics("pretrained").softening_distance.value == pytest.approx(0.2)
    assert cu.stress_mae_gpa.value > 0 and cu.energy_mae_per_atom.value > 1.0
    assert cu.energy_mae_per_atom_offset_removed.value < cu.energy_mae_per_atom.value
    bins = cu.softening_by_force
    assert sum(b.n_atoms for b in bins) == 8 * 4
    assert all(b.softening.value == pytest.approx(0.8) for b in bins)
    strain = result.metrics("pretrained", "chemical_system+sampler", "Cu/strain")
    assert strain.n_structures == 2 and not strain.softening.enough
    # The model without stresses has no stress figure.
    assert math.isnan(result.metrics("fine-tuned").stress_mae_gpa.value)

    better = result.paired("fine-tuned", "force_mae", "chemical_system", "Cu")
    assert better.improved(min_improvement=0.3) and better.ratio < 0.2
    assert result.paired("fine-tuned", "softening_distance").improved()
    assert result.regressions("fine-tuned") == {}
    assert set(Evaluation_regressions(result)) == {"Al", "Cu"}
    with pytest.raises(ValueError, match="baseline"):
        result.paired("pretrained", "force_mae")

    stored = result.as_dict()
    json.dumps(stored, allow_nan=False)  # JSON-friendly, no arrays
    assert "arrays" not in json.dumps(stored)
    summary = result.model_summary("fine-tuned")
    assert summary["levels"]["chemical_system"]["Cu"]["force_mae"]["value"] > 0
    arrays = result.arrays("chemical_system", "Cu")
    assert arrays["reference_forces"].shape == arrays["forces"]["pretrained"].shape == (96,)
    assert arrays["atom_force_norm"].shape == arrays["atom_force_error"]["fine-tuned"].shape
    assert abs(arrays["energy"]["pretrained"].mean()) < 1e-9
    assert arrays["reference_stress"].size == 0  # one model has no stresses

    table = result.table()
    assert "not enough structures (n = 2)" in table
    assert "| Cu | fine-tuned | 8 |" in table
    rows = [line for line in table.splitlines() if line.startswith("| Cu, sampler strain")]
    assert rows and all("not enough structures (n = 2)" in row for row in rows)
    for block in table.split("\n\n"):
        widths = {line.count("|") - line.count("\\|") for line in block.splitlines()
                  if line.startswith("|")}  # fmt: skip
        assert len(widths) <= 1  # well-formed columns

    from pestle.evaluation.plots import evaluation_plots

    written = evaluation_plots(result, tmp_path, labels={"pretrained": "CHGNet 0.3.0"})
    assert set(written) == {"Al", "Cu", "summary"}
    assert set(written["Cu"]) == {"forces", "force_error", "softening_by_force", "energy"}
    assert set(written["summary"]) == {"chemical_system", "chemical_system+sampler"}
    for per in written.values():
        for path in per.values():
            assert path.read_bytes().startswith(b"\x89PNG")


def Evaluation_regressions(result) -> dict:
    """The pretrained model seen from the fine-tuned one: worse everywhere."""
    reverse = evaluate({"fine-tuned": Scaled(1.0, noise=0.01), "pretrained": Scaled(0.8)},
                       labelled_set(), groups=("chemical_system",))  # fmt: skip
    return reverse.regressions("pretrained")


def test_legacy_layers_carry_structure_intervals() -> None:
    from pestle.evaluation.metrics import evaluate_potential

    labelled = labelled_set()
    legacy = evaluate_potential(Scaled(0.8, noise=0.02), labelled)
    cu = legacy["Cu"]
    fit = cu["softening"]
    assert fit["interval"] == "structure" and fit["n_structures"] == 8 and fit["enough"]
    assert fit["ci_low"] < fit["slope"] < fit["ci_high"]
    # The structure-level interval is wider than the component t one it replaces.
    assert fit["ci_high"] - fit["ci_low"] > fit["component_ci_high"] - fit["component_ci_low"]
    assert cu["arrays"]["reference"].shape == cu["arrays"]["predicted"].shape == (96,)
    assert cu["intervals"]["force_mae"]["value"] == pytest.approx(cu["force_mae"])


def test_stored_softening_reads_every_shape() -> None:
    from pestle.evaluation.evaluate import stored_softening
    from pestle.evaluation.metrics import evaluate_potential

    labelled = labelled_set()
    result = evaluate({"a": Scaled(0.8, noise=0.02), "b": Scaled(1.0)}, labelled)
    new = stored_softening(result.as_dict(), model="a")
    assert new["Cu"] == result.metrics("a", "chemical_system", "Cu").softening
    summary = stored_softening(result.model_summary("a"), "chemical_system+sampler")
    assert not summary["Cu/strain"].enough
    legacy = {s: {k: v for k, v in m.items() if k != "arrays"}
              for s, m in evaluate_potential(Scaled(0.8, noise=0.02), labelled).items()}  # fmt: skip
    assert stored_softening(legacy)["Cu"].low == legacy["Cu"]["softening"]["ci_low"]
    # A record from before structure-level intervals: its t interval is not shown as one.
    old = {"Si": {"n_structures": 3, "softening": {"slope": 1.059, "ci_low": 1.029,
                                                   "ci_high": 1.089, "n": 72}}}  # fmt: skip
    si = stored_softening(old)["Si"]
    assert si.value == 1.059 and math.isnan(si.low) and si.component_low == 1.029
    assert format_estimate(si) == "not enough structures (n = 3)"


def test_error_ratio_sees_what_every_structure_says() -> None:
    """Eight structures all improved by ~20 %, one of them a near-collision whose error
    dominates the pooled MAE: the pooled difference's interval is wide, the per-structure
    ratio's is not, and it alone decides the improvement."""
    rng = np.random.default_rng(3)
    ref = [rng.normal(0, 1.0, (8, 3)) for _ in range(8)]
    ref[0] = ref[0] * 10  # a strongly distorted structure
    base = [r + rng.normal(0, 0.15 * np.abs(r).mean(), r.shape) for r in ref]
    cand = [r + 0.8 * (b - r) for r, b in zip(ref, base, strict=True)]
    ratio = paired_error_ratio(cand, base, ref)
    assert ratio.improved(0.1) and not ratio.improved(0.3)
    assert 0.75 < ratio.ratio < 0.85 and ratio.ratio_high < 0.9
    worse = paired_error_ratio(base, cand, ref)
    assert worse.worse() and not worse.improved()
    assert not paired_error_ratio(cand[:3], base[:3], ref[:3]).improved()  # too few
