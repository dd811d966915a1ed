"""``pestle daemon``: start (detached or in the foreground), status, stop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pestle.cli.common import (
    ExitCode,
    JsonOption,
    WorkDirOption,
    console,
    fail,
    open_store,
    print_json,
    quiet_dask,
    workspace,
)
from pestle.config import ConfigError

daemon_app = typer.Typer(
    help="Run campaigns continuously: rounds, scheduled retraining, promotion.",
    no_args_is_help=True,
)

ConfigsOption = Annotated[
    list[Path] | None,
    typer.Option("--config", "-c", help="Campaign YAML (repeat for several; one store)."),
]


@daemon_app.command("start")
def daemon_start(
    configs: Annotated[
        list[Path] | None,
        typer.Argument(metavar="CONFIG", help="Campaign YAML files (one store), or -c."),
    ] = None,
    config: ConfigsOption = None,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run in this process instead of detaching.")
    ] = False,
    exit_when_idle: Annotated[
        bool,
        typer.Option(help="Exit once every campaign is finished or at its round limit."),
    ] = False,
    idle_poll: Annotated[float, typer.Option(help="Seconds between checks when idle.")] = 30.0,
) -> None:
    """Start the daemon: detaches with a PID file and a log file in work_dir/daemon/. One
    daemon per store: while another pestle daemon holds the store's lease, this one exits
    with code 5."""
    from pestle.engine.daemon import Daemon
    from pestle.engine.service import (
        DaemonBusy,
        ServiceError,
        run_in_foreground,
        start_detached,
    )
    from pestle.store import StoreError

    paths = [*(configs or []), *(config or [])]
    if not paths:
        raise typer.BadParameter("give at least one campaign config: CONFIG... or -c CONFIG")
    try:
        daemon = Daemon(paths, exit_when_idle=exit_when_idle, idle_poll_seconds=idle_poll)
    except ConfigError as exc:
        fail(str(exc))
    first = daemon.configs[daemon.paths[0]]
    if foreground:
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        quiet_dask(verbose=True)
        try:
            run_in_foreground(daemon)
        except DaemonBusy as exc:
            fail(str(exc), ExitCode.STORE_BUSY)
        except StoreError as exc:
            fail(str(exc), ExitCode.FAILED)
        return
    try:
        started = start_detached(
            paths, first.work_dir, exit_when_idle=exit_when_idle, idle_poll_seconds=idle_poll
        )
    except ServiceError as exc:
        passed_on = (ExitCode.BAD_INPUT, ExitCode.STORE_BUSY)
        fail(str(exc), exc.returncode if exc.returncode in passed_on else ExitCode.FAILED)
    console.print(f"daemon started: pid {started.pid}, log {started.log_file}", highlight=False)


@daemon_app.command("status")
def daemon_status(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Campaign YAML: its work_dir and store settings."),
    ] = None,
    work_dir: WorkDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Whether the daemon runs, its lease, and each campaign's round, systems and models."""
    from pestle.engine.service import daemon_pid_file, running_daemon

    root = workspace(config, work_dir).work_dir
    pid = running_daemon(root)
    store = open_store(config, work_dir)
    lease = store.meta.daemon_lease()
    states = store.meta.campaign_states()
    promoted = store.models.promoted_all()
    jobs = dict(sorted(store.jobs.counts().items()))
    decisions = store.decisions.find(newest_first=True, limit=5)
    if as_json:
        print_json(
            {"pid": pid, "pid_file": daemon_pid_file(root), "lease": lease,
             "campaigns": states, "promoted": promoted, "jobs": jobs, "decisions": decisions}
        )  # fmt: skip
        return
    console.print(
        f"daemon: {'running, pid ' + str(pid) if pid else 'not running'} ({daemon_pid_file(root)})",
        highlight=False,
    )
    if lease:
        console.print(
            f"store lease: pid {lease.get('pid')} on {lease.get('host')}, "
            f"until {lease['expires_at']:%Y-%m-%d %H:%M:%S} UTC"
        )
    table = Table(title="campaigns")
    for column in ("campaign", "next round", "systems", "finished", "last retraining", "promoted"):
        table.add_column(column)
    current = ", ".join(f"{d['family']}: {d['model_id']}" for d in promoted)
    for name, state in states.items():
        retrain = state.retrain
        table.add_row(
            name,
            str(state.round),
            ", ".join(state.systems),
            ", ".join(state.finished),
            f"{retrain.get('outcome', '')} {retrain.get('model_id', '')}".strip(),
            current,
        )
    console.print(table)
    console.print("jobs: " + (", ".join(f"{k} {v}" for k, v in jobs.items()) or "none"))
    for decision in decisions:
        console.print(f"{decision.at:%Y-%m-%d %H:%M} {decision.kind}: {decision.reason}")


@daemon_app.command("stop")
def daemon_stop(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Campaign YAML: its work_dir and store settings."),
    ] = None,
    work_dir: WorkDirOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the current step.")] = 600,
    kill: Annotated[bool, typer.Option(help="SIGKILL after the timeout.")] = False,
) -> None:
    """SIGTERM: the daemon finishes its current step and exits. Exit code 4 if it still runs
    after --timeout (without --kill)."""
    from pestle.engine.service import ServiceError, daemon_pid_file, stop_daemon

    root = workspace(config, work_dir).work_dir
    try:
        outcome = stop_daemon(
            root,
            timeout=timeout,
            kill=kill,
            on_signalled=lambda pid: console.print(
                f"asked daemon {pid} to stop after its current step"
            ),
        )
    except ServiceError as exc:
        fail(str(exc), ExitCode.FAILED)
    if outcome.pid is None:
        console.print(f"no daemon is running ({daemon_pid_file(root)})", highlight=False)
    elif outcome.killed:
        console.print(f"killed daemon {outcome.pid}; a restart resumes where it stopped")
    else:
        console.print("daemon stopped")
