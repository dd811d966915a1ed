"""The label stage: a labelling job per picked structure (checked again before paying for
DFT), driven to the end on the Dask cluster under store leases. A structure labelled before
at this level of theory is not computed again."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ase import Atoms

from pestle.plugins import PluginSpec
from pestle.samplers.validity import check_within_limits
from pestle.store import (
    JOB_DONE,
    JOB_WITHDRAWN,
    ROLE_CHECK,
    ROLE_EVALUATION,
    NewStructure,
    StoredLabel,
    StoreError,
    label_id,
)
from pestle.store.batches import batched

if TYPE_CHECKING:
    from pestle.stages.context import RunContext


def drive_label_jobs(
    ctx: RunContext, job_ids: Sequence[str], run_id: str | None = None
) -> dict[str, str]:
    """Run labelling jobs to a terminal state on the context's Dask cluster; {job: state}.
    ``run_id``: the run whose folder holds the jobs' work (default: this pass)."""
    from pestle.dispatch.labelling import label_jobs

    if not job_ids:
        return {}
    if ctx.client is None:
        raise RuntimeError("labelling needs a Dask client")
    run_dir = ctx.run_dir if run_id is None else ctx.run_dir.parent / run_id
    return label_jobs(
        ctx.client,
        ctx.store,
        list(job_ids),
        store_uri=ctx.store_uri,
        work_root=str(Path(run_dir) / "jobs"),
        progress=lambda done, total, job_id, state: ctx.progress("label", done, total),
        job_timeout_seconds=ctx.config.dask.job_timeout_seconds,
        cpus_per_job=ctx.labeller.resources().cpus,
        outage_seconds=ctx.config.store.outage_seconds,
    )


class LabelStage:
    """Labels the picks and the evaluation set (whose labels carry the role ``evaluation``),
    each chemical system at its own level of theory; a system whose convergence gate failed
    is not labelled and the gate's message says why. Hands on the picks' labels per
    system."""

    def __init__(self, part: str = "picks") -> None:
        """``part``: ``"evaluation"`` labels the evaluation set (before selection, so its
        labels measure the softening that guides the picks); ``"picks"`` labels the
        selected structures, and the evaluation set too when it is not labelled yet."""
        if part not in ("picks", "evaluation"):
            raise ValueError(f"part must be picks or evaluation, not {part!r}")
        self.part = part
        self.name = "label" if part == "picks" else "label_evaluation_set"
        self.requires = ("selected", "evaluation_set") if part == "picks" else ("evaluation_set",)
        self.provides = ("labels_by_system",) if part == "picks" else ("evaluation_labels",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        picks: list[str] = ctx.outputs["selected"] if self.part == "picks" else []
        evaluation = sorted(i for ids in ctx.outputs["evaluation_set"].values() for i in ids)
        systems = ctx.store.structures.chemical_systems(picks + evaluation)
        rejected: dict[str, str] = {}
        blocked: dict[str, str] = {}
        to_queue: list[tuple[str, str | None]] = []
        already = 0
        wanted = [(s, None) for s in picks] + [(s, ROLE_EVALUATION) for s in evaluation]
        why = {system: ctx.blocked(system) for system in set(systems.values())}
        job_ids = {sid: ctx.label_job_id(sid, systems[sid]) for sid, _ in wanted}
        label_ids = {sid: ctx.label_id(sid, systems[sid]) for sid, _ in wanted}
        job_states = ctx.store.jobs.states(job_ids.values())
        labelled = ctx.store.labels.existing(label_ids.values())
        for part in batched(wanted, 256):  # geometries a batch at a time
            geometries = ctx.store.structures.atoms_many([sid for sid, _ in part])
            for sid, role in part:
                system = systems[sid]
                if why[system] is not None:
                    blocked[system] = why[system]
                    continue
                if sid not in geometries:
                    raise StoreError(f"no structure {sid}")
                # Checked again before paying for DFT: structures may come from other runs,
                # imports or older, laxer versions of the checks.
                reason = check_within_limits(geometries[sid], ctx.config.limits)
                if reason is not None:
                    rejected[sid] = reason
                    continue
                state = job_states.get(job_ids[sid])
                if label_ids[sid] in labelled and state in (None, JOB_DONE):
                    already += 1
                    continue
                to_queue.append((sid, role))
        jobs = []
        for sid, role in to_queue:
            labelling = ctx.labelling(systems[sid])
            payload = {"labeller": labelling.spec.model_dump(), "lot_hash": labelling.lot_hash,
                       "structure_id": sid, "role": role}  # fmt: skip
            jobs.append((ctx.label_job_id(sid, systems[sid]), payload))
        ctx.store.jobs.enqueue_many(jobs, "label", run_id=ctx.run_id)
        states = drive_label_jobs(ctx, [job_id for job_id, _ in jobs])
        # Labels that existed before the draw (another campaign's, say) join the set too.
        ctx.store.labels.set_roles(
            dict.fromkeys((ctx.label_id(s, systems[s]) for s in evaluation
                           if systems[s] not in blocked), ROLE_EVALUATION),
            {"evaluation_set": ctx.config.name},
        )  # fmt: skip
        failed = {j: s for j, s in states.items() if s not in (JOB_DONE, JOB_WITHDRAWN)}
        ctx.record(
            self.name,
            {
                "labeller": ctx.labeller.name,
                "lot_hash": ctx.lot_hash,
                "level_of_theory": ctx.level_of_theory,
                "by_system": {
                    system: {
                        "lot_hash": ctx.labelling(system).lot_hash,
                        "level_of_theory": ctx.labelling(system).level_of_theory,
                    }
                    for system in sorted(set(systems.values()))
                },  # fmt: skip
                "requested": len(picks),
                "evaluation_set": len(evaluation),
                "already_labelled": already,
                "dispatched": len(jobs),
                "failed": sorted(failed),
                "withdrawn": sorted(j for j, s in states.items() if s == JOB_WITHDRAWN),
                "rejected_before_dispatch": rejected,
                "blocked": blocked,
            },
        )
        if self.part == "evaluation":
            return {"evaluation_labels": len(evaluation) - len(failed)}
        return {"labels_by_system": labels_by_system(ctx, picks)}


def labels_by_system(ctx: RunContext, structure_ids: Sequence[str]) -> dict[str, list[str]]:
    """The stored labels of these structures, each at its system's level of theory, per
    system."""
    systems = ctx.store.structures.chemical_systems(structure_ids)
    wanted = [ctx.label_id(sid, system) for sid, system in systems.items()]
    out: dict[str, list[str]] = defaultdict(list)
    for lid, system in ctx.store.labels.systems_of(wanted).items():
        out[system].append(lid)
    return {k: sorted(v) for k, v in sorted(out.items())}


def compute_labels(
    ctx: RunContext,
    structures: Sequence[Atoms],
    spec: PluginSpec,
    *,
    kind: str,
    provenance: dict[str, Any],
) -> list[StoredLabel]:
    """Reference labels of pestle's own checks (convergence gate, equations of state) at the
    labeller ``spec``: stored as structures of ``kind`` with labels of role ``check`` (never
    trained on, never an evaluation), computed once on the Dask workers, read back."""
    from pestle.labellers import LABELLERS, LabelError, level_of_theory_hash

    labeller = LABELLERS.build(spec.name, spec.params)
    lot_hash = level_of_theory_hash(labeller)
    stored = ctx.store.structures.add_many(
        [NewStructure(atoms, kind, {**provenance, "campaign": ctx.config.name,
                                    "run_id": ctx.run_id}) for atoms in structures],
        run_id=ctx.run_id,
    )  # fmt: skip
    ids = [sid for sid, _ in stored]
    missing = [sid for sid in ids if not ctx.store.labels.exists(label_id(sid, lot_hash))]
    jobs = [(f"label-{sid}-{lot_hash}", {"labeller": spec.model_dump(), "lot_hash": lot_hash,
                                        "structure_id": sid, "role": ROLE_CHECK})
            for sid in dict.fromkeys(missing)]  # fmt: skip
    ctx.store.jobs.enqueue_many(jobs, "label", run_id=ctx.run_id)
    states = drive_label_jobs(ctx, [job_id for job_id, _ in jobs])
    for job_id, state in states.items():
        if state != JOB_DONE:
            job = ctx.store.jobs.get(job_id)
            raise LabelError(
                f"{kind} calculation {job_id} ended {state}: {job.error if job else ''}"
            )
    found = {s.structure_id: s for s in ctx.store.labels.labelled(
        {"_id": {"$in": [label_id(sid, lot_hash) for sid in ids]}})}  # fmt: skip
    return [found[sid] for sid in ids]
