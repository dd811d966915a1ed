"""pestle's command line: one module per command group, each a thin layer over functions of
``pestle.engine`` and ``pestle.store`` that a Python user can call too.

- ``run``: ``pestle run``
- ``store``: ``status``, ``query``, ``export``, ``report``
- ``jobs``: ``jobs`` (list), ``jobs retry``
- ``db``: ``db start|stop|status`` (the embedded server)
- ``models``: ``models`` (list), ``models promote``, ``evaluate``
- ``explain``: ``explain``
- ``plugins``: ``plugins``, ``samplers``
- ``daemon``: ``daemon start|status|stop``
- ``common``: consoles, shared options, error exits, finding the store
"""

from __future__ import annotations

import typer

from pestle.cli import explain as _explain
from pestle.cli import models as _models
from pestle.cli import plugins as _plugins
from pestle.cli import run as _run
from pestle.cli import store as _store
from pestle.cli.daemon import daemon_app
from pestle.cli.db import db_app
from pestle.cli.jobs import jobs_app
from pestle.store.queries import parse_query

app = typer.Typer(
    help="Grow training data for universal interatomic potentials where they soften.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(daemon_app, name="daemon")
app.command()(_run.run)
app.command()(_store.status)
app.command()(_store.query)
app.command()(_store.export)
app.command()(_store.report)
app.add_typer(_models.models_app, name="models")
app.command()(_explain.explain)
app.command()(_plugins.samplers)
app.command()(_plugins.plugins)
app.command()(_models.evaluate)

__all__ = ["app", "main", "parse_query"]


def main() -> None:  # pragma: no cover - console entry point
    app()
