"""What is in a store, as ``pestle status`` and ``pestle models`` show it: document counts,
job states, recent runs; model versions with their latest held-out softening scales."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pestle.evaluation.evaluate import stored_softening
from pestle.evaluation.intervals import format_estimate
from pestle.store import Store
from pestle.store.documents import RunDoc
from pestle.store.runs import run_process_gone


@dataclass
class StoreStatus:
    uri: str  # password masked
    database: str
    counts: dict[str, int]
    jobs: dict[str, int]
    runs: list[RunDoc] = field(default_factory=list)


def store_status(store: Store, recent_runs: int = 5) -> StoreStatus:
    return StoreStatus(
        store.uri_masked,
        store.database,
        store.counts(),
        dict(sorted(store.jobs.counts().items())),
        store.runs.recent(recent_runs),
    )


@dataclass
class ModelVersion:
    id: str
    family: str
    parent: str
    train_labels: int
    # chemical system -> the softening scale of the latest evaluation, with its structure-level
    # interval (an Estimate dict: value, low, high, n_structures, enough, ...)
    softening: dict[str, dict[str, Any]]
    current: bool
    # Where it was fine-tuned (pestle.dispatch.gpus.placement: worker, host, GPU, device);
    # None for models stored before pestle recorded it.
    placement: dict[str, Any] | None = None


def model_versions(store: Store) -> list[ModelVersion]:
    """Every stored model version with the softening scales of its latest evaluation (whoever
    made it: a run, the daemon, ``pestle evaluate``) and whether it is its family's current."""
    promoted = {d["family"]: d["model_id"] for d in store.models.promoted_all()}
    out = []
    for doc in store.models.all():
        evaluation = doc.evaluations[-1].metrics if doc.evaluations else {}
        softening = {
            system: estimate.as_dict()
            for system, estimate in sorted(stored_softening(evaluation).items())
        }
        out.append(
            ModelVersion(
                doc.id,
                doc.family,
                str(doc.parent.get("model") or doc.parent.get("checkpoint_sha256") or ""),
                len(doc.training.label_ids),
                softening,
                promoted.get(doc.family) == doc.id,
                doc.model_dump().get("placement"),
            )
        )
    return out


@dataclass
class NextStep:
    command: str
    why: str


def next_steps(
    store: Store, status: StoreStatus, config: str | None = None, where: str = ""
) -> list[NextStep]:
    """The commands worth running next, most urgent first: failed jobs to look at and retry,
    a first run or an interrupted one to resume, the newest model of a family that was never
    promoted; else the report and an export. ``config``: the path the user named, else the
    config file of the latest run, else ``CONFIG``; ``where``: the options that found this
    store (``-c FILE``, ``-w DIR``), added to commands that read it."""
    from pestle.store import JOB_FAILED, JOB_QUEUED

    at = f" {where}" if where else ""
    latest = status.runs[0] if status.runs else None
    cfg = config or (latest.config_file if latest and latest.config_file else None) or "CONFIG"
    steps: list[NextStep] = []
    failed = status.jobs.get(JOB_FAILED, 0)
    if failed:
        [first] = store.query("jobs", {"state": JOB_FAILED}, ["_id"], limit=1)
        why = f"{failed} failed job{'s' if failed != 1 else ''}: see why"
        steps.append(NextStep(f"pestle jobs show {first['_id']}{at}", why))
        steps.append(
            NextStep(f"pestle jobs retry --failed{at}", "re-queue them for the next run or round")
        )
    if latest is None:
        steps.append(NextStep(f"pestle run {cfg}", "no runs yet"))
    elif latest.state in ("interrupted", "running"):
        resume = config or latest.config_file or "CONFIG"
        if run_process_gone(latest):
            why = f"run {latest.id} stopped unfinished (its process is gone): running it again resumes it"
        elif latest.state == "running":
            why = f"run {latest.id} is running: running it again resumes it (unless it is still running)"
        else:
            why = f"run {latest.id} is {latest.state}: running it again resumes it"
        steps.append(NextStep(f"pestle run {resume}", why))
    elif status.jobs.get(JOB_QUEUED):
        steps.append(
            NextStep(f"pestle run {cfg}", f"queued jobs ({status.jobs[JOB_QUEUED]}) wait for a run")
        )
    promoted = {d["family"]: d["model_id"] for d in store.models.promoted_all()}
    newest: dict[str, ModelVersion] = {}
    for version in model_versions(store):  # oldest first: the last one per family wins
        newest[version.family] = version
    for family, version in sorted(newest.items()):
        doc = store.models.get(version.id)
        if promoted.get(family) != version.id and doc is not None and not doc.promotions:
            softening = ", ".join(f"{s} {format_estimate(v)}" for s, v in version.softening.items())
            steps.append(
                NextStep(
                    f"pestle models promote {version.id}{at}",
                    f"the newest {family} model is not current"
                    + (f" (held-out softening {softening})" if softening else "")
                    + f"; compare first: pestle evaluate {version.id}{at}",
                )
            )
    if not steps:
        steps.append(NextStep(f"pestle report{at}", "figures of the whole store"))
        steps.append(NextStep(f"pestle export -o labels.extxyz{at}", "the labels, for training"))
    return steps
