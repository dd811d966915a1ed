"""pestle's command line: run campaigns, inspect and export the store, manage the local server."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import typing
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pestle.config import CampaignConfig, ConfigError, load_config
from pestle.store.queries import parse_query

app = typer.Typer(
    help="Grow training data for universal interatomic potentials where they soften.",
    no_args_is_help=True,
)
db_app = typer.Typer(help="The embedded local MongoDB-compatible server.", no_args_is_help=True)
jobs_app = typer.Typer(help="Labelling and training jobs.", invoke_without_command=True)
daemon_app = typer.Typer(
    help="Run campaigns continuously: rounds, scheduled retraining, promotion.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(daemon_app, name="daemon")

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

COLLECTIONS = ("structures", "labels", "jobs", "models", "runs", "decisions")

ElementsOption = Annotated[
    str | None, typer.Option("--elements", help="Containing all of these, e.g. Li,F.")
]
SystemOption = Annotated[str | None, typer.Option("--system", help="Chemical system, e.g. Li-F.")]
FormulaOption = Annotated[str | None, typer.Option("--formula", help="Reduced formula, e.g. LiF.")]
SamplerOption = Annotated[str | None, typer.Option("--sampler", help="Sampler name, e.g. rattle.")]
LabelledOption = Annotated[
    bool | None,
    typer.Option("--labelled/--unlabelled", help="Structures with a label / without one."),
]
EnergyMin = Annotated[float | None, typer.Option(help="Label energy per atom >= (eV/atom).")]
EnergyMax = Annotated[float | None, typer.Option(help="Label energy per atom <= (eV/atom).")]
ForceMin = Annotated[float | None, typer.Option(help="Label max force >= (eV/Å).")]
ForceMax = Annotated[float | None, typer.Option(help="Label max force <= (eV/Å).")]


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _load(config: Path) -> CampaignConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        _fail(str(exc))


def _location(config: Path | None, work_dir: Path | None) -> tuple[Path, Any]:
    """(work dir, store spec or None) from --config / --work-dir / environment."""
    if config is not None:
        cfg = _load(config)
        return Path(cfg.work_dir), cfg.store
    return Path(work_dir or os.environ.get("PESTLE_WORK_DIR", "pestle-work")), None


def _open_store(config: Path | None, work_dir: Path | None, start: bool = True):
    from pestle.store import StoreError, open_store

    root, spec = _location(config, work_dir)
    try:
        if spec is None:
            return open_store(root, start=start)
        return open_store(root, spec.uri, spec.uri_file, spec.database, start=start)
    except (StoreError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Campaign YAML file.")],
    workers: Annotated[int | None, typer.Option(help="Override dask.n_workers.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a campaign: sample, score, select, label, fine-tune, evaluate, report."""
    _quiet_dask(verbose)
    cfg = _load(config)
    if workers is not None:
        cfg.dask.n_workers = workers
    from pestle.dispatch.cluster import make_client
    from pestle.engine.run import run_campaign
    from pestle.stages.context import run_id_for
    from pestle.store import Store, StoreError, resolve_uri

    try:
        uri = resolve_uri(cfg.work_dir, cfg.store.uri, cfg.store.uri_file)
        store = Store(uri, cfg.store.database)
    except (StoreError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
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
    _print_summary(result.stages)
    console.print(f"report: {result.report}")


def _print_summary(stages: dict[str, Any]) -> None:
    from pestle.reports.summary import summary_rows

    table = Table(title="softening scale and force MAE (eV/Å), 95% structure-level intervals")
    for column in ("labels", "system", "model", "structures", "softening scale", "force MAE"):
        table.add_column(column)
    for row in summary_rows(stages):
        table.add_row(row["labels"], row["system"], row["model"], row["n"], row["softening"],
                      row["force_mae"])  # fmt: skip
    console.print(table)


@app.command()
def status(config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """Counts of stored documents, job states and recent runs."""
    from pestle.store import EmbeddedServer

    root, spec = _location(config, work_dir)
    if (spec is None or not (spec.uri or spec.uri_file)) and not os.environ.get(
        "PESTLE_MONGODB_URI"
    ):
        state = EmbeddedServer(root).state()
        console.print(
            f"embedded server: {'running on ' + state.uri if state else 'stopped'} ({root / 'db'})"
        )
    store = _open_store(config, work_dir)
    table = Table(title=f"store {store.uri_masked} / {store.database}")
    table.add_column("collection")
    table.add_column("documents", justify="right")
    for name, n in store.counts().items():
        table.add_row(name, str(n))
    console.print(table)
    console.print(
        "jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(store.jobs.counts().items())) or "none")
    )
    for run_doc in store.runs.recent(5):
        console.print(f"run {run_doc.id}: {run_doc.state} {run_doc.report or ''}")


def _filter_or_fail(
    store, collection: str, terms: list[str] | None, named: dict[str, Any]
) -> dict[str, Any]:
    """The user's filter (JSON or key=value terms) AND the named options."""
    from pestle.store.queries import build_filter

    base = _parse_or_fail(terms)
    if all(v is None for v in named.values()):
        return base
    if named.get("elements"):
        named["elements"] = [e.strip() for e in named["elements"].split(",") if e.strip()]
    try:
        return build_filter(store, collection, base, **named)
    except ValueError as exc:
        _fail(str(exc))


def _parse_or_fail(terms: list[str] | None) -> dict[str, Any]:
    try:
        return parse_query(terms or [])
    except ValueError as exc:
        _fail(str(exc))


def _jsonable(value: Any) -> Any:
    from bson import json_util

    return json.loads(json_util.dumps(value))


DEFAULT_COLUMNS = {
    "structures": [
        "_id",
        "kind",
        "formula",
        "chemical_system",
        "natoms",
        "provenance.sampler",
        "provenance.parent_name",
    ],
    "labels": ["_id", "formula", "sampler", "labeller", "energy_per_atom", "max_force"],
    "jobs": ["_id", "kind", "state", "attempts", "worker", "error"],
    "models": ["_id", "family", "potential", "run_id", "created_at"],
    "runs": ["_id", "campaign", "state", "started_at", "report"],
}


def _get(doc: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(part)
    return doc


@app.command()
def query(
    terms: Annotated[
        list[str] | None,
        typer.Argument(help='JSON filter, e.g. \'{"natoms": {"$gt": 8}}\', or key=value terms.'),
    ] = None,
    collection: Annotated[
        str, typer.Option("--collection", "-C", help="structures, labels, jobs, models or runs.")
    ] = "structures",
    limit: Annotated[int, typer.Option(help="At most this many documents (0: all).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines for machines.")] = False,
    elements: ElementsOption = None,
    system: SystemOption = None,
    formula: FormulaOption = None,
    sampler: SamplerOption = None,
    labelled: LabelledOption = None,
    energy_min: EnergyMin = None,
    energy_max: EnergyMax = None,
    force_min: ForceMin = None,
    force_max: ForceMax = None,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Query the store: a MongoDB filter and/or the named filters (elements, system, formula,
    sampler, label status, energy and force ranges)."""
    if collection not in COLLECTIONS:
        _fail(f"--collection must be one of {', '.join(COLLECTIONS)}")
    store = _open_store(config, work_dir)
    named = dict(elements=elements, system=system, formula=formula, sampler=sampler,
                 labelled=labelled, energy_min=energy_min, energy_max=energy_max,
                 force_min=force_min, force_max=force_max)  # fmt: skip
    mongo_filter = _filter_or_fail(store, collection, terms, named)
    from pestle.store import StoreError

    fields = None if as_json else DEFAULT_COLUMNS[collection]
    try:
        docs = list(store.query(collection, mongo_filter, fields, limit=max(limit, 0)))
    except StoreError as exc:
        _fail(str(exc))
    if as_json:
        for doc in docs:
            sys.stdout.write(json.dumps(_jsonable(doc)) + "\n")
        return
    table = Table(title=f"{collection}: {len(docs)} shown")
    for column in DEFAULT_COLUMNS[collection]:
        table.add_column(column)
    for doc in docs:
        table.add_row(*[_cell(_get(doc, c)) for c in DEFAULT_COLUMNS[collection]])
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


@app.command()
def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    terms: Annotated[
        list[str] | None, typer.Argument(help="Filter on labels (JSON or key=value).")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="extxyz, ase-db, chgnet (JSON) or mace (extxyz)")
    ] = "extxyz",
    elements: ElementsOption = None,
    system: SystemOption = None,
    formula: FormulaOption = None,
    sampler: SamplerOption = None,
    energy_min: EnergyMin = None,
    energy_max: EnergyMax = None,
    force_min: ForceMin = None,
    force_max: ForceMax = None,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Export labelled structures: extxyz (energy, forces, stress, provenance in info), an ASE
    database, or the training inputs of CHGNet (StructureJsonData JSON) and MACE (extxyz with
    REF_ keys)."""
    from pestle.export import EXPORTERS

    if fmt not in EXPORTERS:
        _fail(f"--format {fmt!r} is not supported (supported: {', '.join(EXPORTERS)})")
    store = _open_store(config, work_dir)
    named = dict(elements=elements, system=system, formula=formula, sampler=sampler,
                 energy_min=energy_min, energy_max=energy_max, force_min=force_min,
                 force_max=force_max)  # fmt: skip
    label_filter = _filter_or_fail(store, "labels", terms, named)
    n = EXPORTERS[fmt](store, output, label_filter)
    console.print(f"wrote {n} labelled structures to {output} ({fmt})")


@app.command()
def report(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Directory (default <work_dir>/report; with --run, the run's folder).",
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="html or md")] = "html",
    run_id: Annotated[
        str | None, typer.Option("--run", help="Write this run's report again instead.")
    ] = None,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Write the store's report (or with --run, one run's): softening per system and sampler
    across model versions with structure-level intervals, parity plots, learning curves,
    dataset distributions, cost per label, jobs and decisions (PNG figures beside an HTML or
    Markdown page)."""
    from pestle.reports.run_report import write_run_report
    from pestle.reports.store_report import write_store_report
    from pestle.store import StoreError

    if fmt not in ("html", "md"):
        _fail(f"--format must be html or md, not {fmt!r}")
    root, _ = _location(config, work_dir)
    store = _open_store(config, work_dir)
    if run_id is not None:
        try:
            path = write_run_report(store, run_id, output, fmt, work_dir=Path(root))
        except StoreError as exc:
            _fail(str(exc))
    else:
        path = write_store_report(store, Path(root), output or Path(root) / "report", fmt)
    console.print(f"report: {path}")


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
    store = _open_store(config, work_dir)
    table = Table(title="jobs")
    for column in DEFAULT_COLUMNS["jobs"]:
        table.add_column(column)
    for doc in store.jobs.find(state=state):
        table.add_row(*[_cell(_get(doc.model_dump(), c)) for c in DEFAULT_COLUMNS["jobs"]])
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
        _fail("say which jobs: --failed")
    store = _open_store(config, work_dir)
    console.print(f"re-queued {store.jobs.requeue_failed()} failed jobs")


@db_app.command("start")
def db_start(config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """Start (or reuse) the embedded server for this work directory."""
    from pestle.store import EmbeddedServer
    from pestle.store.server import ServerError

    root, _ = _location(config, work_dir)
    try:
        state = EmbeddedServer(root).ensure_running()
    except ServerError as exc:
        _fail(str(exc))
    console.print(f"running: {state.uri} (pid {state.pid}, data {state.data_dir})")


@db_app.command("stop")
def db_stop(config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """Stop the embedded server."""
    from pestle.store import EmbeddedServer

    root, _ = _location(config, work_dir)
    console.print("stopped" if EmbeddedServer(root).stop() else "not running")


@db_app.command("status")
def db_status(config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """Is the embedded server running, and where?"""
    from pestle.store import EmbeddedServer

    root, _ = _location(config, work_dir)
    state = EmbeddedServer(root).state()
    if state is None:
        console.print(f"not running ({root / 'db'})")
        raise typer.Exit(1)
    console.print(f"running: {state.uri} (pid {state.pid}, data {state.data_dir})")


models_app = typer.Typer(help="Model versions in the store.", invoke_without_command=True)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(ctx: typer.Context, config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """List model versions: family, parent, training data, held-out softening, promotion."""
    if ctx.invoked_subcommand is not None:
        return
    from pestle.evaluation.evaluate import stored_softening
    from pestle.evaluation.intervals import format_estimate

    store = _open_store(config, work_dir)
    table = Table(title="models")
    for column in (
        "id",
        "family",
        "parent",
        "train labels",
        "softening (latest evaluation)",
        "current",
    ):
        table.add_column(column, overflow="fold")
    for doc in store.models.all():
        # The latest evaluation of the model, whoever made it (a run, the daemon, the CLI).
        evaluation = doc.evaluations[-1].metrics if doc.evaluations else {}
        slopes = ", ".join(
            f"{system} {format_estimate(estimate)}"
            for system, estimate in sorted(stored_softening(evaluation).items())
        )
        table.add_row(
            doc.id,
            doc.family,
            str(doc.parent.get("model") or doc.parent.get("checkpoint_sha256") or ""),
            str(len(doc.training.label_ids)),
            slopes,
            "yes" if store.models.promoted(doc.family) == doc.id else "",
        )
    console.print(table)


@models_app.command("promote")
def models_promote(
    model_id: Annotated[str, typer.Argument(help="The model version to make current.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the store).")] = "promoted by hand",
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Make a model version the current one of its family."""
    from pestle.store import StoreError

    store = _open_store(config, work_dir)
    try:
        outcome = store.models.promote(model_id, reason)
    except StoreError as exc:
        _fail(str(exc))
    console.print(
        f"{outcome['family']}: {outcome['model_id']} is current"
        + (f" (was {outcome['previous']})" if outcome["previous"] else "")
    )


@app.command()
def explain(
    structure_id: Annotated[str, typer.Argument(help="A structure id (or a unique prefix).")],
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Why a candidate was, or was not, picked for labelling in each run it took part in."""

    from pestle.engine.explain import explain_structure
    from pestle.store import StoreError

    store = _open_store(config, work_dir)
    try:
        found = explain_structure(store, structure_id)
    except StoreError as exc:
        _fail(str(exc))
    doc, prov = found.structure, found.structure.provenance
    console.print(
        f"[bold]{doc.id}[/] {doc.formula} ({doc.chemical_system}, {doc.natoms} atoms), "
        f"{doc.kind} from sampler {prov.sampler} {json.dumps(_jsonable(prov.params))}"
    )
    for verdict in found.runs:
        run_id = verdict.run_id
        if not verdict.reached_selection:
            console.print(f"run {run_id}: selection not reached")
            continue
        if verdict.selected:
            console.print(
                f"run {run_id}: [green]selected[/], rank {verdict.rank}: {verdict.reason}"
            )
        else:
            console.print(
                f"run {run_id}: [yellow]not selected[/]: {verdict.selector['name']} "
                f"{json.dumps(verdict.selector.get('params', {}))} picked "
                f"{verdict.picked_in_system} of the {doc.chemical_system} candidates (budget "
                f"{verdict.budget}); weights {json.dumps(verdict.weights)}"
            )
        if verdict.scores:
            console.print(
                "  scores: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(verdict.scores.items()))
            )
    if found.label is not None:
        console.print(f"  labelled: {found.label.id} by {found.label.labeller}")


def plugin_rows(registry) -> list[tuple[str, str, str, str, str, str]]:
    """(name, from, parameter, type, default, description) for every implementation: the
    built-ins (from ``pestle``) and other packages' entry points (from their distribution).
    An entry point that cannot be loaded gets one row saying why, and the rest are listed."""
    from pydantic_core import PydanticUndefined

    from pestle.plugins import RegistryError

    rows = []
    for name in registry.names():
        origin = registry.origin(name)
        try:
            cls = registry.get(name)
        except RegistryError as exc:
            rows.append((name, origin, "", "", "", f"cannot be used: {exc}"))
            continue
        summary = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
        summary = summary.splitlines()[0] if summary else ""
        fields = cls.Params.model_fields
        if not fields:
            rows.append((name, origin, "", "", "", summary))
        for index, (field_name, info) in enumerate(fields.items()):
            if info.default is not PydanticUndefined:
                default = repr(info.default)
            elif info.default_factory is not None:
                default = repr(info.default_factory())
            else:
                default = "(required)"
            annotation = (
                info.annotation.__name__
                if isinstance(info.annotation, type) and typing.get_origin(info.annotation) is None
                else re.sub(r"Annotated\[([\w.]+), [^\]]*\]", r"\1", str(info.annotation))
            )
            rows.append(
                (
                    name if index == 0 else "",
                    origin if index == 0 else "",
                    field_name,
                    annotation.replace("typing.", ""),
                    default,
                    (summary + "\n" if index == 0 and summary else "") + (info.description or ""),
                )
            )
    return rows


def _list_plugins(kind: str, registry) -> None:
    table = Table(title=f"{kind} (name: params in the config)", show_lines=True)
    for column in ("name", "from", "parameter", "type", "default", "description"):
        table.add_column(column, overflow="fold")
    for row in plugin_rows(registry):
        table.add_row(*(escape(cell) for cell in row))  # "list[float]" is not rich markup
    console.print(table)


@app.command()
def samplers() -> None:
    """List the samplers (built-in and from installed packages) with their parameters."""
    from pestle.samplers import SAMPLERS

    _list_plugins("samplers", SAMPLERS)


@app.command()
def plugins() -> None:
    """List every sampler, potential, selector, labeller and trainer, built-in or from an
    installed package's entry points."""
    from pestle.labellers import LABELLERS
    from pestle.potentials import POTENTIALS
    from pestle.samplers import SAMPLERS
    from pestle.selectors import SELECTORS
    from pestle.trainers import TRAINERS

    for kind, registry in (
        ("samplers", SAMPLERS),
        ("potentials", POTENTIALS),
        ("selectors", SELECTORS),
        ("labellers", LABELLERS),
        ("trainers", TRAINERS),
    ):
        _list_plugins(kind, registry)


@app.command()
def evaluate(
    model: Annotated[
        str,
        typer.Argument(help="A stored model id (model-...) or a potential: chgnet, chgnet:0.2.0."),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="An extxyz file with reference energies and forces, or a label query (JSON "
            "or key=value). Default: the model's held-out labels.",
        ),
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option(help="Compare against this model (default: a stored model's parent)."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Directory.")] = None,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Energy/force/stress errors and the softening scale per chemical system and sampler,
    parity plots, and a comparison against the parent model."""
    from pestle.engine.evaluate import evaluate_model
    from pestle.store import StoreError

    root, _ = _location(config, work_dir)
    out = output or Path(root) / "evaluations" / model.replace(":", "-")
    data_is_file = data is not None and Path(data).is_file()
    needs_store = (
        model.startswith("model-") or (parent or "").startswith("model-") or not data_is_file
    )
    store = _open_store(config, work_dir) if needs_store else None
    source = data if data_is_file or data is None else _parse_or_fail([data])
    try:
        result = evaluate_model(store, model, out, data=source, parent=parent)
    except (StoreError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    sys.stdout.write(result["table"] + "\n")  # unwrapped: a markdown table to paste
    console.print(f"{result['n_structures']} labelled structures; plots and tables in {out}")


def _quiet_dask(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # Dask logs every worker start and stop at INFO; read at import by the scheduler
        # and inherited by the worker processes.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


@daemon_app.command("start")
def daemon_start(
    configs: Annotated[list[Path], typer.Argument(help="Campaign YAML files (one store).")],
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run in this process instead of detaching.")
    ] = False,
    exit_when_idle: Annotated[
        bool,
        typer.Option(help="Exit once every campaign is finished or at its round limit."),
    ] = False,
    idle_poll: Annotated[float, typer.Option(help="Seconds between checks when idle.")] = 30.0,
) -> None:
    """Start the daemon: detaches with a PID file and a log file in <work_dir>/daemon/."""
    import signal
    import subprocess
    import time

    from pestle.engine.daemon import Daemon, log_file, pid_file
    from pestle.store import StoreError

    try:
        daemon = Daemon(configs, exit_when_idle=exit_when_idle, idle_poll_seconds=idle_poll)
    except ConfigError as exc:
        _fail(str(exc))
    first = daemon.configs[daemon.paths[0]]
    if foreground:
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        _quiet_dask(verbose=True)
        signal.signal(signal.SIGTERM, daemon.request_stop)
        signal.signal(signal.SIGINT, daemon.request_stop)
        try:
            daemon.run()
        except StoreError as exc:
            _fail(str(exc), code=3)
        return
    log_path, pid_path = log_file(first), pid_file(first)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if pid_path.is_file():
        pid_path.unlink()  # a stale file from a killed daemon; a live one holds the lease
    command = [sys.executable, "-m", "pestle", "daemon", "start", "--foreground",
               f"--idle-poll={idle_poll}", *([] if not exit_when_idle else ["--exit-when-idle"]),
               *[str(p.resolve()) for p in configs]]  # fmt: skip
    with open(log_path, "ab") as log_handle:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the terminal; SIGHUP does not reach it
            env={**os.environ, "DASK_LOGGING__DISTRIBUTED": "warning"},
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if pid_path.is_file() and pid_path.read_text().strip() == str(child.pid):
            console.print(f"daemon started: pid {child.pid}, log {log_path}")
            return
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            _fail(f"the daemon exited ({child.returncode}):\n" + "\n".join(tail))
        time.sleep(0.2)
    _fail(f"the daemon (pid {child.pid}) did not report in 120 s; see {log_path}")


def _daemon_pid(config: Path | None, work_dir: Path | None) -> tuple[Path, int | None]:
    from pestle.store.server import pid_alive

    root, _ = _location(config, work_dir)
    path = Path(root).resolve() / "daemon" / "daemon.pid"
    if not path.is_file():
        return path, None
    pid = int(path.read_text().strip() or 0)
    return path, pid if pid and pid_alive(pid) else None


@daemon_app.command("status")
def daemon_status(config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """Whether the daemon runs, its lease, and each campaign's round, systems and models."""
    path, pid = _daemon_pid(config, work_dir)
    console.print(f"daemon: {'running, pid ' + str(pid) if pid else 'not running'} ({path})")
    store = _open_store(config, work_dir)
    lease = store.meta.daemon_lease()
    if lease:
        console.print(
            f"store lease: pid {lease.get('pid')} on {lease.get('host')}, "
            f"until {lease['expires_at']:%Y-%m-%d %H:%M:%S} UTC"
        )
    table = Table(title="campaigns")
    for column in ("campaign", "next round", "systems", "finished", "last retraining", "promoted"):
        table.add_column(column)
    promoted = ", ".join(f"{d['family']}: {d['model_id']}" for d in store.models.promoted_all())
    for name, state in store.meta.campaign_states().items():
        retrain = state.retrain
        table.add_row(
            name,
            str(state.round),
            ", ".join(state.systems),
            ", ".join(state.finished),
            f"{retrain.get('outcome', '')} {retrain.get('model_id', '')}".strip(),
            promoted,
        )
    console.print(table)
    console.print(
        "jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(store.jobs.counts().items())) or "none")
    )
    for decision in store.decisions.find(newest_first=True, limit=5):
        console.print(f"{decision.at:%Y-%m-%d %H:%M} {decision.kind}: {decision.reason}")


@daemon_app.command("stop")
def daemon_stop(
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the current step.")] = 600,
    kill: Annotated[bool, typer.Option(help="SIGKILL after the timeout.")] = False,
) -> None:
    """SIGTERM: the daemon finishes its current step and exits."""
    import signal
    import time

    from pestle.store.server import pid_alive

    path, pid = _daemon_pid(config, work_dir)
    if pid is None:
        console.print(f"no daemon is running ({path})")
        return
    os.kill(pid, signal.SIGTERM)
    console.print(f"asked daemon {pid} to stop after its current step")
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if pid_alive(pid):
        if not kill:
            _fail(f"daemon {pid} still runs after {timeout:.0f} s (use --kill)", code=1)
        # A detached daemon leads its own process group: its Dask workers go with it.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        console.print(f"killed daemon {pid}; a restart resumes where it stopped")
    else:
        console.print("daemon stopped")


def main() -> None:  # pragma: no cover - console entry point
    with nullcontext():
        app()
