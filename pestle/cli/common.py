"""What every command shares: the consoles, the common options, error exits, finding the
store, and the small helpers that print documents."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from pestle.config import CampaignConfig, ConfigError, load_config

console = Console()
err_console = Console(stderr=True)

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


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def load(config: Path) -> CampaignConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        fail(str(exc))


def workspace(config: Path | None, work_dir: Path | None):
    """The work directory and store settings from --config / --work-dir / the environment."""
    from pestle.engine.workspace import Workspace

    return Workspace.of(load(config)) if config is not None else Workspace.at(work_dir)


def open_store(config: Path | None, work_dir: Path | None, start: bool = True):
    from pestle.store import StoreError

    try:
        return workspace(config, work_dir).open_store(start=start)
    except (StoreError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))


def jsonable(value: Any) -> Any:
    """Plain JSON types from documents holding datetimes, ObjectIds and the like."""
    from bson import json_util

    return json.loads(json_util.dumps(value))


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
    if not verbose:
        # Dask logs every worker start and stop at INFO; read at import by the scheduler
        # and inherited by the worker processes.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
