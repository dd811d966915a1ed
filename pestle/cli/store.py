"""Reading the store: ``pestle status``, ``query``, ``export`` and ``report``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from pestle.cli.common import (
    ConfigOption,
    JsonOption,
    WorkDirOption,
    cell,
    console,
    err_console,
    fail,
    get,
    jsonable,
    open_store,
    print_json,
    warn,
    workspace,
)
from pestle.store import COLLECTIONS
from pestle.store.queries import parse_query

Collection = Literal[COLLECTIONS]  # every collection a store has
ExportFormat = Literal["extxyz", "ase-db", "chgnet", "mace"]

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
    "decisions": ["_id", "at", "kind", "campaign", "reason"],
}

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


def parse_or_fail(terms: list[str] | None) -> dict[str, Any]:
    try:
        return parse_query(terms or [])
    except ValueError as exc:
        fail(str(exc))


def filter_or_fail(
    store, collection: str, terms: list[str] | None, named: dict[str, Any]
) -> dict[str, Any]:
    """The user's filter (JSON or key=value terms) AND the named options."""
    from pestle.store.queries import build_filter

    base = parse_or_fail(terms)
    if all(v is None for v in named.values()):
        return base
    if named.get("elements"):
        named["elements"] = [e.strip() for e in named["elements"].split(",") if e.strip()]
    try:
        return build_filter(store, collection, base, **named)
    except ValueError as exc:
        fail(str(exc))


def status(
    config: ConfigOption = None, work_dir: WorkDirOption = None, as_json: JsonOption = False
) -> None:
    """Counts of stored documents, job states and recent runs, then the next useful
    command."""
    from pestle.engine.status import next_steps, store_status
    from pestle.store.runs import run_process_gone

    place = workspace(config, work_dir)
    store = open_store(config, work_dir)
    found = store_status(store)
    where = f"-c {config}" if config is not None else (f"-w {work_dir}" if work_dir else "")
    steps = next_steps(store, found, str(config) if config is not None else None, where)
    server = place.server.state() if place.embedded else None
    if as_json:
        print_json(
            {
                "server": None
                if server is None
                else {"uri": server.uri_masked, "pid": server.pid, "data_dir": server.data_dir},
                "store": {"uri": found.uri, "database": found.database},
                "counts": found.counts,
                "jobs": found.jobs,
                "runs": [
                    {
                        "id": r.id,
                        "state": r.state,
                        "process_gone": run_process_gone(r),
                        "report": r.report,
                        "started_at": r.started_at,
                    }
                    for r in found.runs
                ],
                "next": [vars(step) for step in steps],
            }
        )
        return
    if server is not None:
        console.print(f"embedded server: running on {server.uri_masked} ({place.server.root})")
    table = Table(title=f"store {found.uri} / {found.database}")
    table.add_column("collection")
    table.add_column("documents", justify="right")
    for name, n in found.counts.items():
        table.add_row(name, str(n))
    console.print(table)
    console.print("jobs: " + (", ".join(f"{k} {v}" for k, v in found.jobs.items()) or "none"))
    for run_doc in found.runs:
        state = run_doc.state
        if run_process_gone(run_doc):
            state = "stopped unfinished (its process is gone: killed?)"
        console.print(f"run {run_doc.id}: {state} {run_doc.report or ''}")
    console.print("next:")
    width = max(len(step.command) for step in steps)
    for step in steps:
        console.print(f"  {escape(step.command):<{width}}  # {escape(step.why)}", highlight=False)


def query(
    terms: Annotated[
        list[str] | None,
        typer.Argument(help='JSON filter, e.g. \'{"natoms": {"$gt": 8}}\', or key=value terms.'),
    ] = None,
    collection: Annotated[
        Collection, typer.Option("--collection", help="The collection to query.")
    ] = "structures",
    old_collection: Annotated[
        Collection | None,
        typer.Option("-C", hidden=True, help="Deprecated spelling of --collection."),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many documents (0: all).")] = 50,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON lines (one document each) for scripts.")
    ] = False,
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
    sampler, label status, energy and force ranges). Says when --limit cut the list short."""
    if old_collection is not None:
        warn("-C is deprecated (it is too close to -c, --config): use --collection")
        collection = old_collection
    store = open_store(config, work_dir)
    named = dict(elements=elements, system=system, formula=formula, sampler=sampler,
                 labelled=labelled, energy_min=energy_min, energy_max=energy_max,
                 force_min=force_min, force_max=force_max)  # fmt: skip
    mongo_filter = filter_or_fail(store, collection, terms, named)
    from pestle.store import StoreError

    fields = None if as_json else DEFAULT_COLUMNS[collection]
    try:
        docs = list(store.query(collection, mongo_filter, fields, limit=max(limit, 0)))
        total = store.count(collection, mongo_filter) if limit > 0 else len(docs)
    except StoreError as exc:
        fail(str(exc))
    shown = f"{len(docs)} of {total}"
    more = " (--limit 0 shows all)" if len(docs) < total else ""
    if as_json:
        for doc in docs:
            sys.stdout.write(json.dumps(jsonable(doc)) + "\n")
        if more:
            err_console.print(f"{collection}: {shown} documents{more}", highlight=False)
        return
    table = Table(title=f"{collection}: {shown} shown{more}")
    for column in DEFAULT_COLUMNS[collection]:
        table.add_column(column)
    for doc in docs:
        table.add_row(*[cell(get(doc, c)) for c in DEFAULT_COLUMNS[collection]])
    console.print(table)


def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    terms: Annotated[
        list[str] | None, typer.Argument(help="Filter on labels (JSON or key=value).")
    ] = None,
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", help="extxyz, ase-db, chgnet (JSON) or mace (extxyz)"),
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

    folder = output.expanduser().absolute().parent
    if not folder.is_dir():
        fail(f"--output: the folder {folder} does not exist (create it first)")
    if output.is_dir():
        fail(f"--output: {output} is a folder; give a file name in it")
    store = open_store(config, work_dir)
    named = dict(elements=elements, system=system, formula=formula, sampler=sampler,
                 energy_min=energy_min, energy_max=energy_max, force_min=force_min,
                 force_max=force_max)  # fmt: skip
    label_filter = filter_or_fail(store, "labels", terms, named)
    try:
        n = EXPORTERS[fmt](store, output, label_filter)
    except OSError as exc:  # not writable, a folder in the way, a full disk
        fail(f"cannot write {output}: {exc.strerror or exc}")
    console.print(f"wrote {n} labelled structures to {output} ({fmt})")


def report(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Directory (default <work_dir>/report; with --run, the run's folder).",
        ),
    ] = None,
    fmt: Annotated[
        Literal["html", "md"], typer.Option("--format", "-f", help="html or md")
    ] = "html",
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

    root = workspace(config, work_dir).work_dir
    store = open_store(config, work_dir)
    if run_id is not None:
        try:
            path = write_run_report(store, run_id, output, fmt, work_dir=Path(root))
        except StoreError as exc:
            fail(str(exc))
    else:
        path = write_store_report(store, Path(root), output or Path(root) / "report", fmt)
    console.print(f"report: {path}")
