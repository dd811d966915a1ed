"""What every command shares: the consoles, the common options, exit codes and error exits,
finding the store, and the small helpers that print documents and JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.exceptions
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from pestle.config import CampaignConfig, ConfigError, load_config

# Messages and paths are never hard-wrapped: they stay whole for copying and for grep.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class ExitCode(IntEnum):
    OK = 0
    NO = 1  # a check answered no (`pestle db status`: not running); also an unexpected error
    USAGE = 2  # click/typer: unknown command or option, a bad option value, a missing argument
    BAD_INPUT = 3  # pestle refused the input: nothing was done
    FAILED = 4  # the input was fine, the work failed
    STORE_BUSY = 5  # another pestle daemon holds the store's lease


EXIT_CODES_HELP = """**Exit codes**

* 0 done
* 1 `pestle db status`: the server is not running; or an unexpected error (please report it; PESTLE_TRACEBACK=1 shows its traceback)
* 2 usage error: unknown command or option, a bad option value, a missing argument
* 3 bad input, nothing was done: an invalid config, a missing file or folder, an unknown id, no store where one was looked for, a bad query
* 4 the work failed: the store or server unreachable, a run stopped on an error, the daemon did not start or stop
* 5 another pestle daemon holds the store (`pestle daemon start`)
* 143 `pestle run` stopped by SIGTERM: the run is recorded as interrupted; running it again resumes it
"""

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Campaign YAML: its work_dir and store settings."),
]
WorkDirOption = Annotated[
    Path | None,
    typer.Option(
        "--work-dir", "-w", help="Work directory (default: $PESTLE_WORK_DIR or ./pestle-work)."
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json", help="Print JSON for scripts instead of tables (lists: one object per line)."
    ),
]


TRACEBACK_ENV = "PESTLE_TRACEBACK"


class GuardedGroup(TyperGroup):
    """The root command group: an exception no command turned into a message still ends
    as one (with the exit code of its kind), never as a Python traceback. Set
    ``PESTLE_TRACEBACK=1`` to see the traceback instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):
            raise  # exits and usage errors: typer prints and exits as it should
        except Exception as exc:
            if os.environ.get(TRACEBACK_ENV):
                raise
            code, message = describe_failure(exc)
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
            raise typer.Exit(int(code)) from None


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, message) for an exception that reached the command line."""
    from pestle.store import StoreError
    from pestle.store.errors import is_store_failure
    from pestle.store.uri import mask_text

    text = mask_text(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ConfigError) or (isinstance(exc, ValueError)
                                        and isinstance(exc, StoreError)):  # fmt: skip
        return ExitCode.BAD_INPUT, mask_text(str(exc))
    if is_store_failure(exc):
        return ExitCode.FAILED, f"the store failed: {text}"
    if isinstance(exc, OSError):
        return ExitCode.FAILED, text
    return ExitCode.NO, (
        f"unexpected error: {text} (a bug: please report it; {TRACEBACK_ENV}=1 shows the traceback)"
    )


def fail(message: str, code: int = ExitCode.BAD_INPUT) -> NoReturn:
    # Messages are plain text: "pip install 'pestle[gpaw]'" is not rich markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(int(code))


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def load(config: Path) -> CampaignConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        fail(str(exc))


def workspace(config: Path | None, work_dir: Path | None):
    """The work directory and store settings from --config / --work-dir / the environment."""
    from pestle.engine.workspace import Workspace

    place = Workspace.of(load(config)) if config is not None else Workspace.at(work_dir)
    if place.work_dir.exists() and not place.work_dir.is_dir():
        fail(f"work directory {place.work_dir} is a file, not a folder")
    return place


def open_store(config: Path | None, work_dir: Path | None, *, create: bool = False):
    """The store of --config / --work-dir. Only commands that write a campaign (``run``)
    ``create`` one; every other command fails with a message when there is none."""
    from pestle.engine.workspace import NoStoreError
    from pestle.store import StoreError
    from pestle.store.server import ServerError

    try:
        return workspace(config, work_dir).open_store(create=create)
    except (NoStoreError, FileNotFoundError, ValueError) as exc:
        fail(str(exc), ExitCode.BAD_INPUT)
    except (StoreError, ServerError) as exc:
        fail(str(exc), ExitCode.FAILED)


def jsonable(value: Any) -> Any:
    """Plain JSON types from documents (datetimes, ObjectIds as MongoDB extended JSON),
    pydantic models, dataclasses, paths and numpy values."""
    from bson import json_util

    return json.loads(json_util.dumps(_plain(value)))


def _plain(value: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return _plain(value.model_dump(by_alias=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy
        return value.tolist()
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(value)) + "\n")


def get(doc: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(part)
    return doc


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def quiet_dask(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Where each fine-tune runs (worker, GPU, device) is shown without --verbose.
    logging.getLogger("pestle.placement").setLevel(logging.INFO)
    if not verbose:
        # Dask logs every worker start and stop at INFO; read at import by the scheduler
        # and inherited by the worker processes.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
