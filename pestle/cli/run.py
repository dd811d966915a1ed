"""``pestle run``: one campaign run, with progress bars and the softening summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pestle.cli.common import console, fail, load, quiet_dask


def run(
    config: Annotated[Path, typer.Argument(help="Campaign YAML file.")],
    workers: Annotated[int | None, typer.Option(help="Override dask.n_workers.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a campaign: sample, score, select, label, fine-tune, evaluate, report."""
    quiet_dask(verbose)
    cfg = load(config)
    if workers is not None:
        cfg.dask.n_workers = workers
    from pestle.dispatch.cluster import make_client
    from pestle.engine.run import run_campaign
    from pestle.engine.workspace import Workspace
    from pestle.stages.context import run_id_for
    from pestle.store import Store, StoreError

    try:
        uri = Workspace.of(cfg).uri(start=True)
        store = Store(uri, cfg.store.database)
    except (StoreError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        console.print(f"run [bold]{run_id_for(cfg)}[/] (store {store.uri_masked})")
        with make_client(cfg.dask) as client:
            result = run_campaign(cfg, store, uri, client, progress=progress)
    print_summary(result.stages)
    console.print(f"report: {result.report}")


def print_summary(stages: dict[str, Any]) -> None:
    evaluation = stages.get("evaluate", {})
    table = Table(title="softening scale on held-out labels")
    for column in ("system", "model", "slope [95% CI]", "force MAE eV/Å"):
        table.add_column(column)
    for model, per_system in evaluation.get("metrics", {}).items():
        for system, m in per_system.items():
            fit = m["softening"]
            table.add_row(
                system,
                model,
                f"{fit['slope']:.3f} [{fit['ci_low']:.3f}, {fit['ci_high']:.3f}]",
                f"{m['force_mae']:.3f}",
            )
    console.print(table)
