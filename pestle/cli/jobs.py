"""``pestle jobs``: labelling and training jobs in the store: list, show one, retry."""

from __future__ import annotations

from typing import Annotated, Literal

import typer
from rich.markup import escape
from rich.table import Table

from pestle.cli.common import (
    ConfigOption,
    JsonOption,
    WorkDirOption,
    cell,
    console,
    fail,
    get,
    open_store,
    print_json,
)

jobs_app = typer.Typer(
    help="Labelling and training jobs: list them, show one, re-queue failed ones.",
    invoke_without_command=True,
)

COLUMNS = ["_id", "kind", "state", "attempts", "worker", "error"]
State = Literal["queued", "running", "done", "failed", "withdrawn"]


def _where(ctx: typer.Context, config, work_dir):
    """-c/-w given to the subcommand, else to ``pestle jobs`` before it."""
    parent = ctx.obj or {}
    return config or parent.get("config"), work_dir or parent.get("work_dir")


@jobs_app.callback()
def jobs(
    ctx: typer.Context,
    state: Annotated[State | None, typer.Option(help="Only jobs in this state.")] = None,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs (all, or in one state) with their attempts, worker and error."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"config": config, "work_dir": work_dir}
        return
    store = open_store(config, work_dir)
    found = store.jobs.find(state=state)
    if as_json:
        for doc in found:
            print_json(doc)
        return
    table = Table(title="jobs" if state is None else f"{state} jobs")
    for column in COLUMNS:
        table.add_column(column)
    for doc in found:
        table.add_row(*[cell(get(doc.model_dump(by_alias=True), c)) for c in COLUMNS])
    console.print(table)
    console.print(
        ", ".join(f"{k} {v}" for k, v in sorted(store.jobs.counts().items())) or "no jobs"
    )


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="A job id, or a unique prefix of one.")],
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """One job: its state history, worker, attempts, error and the stored traceback."""
    from pestle.engine.jobs import find_job
    from pestle.store import StoreError

    store = open_store(*_where(ctx, config, work_dir))
    try:
        job = find_job(store, job_id)
    except StoreError as exc:
        fail(str(exc))
    if as_json:
        print_json(job)
        return
    out = console.print
    out(f"[bold]{escape(job.id)}[/]: {job.kind} job, [bold]{job.state}[/]", highlight=False)
    out(f"  run: {job.run_id or '-'}; attempts {job.attempts}/{job.max_attempts}", highlight=False)
    if job.worker:
        out(f"  worker: {escape(job.worker)}", highlight=False)
    for label, moment in (("created", job.created_at), ("started", job.started_at),
                          ("finished", job.finished_at)):  # fmt: skip
        if moment is not None:
            out(f"  {label}: {moment:%Y-%m-%d %H:%M:%S} UTC")
    if job.payload.get("structure_id"):
        out(f"  structure: {job.payload['structure_id']}", highlight=False)
    if job.history:
        out("  history:")
        for event in job.history:
            detail = event.error or event.reason or ""
            out(
                f"    {event.at:%Y-%m-%d %H:%M:%S} {event.event}"
                + (f" on {escape(event.worker)}" if event.worker else "")
                + (f": {escape(detail)}" if detail else ""),
                highlight=False,
            )
    if job.error:
        out(f"  error: {escape(job.error)}", highlight=False)
    if job.withdrawn_reason:
        out(f"  withdrawn: {escape(job.withdrawn_reason)}", highlight=False)
    if job.traceback:
        out("  traceback:")
        out(escape(job.traceback.rstrip()), highlight=False)
    if job.state == "failed":
        out(f"re-queue it with: pestle jobs retry {job.id}", highlight=False)


@jobs_app.command("retry")
def jobs_retry(
    ctx: typer.Context,
    job_ids: Annotated[
        list[str] | None, typer.Argument(help="Failed jobs to re-queue (ids or unique prefixes).")
    ] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Re-queue every failed job.")] = False,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Re-queue failed jobs, by id or all of them (they run at the next `pestle run` or daemon
    round)."""
    from pestle.engine.jobs import retry_failed, retry_jobs
    from pestle.store import StoreError

    if bool(job_ids) == failed:
        raise typer.BadParameter("say which jobs: one or more job ids, or --failed")
    store = open_store(*_where(ctx, config, work_dir))
    if failed:
        console.print(f"re-queued {retry_failed(store)} failed jobs")
        return
    try:
        ids = retry_jobs(store, job_ids)
    except StoreError as exc:
        fail(str(exc))
    console.print(
        f"re-queued {len(ids)} job{'s' if len(ids) != 1 else ''}: {', '.join(ids)}",
        highlight=False,
    )
