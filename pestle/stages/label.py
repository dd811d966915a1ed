"""The label stage: a labelling job per picked structure (checked again before paying for
DFT), driven to the end on the Dask cluster under store leases. A structure labelled before
at this level of theory is not computed again."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pestle.samplers.validity import check_structure
from pestle.store import JOB_DONE, JOB_WITHDRAWN, ROLE_EVALUATION, label_id

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
    )


class LabelStage:
    """Labels the picks and the evaluation set (whose labels carry the role ``evaluation``);
    hands on the picks' labels per system."""

    name = "label"
    requires = ("selected", "evaluation_set")
    provides = ("labels_by_system",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        picks: list[str] = ctx.outputs["selected"]
        evaluation = sorted(i for ids in ctx.outputs["evaluation_set"].values() for i in ids)
        rejected: dict[str, str] = {}
        to_queue: list[tuple[str, str | None]] = []
        already = 0
        for sid, role in [(s, None) for s in picks] + [(s, ROLE_EVALUATION) for s in evaluation]:
            # Checked again before paying for DFT: structures may come from other runs,
            # imports or older, laxer versions of the checks.
            reason = check_structure(ctx.store.structures.atoms(sid))
            if reason is not None:
                rejected[sid] = reason
                continue
            state = ctx.store.jobs.state(ctx.label_job_id(sid))
            if ctx.store.labels.exists(label_id(sid, ctx.lot_hash)) and state in (None, JOB_DONE):
                already += 1
                continue
            to_queue.append((sid, role))
        payload = {"labeller": ctx.config.labeller.model_dump(), "lot_hash": ctx.lot_hash}
        job_ids = [ctx.label_job_id(sid) for sid, _ in to_queue]
        ctx.store.jobs.enqueue_many(
            [(ctx.label_job_id(sid), {**payload, "structure_id": sid, "role": role})
             for sid, role in to_queue],
            "label",
            run_id=ctx.run_id,
        )  # fmt: skip
        states = drive_label_jobs(ctx, job_ids)
        # Labels that existed before the draw (another campaign's, say) join the set too.
        ctx.store.labels.set_roles(
            dict.fromkeys((label_id(s, ctx.lot_hash) for s in evaluation), ROLE_EVALUATION),
            {"evaluation_set": ctx.config.name},
        )
        failed = {j: s for j, s in states.items() if s not in (JOB_DONE, JOB_WITHDRAWN)}
        ctx.record(
            "label",
            {
                "labeller": ctx.labeller.name,
                "lot_hash": ctx.lot_hash,
                "level_of_theory": ctx.level_of_theory,
                "requested": len(picks),
                "evaluation_set": len(evaluation),
                "already_labelled": already,
                "dispatched": len(job_ids),
                "failed": sorted(failed),
                "withdrawn": sorted(j for j, s in states.items() if s == JOB_WITHDRAWN),
                "rejected_before_dispatch": rejected,
            },
        )
        return {"labels_by_system": labels_by_system(ctx, picks)}


def labels_by_system(ctx: RunContext, structure_ids: Sequence[str]) -> dict[str, list[str]]:
    """The stored labels of these structures at the context's level of theory, per system."""
    wanted = [label_id(s, ctx.lot_hash) for s in structure_ids]
    out: dict[str, list[str]] = defaultdict(list)
    for lid, system in ctx.store.labels.systems_of(wanted).items():
        out[system].append(lid)
    return {k: sorted(v) for k, v in sorted(out.items())}
