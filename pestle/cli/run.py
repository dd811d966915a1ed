"""``pestle run``: one campaign run with progress bars and the softening summary, or
(``--dry-run``) what a run would do, written nowhere."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pestle.cli.common import (
    ConfigOption,
    ExitCode,
    JsonOption,
    console,
    err_console,
    fail,
    load,
    print_json,
    quiet_dask,
    warn,
)
from pestle.config import ConfigError


def run(
    config_file: Annotated[
        Path | None, typer.Argument(metavar="CONFIG", help="Campaign YAML file (or -c).")
    ] = None,
    config: ConfigOption = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Override dask.n_workers (at least 1).")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Show what would be sampled, scored, selected and labelled, and the estimated "
            "number of DFT calculations; write nothing.",
        ),
    ] = False,
    as_json: JsonOption = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log at INFO; tracebacks of failures.")
    ] = False,
) -> None:
    """Run a campaign: sample, score, select, label, fine-tune, evaluate, report. A run
    killed or stopped on an error resumes where it stopped when run again."""
    if config_file is not None and config is not None and config_file != config:
        raise typer.BadParameter(f"two configs given: {config_file} and -c {config}")
    path = config_file or config
    if path is None:
        raise typer.BadParameter("give the campaign config: pestle run CONFIG (or -c CONFIG)")
    if as_json and not dry_run:
        raise typer.BadParameter("--json goes with --dry-run")
    quiet_dask(verbose)
    cfg = load(path)
    if workers is not None:
        cfg.dask.n_workers = workers
    if dry_run:
        dry(cfg, path, as_json)
        return
    from pestle.dispatch.cluster import make_client
    from pestle.engine.run import prepare_campaign, run_campaign

    store, uri = _open_for_run(cfg)
    try:  # every input checked before a cluster starts or anything is stored
        context = prepare_campaign(cfg, store, uri)
    except ConfigError as exc:
        fail(str(exc))
    run_id = context.run_id
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # SIGTERM unwinds the run like Ctrl-C: the run document says "interrupted", the Dask
    # cluster is closed, and running the config again resumes it.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with Progress(*columns, console=console, transient=False) as bars:
            tasks: dict[str, Any] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bars.add_task(stage, total=total)
                bars.update(tasks[stage], completed=done, total=total)

            console.print(f"run [bold]{run_id}[/] (store {store.uri_masked})")
            with make_client(cfg.dask) as client:
                result = run_campaign(cfg, store, uri, client, progress=progress,
                                      context=context)  # fmt: skip
    except ConfigError as exc:  # found before the run began: a seed file, a plugin's fit
        fail(str(exc))
    except Terminated:
        fail(f"run {run_id} interrupted by SIGTERM; `pestle run {path}` again resumes it",
             EXIT_TERMINATED)  # fmt: skip
    except Exception as exc:
        if verbose:
            err_console.print_exception()
        fail(
            f"run {run_id} stopped: {type(exc).__name__}: {exc}\n"
            f"`pestle run {path}` again resumes it"
            + ("" if verbose else "; `pestle run -v` shows the traceback"),
            ExitCode.FAILED,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.setitimer(signal.ITIMER_REAL, 0)  # a deferred SIGTERM that came too late
    print_summary(result.stages)
    failed = (result.stages.get("label") or {}).get("failed") or []
    if failed:
        warn(
            f"{len(failed)} labelling jobs failed: `pestle jobs show {failed[0]}`, then "
            "`pestle jobs retry --failed` and run again"
        )
    for system, message in ((result.stages.get("label") or {}).get("blocked") or {}).items():
        warn(f"{system} was not labelled: {message}")
    console.print(f"report: {result.report}")


EXIT_TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended


class Terminated(BaseException):
    """SIGTERM reached ``pestle run`` (a BaseException, like KeyboardInterrupt: nothing
    catches it on the way out but what records the run as interrupted)."""


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
    if _in_finalizer(frame):
        # Raised inside a __del__ (a Dask future collected at that instant), the exception
        # is printed as "Exception ignored" and dropped, and the run went on to finish:
        # raise it a moment later instead, outside the finalizer.
        signal.signal(signal.SIGALRM, _terminated)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    raise Terminated()


def _in_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _open_for_run(cfg):
    """(store, URI) for a run: the store is created if there is none."""
    from pestle.engine.workspace import Workspace
    from pestle.store import Store, StoreError
    from pestle.store.server import ServerError

    try:
        uri = Workspace.of(cfg).uri(start=True)
        return Store(uri, cfg.store.database), uri
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    except (StoreError, ServerError) as exc:
        fail(str(exc), ExitCode.FAILED)


def dry(cfg, path: Path, as_json: bool) -> None:
    """Plan the run in memory against the store as it is (if there is one)."""
    from pestle.engine.dry_run import plan_campaign
    from pestle.engine.workspace import Workspace
    from pestle.store import StoreError
    from pestle.store.server import ServerError

    place = Workspace.of(cfg)
    try:
        store = place.open_store() if place.has_store() else None
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    except (StoreError, ServerError) as exc:
        fail(str(exc), ExitCode.FAILED)
    try:
        plan = plan_campaign(cfg, store)
    except ConfigError as exc:
        fail(str(exc))
    if as_json:
        print_json(plan.summary())
        return
    out = console.print
    out(f"dry run of {escape(str(path))}: run {plan.run_id}; nothing was written", highlight=False)
    out("seeds: " + ", ".join(f"{s['name']} ({s['chemical_system']})" for s in plan.seeds))
    rejected = sum(plan.rejected.values())
    out(
        f"sample: {len(plan.candidates)} candidates ("
        + ", ".join(f"{name} {n}" for name, n in plan.samplers.items())
        + f"), {rejected} refused by the validity check, "
        + f"{sum(s.already_stored for s in plan.systems.values())} already stored"
    )
    committee = f" with committee {', '.join(plan.committee)}" if plan.committee else ""
    weights = ", ".join(f"{k} {v:g}" for k, v in plan.weights.items())
    out(f"score: {plan.potential}{committee}; combined as {weights}")
    params = plan.selector.get("params")
    out(f"select: {plan.selector['name']} {json.dumps(params) if params else ''}".rstrip()
        + f", up to {plan.per_system} per chemical system")  # fmt: skip
    table = Table(title="label, per chemical system")
    columns = ("system", "candidates", "already labelled", "picks", "evaluation set", "checks",
               "DFT calculations")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "system" else "right")
    for system, p in plan.systems.items():
        estimate = str(p.dft_max) if p.dft_min == p.dft_max else f"{p.dft_min}-{p.dft_max}"
        checks = (str(p.checks_max) if p.checks_min == p.checks_max
                  else f"{p.checks_min}-{p.checks_max}")  # fmt: skip
        table.add_row(system, str(p.candidates), str(p.already_labelled), str(p.picks),
                      str(p.evaluation), checks, estimate)  # fmt: skip
    out(table)
    count = (
        str(plan.dft_max) if plan.dft_min == plan.dft_max else f"{plan.dft_min} to {plan.dft_max}"
    )
    out(f"estimate: {count} DFT calculations with {plan.labeller}", highlight=False)
    if plan.finetune:
        out(
            f"then: fine-tune with {plan.finetune} on the picks' training labels, judge it on "
            "the evaluation set (and the held-out picks, if any) and by each seed's equation "
            "of state"
        )
    for note in plan.notes:
        out(f"note: {note}", highlight=False)


def print_summary(stages: dict[str, Any]) -> None:
    from pestle.reports.summary import summary_rows

    table = Table(title="softening scale and force MAE (eV/Å), 95% structure-level intervals")
    for column in ("labels", "system", "model", "structures", "softening scale", "force MAE"):
        table.add_column(column)
    for row in summary_rows(stages):
        table.add_row(row["labels"], row["system"], row["model"], row["n"], row["softening"],
                      row["force_mae"])  # fmt: skip
    console.print(table)
