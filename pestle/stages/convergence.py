"""The convergence stage: before a chemical system's first labels at a level of theory, the
labeller's numerical settings (plane-wave cutoff, k-point density) are checked on one small
representative off-equilibrium structure of the system against raised settings
(``pestle.labellers.convergence``). The calculations are ordinary labels (role ``check``)
computed on the Dask workers; the verdict is stored per system and level of theory, so it is
made once. A failing system is not labelled and the message names the element, the
quantities and what to raise; with ``convergence.auto_raise`` the system labels at the raised
settings instead; quantities in ``convergence.leave_out`` may stay unconverged and are left
out of fine-tuning."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pestle.plugins import PluginSpec
from pestle.stages.label import compute_labels
from pestle.structures import chemical_system

if TYPE_CHECKING:
    from ase import Atoms

    from pestle.labellers import Labeller, LabelResult
    from pestle.samplers import Seed
    from pestle.stages.context import RunContext

log = logging.getLogger("pestle.stages")


def gate_allows(record: dict[str, Any], leave_out: list[str]) -> bool:
    """Labelling may go ahead: the gate passed, or what did not converge may be left out."""
    return bool(record.get("passed")) or (
        bool(record.get("unconverged_quantities"))
        and set(record["unconverged_quantities"]) <= set(leave_out)
        and "forces" not in record["unconverged_quantities"]
    )


class ConvergenceStage:
    name = "convergence"
    requires = ("seeds",)
    provides = ("convergence",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pestle.store.checks import convergence_key

        options = ctx.config.convergence
        if not options.enabled:
            ctx.record("convergence", {"skipped": "convergence.enabled is false"})
            return {"convergence": {}}
        seeds: list[Seed] = ctx.outputs["seeds"]
        first: dict[str, Seed] = {}
        for seed in seeds:
            first.setdefault(chemical_system(seed.atoms), seed)
        todo = {s: seed for s, seed in first.items() if ctx.gate(s) is None}
        if todo:
            # Systems in parallel: each gate's calculations follow one another.
            pool = ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="gate")
            try:
                done = dict(zip(todo, pool.map(lambda s: self._check(ctx, s, todo[s]), todo),
                                strict=True))  # fmt: skip
            finally:
                # Never wait here: on SIGTERM or Ctrl-C the run must unwind now, not after
                # the gates' calculations (hours); closing the Dask client on the way out
                # cancels their futures and the threads end.
                pool.shutdown(wait=False, cancel_futures=True)
            for system, report in done.items():
                record = {**report, "system": system, "lot_hash": ctx.lot_hash,
                          "labeller": ctx.config.labeller.model_dump(),
                          "criteria": options.criteria()}  # fmt: skip
                record["passed"] = gate_allows(record, options.leave_out)
                ctx.store.checks.put(convergence_key(system, ctx.lot_hash), "convergence", record)
                if not record["passed"]:
                    log.warning("%s: %s", system, record["message"])
        verdicts = {}
        for system in first:
            record = ctx.gate(system) or {}
            verdicts[system] = {
                key: record.get(key)
                for key in ("status", "passed", "message", "recommended", "recommended_fields",
                            "converged_quantities", "unconverged_quantities", "culprit",
                            "seconds", "settings")
            }  # fmt: skip
        ctx.record("convergence", verdicts)
        return {"convergence": verdicts}

    @staticmethod
    def _check(ctx: RunContext, system: str, seed: Seed) -> dict[str, Any]:
        from pestle.labellers.convergence import check_seed

        def label(labeller: Labeller, atoms: Atoms) -> LabelResult:
            from pestle.labellers import LabelResult

            spec = PluginSpec(name=labeller.name, params=labeller.params.model_dump(mode="json"))
            (stored,) = compute_labels(ctx, [atoms], spec, kind="convergence",
                                       provenance={"purpose": "convergence gate",
                                                   "parent_id": seed.id})  # fmt: skip
            results = stored.atoms.calc.results
            return LabelResult(
                energy=float(results["energy"]),
                forces=results["forces"],
                stress=results.get("stress"),
                extra={**stored.label.extra,
                       "label_seconds": stored.label.extra.get("wall_seconds")},
            )  # fmt: skip

        report = check_seed(ctx.labeller, seed.atoms, ctx.config.convergence, label_fn=label)
        return report.as_dict()
