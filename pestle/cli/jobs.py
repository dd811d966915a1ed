"""``pestle jobs``: labelling and training jobs in the store."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pestle.cli.common import ConfigOption, WorkDirOption, cell, console, fail, get, open_store

jobs_app = typer.Typer(help="Labelling and training jobs.", invoke_without_command=True)

COLUMNS = ["_id", "kind", "state", "attempts", "worker", "error"]


@jobs_app.callback()
def jobs(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="queued, running, done or failed.")] = None,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """List jobs by state."""
    if ctx.invoked_subcommand is not None:
        return
    store = open_store(config, work_dir)
    table = Table(title="jobs")
    for column in COLUMNS:
        table.add_column(column)
    for doc in store.jobs.find(state=state):
        table.add_row(*[cell(get(doc.model_dump(), c)) for c in COLUMNS])
    console.print(table)
    console.print(
        ", ".join(f"{k} {v}" for k, v in sorted(store.jobs.counts().items())) or "no jobs"
    )


@jobs_app.command("retry")
def jobs_retry(
    failed: Annotated[bool, typer.Option("--failed", help="Re-queue every failed job.")] = False,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Re-queue failed jobs (they run at the next `pestle run`)."""
    if not failed:
        fail("say which jobs: --failed")
    store = open_store(config, work_dir)
    console.print(f"re-queued {store.jobs.requeue_failed()} failed jobs")
