"""Reading the store: ``pestle status``, ``query``, ``export`` and ``report``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pestle.cli.common import (
    ConfigOption,
    WorkDirOption,
    cell,
    console,
    fail,
    get,
    jsonable,
    open_store,
    workspace,
)
from pestle.store.queries import parse_query

COLLECTIONS = ("structures", "labels", "jobs", "models", "runs", "decisions")

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


def status(config: ConfigOption = None, work_dir: WorkDirOption = None) -> None:
    """Counts of stored documents, job states and recent runs."""
    from pestle.engine.status import store_status

    place = workspace(config, work_dir)
    if place.embedded:
        state = place.server.state()
        console.print(
            f"embedded server: {'running on ' + state.uri if state else 'stopped'} "
            f"({place.server.root})"
        )
    found = store_status(open_store(config, work_dir))
    table = Table(title=f"store {found.uri} / {found.database}")
    table.add_column("collection")
    table.add_column("documents", justify="right")
    for name, n in found.counts.items():
        table.add_row(name, str(n))
    console.print(table)
    console.print("jobs: " + (", ".join(f"{k} {v}" for k, v in found.jobs.items()) or "none"))
    for run_doc in found.runs:
        console.print(f"run {run_doc.id}: {run_doc.state} {run_doc.report or ''}")


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
        fail(f"--collection must be one of {', '.join(COLLECTIONS)}")
    store = open_store(config, work_dir)
    named = dict(elements=elements, system=system, formula=formula, sampler=sampler,
                 labelled=labelled, energy_min=energy_min, energy_max=energy_max,
                 force_min=force_min, force_max=force_max)  # fmt: skip
    mongo_filter = filter_or_fail(store, collection, terms, named)
    from pestle.store import StoreError

    fields = None if as_json else DEFAULT_COLUMNS[collection]
    try:
        docs = list(store.query(collection, mongo_filter, fields, limit=max(limit, 0)))
    except StoreError as exc:
        fail(str(exc))
    if as_json:
        for doc in docs:
            sys.stdout.write(json.dumps(jsonable(doc)) + "\n")
        return
    table = Table(title=f"{collection}: {len(docs)} shown")
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
        fail(f"--format {fmt!r} is not supported (supported: {', '.join(EXPORTERS)})")
    store = open_store(config, work_dir)
    named = dict(elements=elements, system=system, formula=formula, sampler=sampler,
                 energy_min=energy_min, energy_max=energy_max, force_min=force_min,
                 force_max=force_max)  # fmt: skip
    label_filter = filter_or_fail(store, "labels", terms, named)
    n = EXPORTERS[fmt](store, output, label_filter)
    console.print(f"wrote {n} labelled structures to {output} ({fmt})")


def report(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Directory (default <work_dir>/report).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="html or md")] = "html",
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Write the store's report: dataset growth, softening across model versions, parity
    plots, job throughput and failures (PNG figures beside an HTML or markdown page)."""
    from pestle.reports.store_report import write_store_report

    if fmt not in ("html", "md"):
        fail(f"--format must be html or md, not {fmt!r}")
    root = workspace(config, work_dir).work_dir
    store = open_store(config, work_dir)
    path = write_store_report(store, Path(root), output or Path(root) / "report", fmt)
    console.print(f"report: {path}")
