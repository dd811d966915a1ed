"""The equation-of-state stage: a physical check of every model pestle evaluates. Each seed
is scaled isotropically over a range of volumes; the labeller computes the scan once (labels of
role ``check``, stored and reused by every model version) and each model computes it too. A
Birch-Murnaghan fit gives the bulk modulus B0 and equilibrium volume V0 with intervals
(``pestle.evaluation.eos``); a model whose B0 ratio to the reference lies, with its whole
interval, further than ``eos.bulk_modulus_tolerance`` from 1 fails the check."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pestle.stages.label import compute_labels
from pestle.structures import chemical_system

if TYPE_CHECKING:
    from ase import Atoms

    from pestle.potentials import Potential
    from pestle.samplers import Seed
    from pestle.stages.context import RunContext
    from pestle.store.labels import StoredLabel


def _estimate(value: float, interval: Any, n: int, ok: bool) -> dict[str, Any]:
    """The shape reports read an interval from (``Estimate.as_dict``)."""
    low, high = interval
    finite = [v if v is not None and math.isfinite(v) else None for v in (value, low, high)]
    return {"value": finite[0], "low": finite[1], "high": finite[2], "n_structures": n,
            "n_values": n, "min_structures": 5, "enough": ok, "method": "Birch-Murnaghan fit"}  # fmt: skip


def verdict(comparison: dict[str, Any], tolerance: float) -> str:
    """``within``: the B0 ratio's interval lies inside 1 ± tolerance; ``outside``: it lies
    wholly outside; ``undecided`` in between; ``failed`` when a fit failed."""
    if comparison["status"] != "ok":
        return "failed"
    low, high = comparison["b0_ratio_interval"]
    if 1 - tolerance <= low and high <= 1 + tolerance:
        return "within"
    if high < 1 - tolerance or low > 1 + tolerance:
        return "outside"
    return "undecided"


def reference_scan(ctx: RunContext, seed: Seed) -> tuple[list[Atoms], list[StoredLabel]]:
    """The seed's E-V scan and its reference labels at its system's level of theory
    (computed on the workers the first time, read back after)."""
    from pestle.evaluation.eos import eos_structures

    spec = ctx.config.eos
    system = chemical_system(seed.atoms)
    scan = eos_structures(seed.atoms, volume_range=spec.volume_range, points=spec.points)
    stored = compute_labels(ctx, scan, ctx.labelling(system).spec, kind="eos",
                            provenance={"purpose": "equation of state", "parent_id": seed.id,
                                        "parent_name": seed.name})  # fmt: skip
    return scan, stored


class EOSReferenceStage:
    """The reference E-V scans, labelled with the picks, before fine-tuning: a fine-tune
    then never holds the labellers up, and the scans are stored for anyone comparing
    recipes on the campaign's labels (benchmarks/bench_recipes.py) while it trains."""

    name = "eos_reference"
    requires = ("seeds",)
    provides = ("eos_reference",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        if not ctx.config.eos.enabled:
            return {"eos_reference": {}}
        labelled = {}
        for seed in {s.id: s for s in ctx.outputs["seeds"]}.values():
            if ctx.blocked(chemical_system(seed.atoms)) is None:
                labelled[seed.name] = len(reference_scan(ctx, seed)[1])
        return {"eos_reference": labelled}


def eos_checks(
    ctx: RunContext, seeds: list[Seed], models: dict[str, Potential]
) -> dict[str, dict[str, Any]]:
    """Per seed (by name): the reference fit, each model's fit and comparison, and the
    verdict per model."""
    from pestle.evaluation.eos import (
        compare_eos,
        labelled_scan,
        potential_scan,
        stress_consistency,
    )

    spec = ctx.config.eos
    out: dict[str, dict[str, Any]] = {}
    for seed in {s.id: s for s in seeds}.values():
        system = chemical_system(seed.atoms)
        entry: dict[str, Any] = {"seed_id": seed.id, "system": system}
        if ctx.blocked(system) is not None:
            out[seed.name] = {**entry, "skipped": "the system's labels are blocked by its gate"}
            continue
        scan, stored = reference_scan(ctx, seed)
        reference = labelled_scan([s.atoms for s in stored])
        entry["reference"] = {
            **reference.as_dict(),
            "bulk_modulus_gpa": _estimate(reference.b0, reference.b0_interval,
                                          reference.n_points, reference.ok),
            "v0_per_atom": _estimate(reference.v0, reference.v0_interval, reference.n_points,
                                     reference.ok),
            # Half the tolerance: a reference unsure by more cannot judge at the tolerance.
            "stress_consistency": stress_consistency([s.atoms for s in stored], reference,
                                                     spec.bulk_modulus_tolerance / 2),
        }  # fmt: skip
        entry["models"], entry["verdicts"] = {}, {}
        for name, potential in models.items():
            fit = potential_scan(potential, scan)
            comparison = compare_eos(fit, reference).as_dict()
            entry["models"][name] = {
                **comparison,
                "bulk_modulus_gpa": _estimate(fit.b0, fit.b0_interval, fit.n_points, fit.ok),
                "v0_per_atom": _estimate(fit.v0, fit.v0_interval, fit.n_points, fit.ok),
                "b0_ratio": _estimate(comparison["b0_ratio"], comparison["b0_ratio_interval"],
                                      fit.n_points, comparison["status"] == "ok"),
            }  # fmt: skip
            entry["verdicts"][name] = verdict(comparison, spec.bulk_modulus_tolerance)
        out[seed.name] = entry
    return out


def eos_regressions(checks: dict[str, dict[str, Any]], candidate: str, baseline: str) -> list[str]:
    """Seeds whose bulk modulus the candidate gets wrong beyond the tolerance (whole interval)
    where the baseline did not."""
    return [
        name
        for name, entry in sorted(checks.items())
        if entry.get("verdicts", {}).get(candidate) == "outside"
        and entry["verdicts"].get(baseline) != "outside"
    ]


class EOSStage:
    """``baseline`` as in ``EvaluateStage``: pretrained / fine-tuned for a campaign run,
    the promoted model / candidate for a daemon retraining."""

    name = "eos"
    requires = ("seeds", "model_id")
    provides = ("eos",)

    def __init__(self, baseline: str = "pretrained") -> None:
        self.baseline = baseline

    def run(self, ctx: RunContext) -> dict[str, Any]:
        if not ctx.config.eos.enabled:
            ctx.record("eos", {"skipped": "eos.enabled is false"})
            return {"eos": {}}
        from pestle.stages.evaluate import compared_models

        compared = compared_models(ctx, self.baseline, ctx.outputs["model_id"])
        models = {name: potential for name, (_, potential) in compared.items()}
        checks = eos_checks(ctx, ctx.outputs["seeds"], models)
        ctx.record("eos", {"tolerance": ctx.config.eos.bulk_modulus_tolerance, "seeds": checks})
        return {"eos": checks}
