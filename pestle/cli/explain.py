"""``pestle explain``: why a candidate was, or was not, picked in each run."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pestle.cli.common import (
    ConfigOption,
    JsonOption,
    WorkDirOption,
    console,
    fail,
    jsonable,
    open_store,
    print_json,
)


def explain(
    structure_id: Annotated[str, typer.Argument(help="A structure id (or a unique prefix).")],
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Why a candidate was, or was not, picked for labelling in each run it took part in."""
    from pestle.engine.explain import explain_structure
    from pestle.store import StoreError

    store = open_store(config, work_dir)
    try:
        found = explain_structure(store, structure_id)
    except StoreError as exc:
        fail(str(exc))
    if as_json:
        print_json({"structure": found.structure, "runs": found.runs, "label": found.label})
        return
    doc, prov = found.structure, found.structure.provenance
    console.print(
        f"[bold]{doc.id}[/] {doc.formula} ({doc.chemical_system}, {doc.natoms} atoms), "
        f"{doc.kind} from sampler {prov.sampler} {json.dumps(jsonable(prov.params))}"
    )
    if doc.evaluation_for:
        console.print(
            f"[cyan]in the evaluation set[/] of {', '.join(doc.evaluation_for)}: drawn at random "
            "(stratified by sampler and amplitude), judges every model, never picked or trained on"
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
        elif doc.evaluation_for:
            console.print(f"run {run_id}: not a candidate for picking (evaluation set)")
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
