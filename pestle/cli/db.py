"""``pestle db``: the embedded local MongoDB-compatible server of a work directory."""

from __future__ import annotations

import typer

from pestle.cli.common import ConfigOption, ExitCode, WorkDirOption, console, fail, workspace

db_app = typer.Typer(help="The embedded local MongoDB-compatible server.", no_args_is_help=True)


@db_app.command("start")
def db_start(config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """Start (or reuse) the embedded server for this work directory."""
    from pestle.store.server import ServerError

    try:
        state = workspace(config, work_dir).server.ensure_running()
    except ServerError as exc:
        fail(str(exc), ExitCode.FAILED)
    console.print(f"running: {state.uri_masked} (pid {state.pid}, data {state.data_dir})")


@db_app.command("stop")
def db_stop(config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """Stop the embedded server."""
    server = workspace(config, work_dir).server
    if not server.root.is_dir():  # nothing to stop, and no folder to leave behind
        console.print(f"not running ({server.root} does not exist)", highlight=False)
        return
    console.print("stopped" if server.stop() else "not running")


@db_app.command("status")
def db_status(config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """Is the embedded server running, and where? Exit code 1 when it is not."""
    server = workspace(config, work_dir).server
    state = server.state()
    if state is None:
        console.print(f"not running ({server.root})")
        raise typer.Exit(ExitCode.NO)
    console.print(f"running: {state.uri_masked} (pid {state.pid}, data {state.data_dir})")
