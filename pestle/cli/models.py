"""Model versions: ``pestle models`` (list), ``models promote``, ``models trust`` and
``pestle evaluate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pestle.cli.common import (
    ConfigOption,
    JsonOption,
    WorkDirOption,
    console,
    fail,
    open_store,
    print_json,
    warn,
    workspace,
)

models_app = typer.Typer(help="Model versions in the store.", invoke_without_command=True)


def trained_on(placement: dict | None) -> str:
    """``cuda (GPU 1, worker 0)``, ``cpu (worker 2)``; empty when not recorded."""
    if not placement:
        return ""
    where = [f"GPU {placement.get('cuda_visible_devices')}"] if placement.get("gpu_worker") else []
    where.append(f"worker {placement.get('worker')}")
    return f"{placement.get('device')} ({', '.join(where)})"


@models_app.callback()
def models(
    ctx: typer.Context,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """List model versions: family, parent, training data, held-out softening, promotion."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"config": config, "work_dir": work_dir}
        return
    from pestle.engine.status import model_versions

    store = open_store(config, work_dir)
    if as_json:
        for version in model_versions(store):
            print_json(version)
        return
    table = Table(title="models")
    from pestle.evaluation.intervals import format_estimate

    for column in ("id", "family", "parent", "train labels", "softening (latest evaluation)",
                   "trained on", "current"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for version in model_versions(store):
        table.add_row(
            version.id,
            version.family,
            version.parent,
            str(version.train_labels),
            ", ".join(
                f"{system} {format_estimate(estimate)}"
                for system, estimate in version.softening.items()
            ),  # fmt: skip
            trained_on(version.placement),
            "yes" if version.current else "",
        )
    console.print(table)


@models_app.command("promote")
def models_promote(
    ctx: typer.Context,
    model_id: Annotated[str, typer.Argument(help="The model version to make current.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the store).")] = "promoted by hand",
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Make a model version the current one of its family."""
    from pestle.store import StoreError

    parent = ctx.obj or {}
    store = open_store(config or parent.get("config"), work_dir or parent.get("work_dir"))
    try:
        outcome = store.models.promote(model_id, reason)
    except StoreError as exc:
        fail(str(exc))
    console.print(
        f"{outcome['family']}: {outcome['model_id']} is current"
        + (f" (was {outcome['previous']})" if outcome["previous"] else "")
    )


@models_app.command("trust")
def models_trust(
    ctx: typer.Context,
    model_id: Annotated[str, typer.Argument(help="The model version to sign.")],
    sha256: Annotated[
        str | None,
        typer.Option(help="Sign only if the checkpoint has this sha256 (from where it came)."),
    ] = None,
    note: Annotated[str, typer.Option(help="Why (kept in the store with the signature).")] = "",
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Sign a model version's checkpoint with this machine's key, so that it loads here even
    if its family unpickles checkpoints (MACE): for a version trained before signatures, or
    signed with another key. Recorded in the model document and logged."""
    from pestle.store import StoreError

    parent = ctx.obj or {}
    store = open_store(config or parent.get("config"), work_dir or parent.get("work_dir"))
    try:
        doc = store.models.require(model_id)
        actual = doc.checkpoint.sha256 if doc.checkpoint is not None else None
        if sha256 is not None and (actual or "") != sha256.strip().lower():
            fail(f"model {model_id}'s checkpoint has sha256 {actual}, not {sha256}: not signed")
        problem = store.models.signature_problem(model_id)
        if problem is None:
            console.print(f"{model_id} is already signed with this machine's key")
            return
        record = store.models.trust(model_id, note=note)
    except StoreError as exc:
        fail(str(exc))
    warn(
        f"{model_id} (sha256 {record['sha256']}) is now trusted: it was refused because "
        f"{problem}; signed by {record['by']} with key {record['key']}"
    )


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
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Directory (default <work_dir>/evaluations/<model>)."),
    ] = None,
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Energy/force/stress errors and the softening scale per chemical system and sampler,
    parity plots, and a comparison against the parent model (a stored model's evaluation is
    recorded with it)."""
    from pestle.cli.store import parse_or_fail
    from pestle.engine.evaluate import evaluate_model, needs_store
    from pestle.store import StoreError

    root = workspace(config, work_dir).work_dir
    out = output or Path(root) / "evaluations" / model.replace(":", "-")
    data_is_file = data is not None and Path(data).is_file()
    store = open_store(config, work_dir) if needs_store(model, data, parent) else None
    source = data if data_is_file or data is None else parse_or_fail([data])
    try:
        result = evaluate_model(store, model, out, data=source, parent=parent)
    except (StoreError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if as_json:
        print_json(result)
        return
    sys.stdout.write(result["table"] + "\n")  # unwrapped: a markdown table to paste
    console.print(f"{result['n_structures']} labelled structures; plots and tables in {out}")
