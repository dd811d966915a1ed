"""pestle's command line: one module per command group, each a thin layer over functions of
``pestle.engine``, ``pestle.store`` and ``pestle.config`` that a Python user can call too.

- ``run``: ``pestle run`` (and ``--dry-run``)
- ``store``: ``status``, ``query``, ``export``, ``report``
- ``jobs``: ``jobs`` (list), ``jobs show``, ``jobs retry``
- ``models``: ``models`` (list), ``models promote``, ``models trust``, ``evaluate``
- ``explain``: ``explain``
- ``plugins``: ``plugins``, ``samplers``
- ``config``: ``config schema|docs|validate``
- ``db``: ``db start|stop|status`` (the embedded server)
- ``daemon``: ``daemon start|status|stop``
- ``common``: consoles, shared options, exit codes, error exits, finding the store
"""

from __future__ import annotations

import typer

from pestle.cli import explain as _explain
from pestle.cli import models as _models
from pestle.cli import plugins as _plugins
from pestle.cli import run as _run
from pestle.cli import store as _store
from pestle.cli.common import EXIT_CODES_HELP, ExitCode, GuardedGroup
from pestle.cli.config import config_app
from pestle.cli.daemon import daemon_app
from pestle.cli.db import db_app
from pestle.cli.jobs import jobs_app
from pestle.store.queries import parse_query

MARKUP = "markdown"  # docstrings are paragraphs: wrapped to the terminal, not line by line

app = typer.Typer(
    help="Grow training data for universal interatomic potentials where they soften. "
    "Commands find the store from --config CONFIG or --work-dir (default $PESTLE_WORK_DIR "
    "or ./pestle-work); only run, daemon start and db start create one.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode=MARKUP,
    cls=GuardedGroup,  # no traceback: every failure a message
)
for sub in (db_app, jobs_app, daemon_app, config_app, _models.models_app):
    sub.rich_markup_mode = MARKUP
    sub.info.epilog = EXIT_CODES_HELP
    for command in sub.registered_commands:
        command.epilog = command.epilog or EXIT_CODES_HELP
app.command(epilog=EXIT_CODES_HELP)(_run.run)
app.command(epilog=EXIT_CODES_HELP)(_store.status)
app.command(epilog=EXIT_CODES_HELP)(_store.query)
app.command(epilog=EXIT_CODES_HELP)(_store.export)
app.command(epilog=EXIT_CODES_HELP)(_store.report)
app.add_typer(jobs_app, name="jobs")
app.add_typer(_models.models_app, name="models")
app.command(epilog=EXIT_CODES_HELP)(_models.evaluate)
app.command(epilog=EXIT_CODES_HELP)(_explain.explain)
app.command(epilog=EXIT_CODES_HELP)(_plugins.samplers)
app.command(epilog=EXIT_CODES_HELP)(_plugins.plugins)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(daemon_app, name="daemon")

__all__ = ["ExitCode", "app", "main", "parse_query"]


def main() -> None:  # pragma: no cover - console entry point
    app()
