"""``pestle config``: the campaign config's JSON Schema, its markdown reference
(``docs/config.md``), and validating a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from pestle.cli.common import ConfigOption, JsonOption, console, fail, print_json
from pestle.config import ConfigError

config_app = typer.Typer(
    help="The campaign config: its JSON Schema, its reference, validating a file.",
    no_args_is_help=True,
)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of a campaign file (for editors and other tools)."""
    from pestle.config import config_schema

    sys.stdout.write(json.dumps(config_schema(), indent=2) + "\n")


@config_app.command("docs")
def config_docs(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write here (the repository's docs/config.md)."),
    ] = None,
) -> None:
    """Print (or write) the config reference in markdown, generated from the schema."""
    from pestle.config import config_schema
    from pestle.config_reference import markdown_reference

    text = markdown_reference(config_schema())
    if output is None:
        sys.stdout.write(text)
        return
    if not output.expanduser().absolute().parent.is_dir():
        fail(f"--output: the folder {output.parent} does not exist")
    output.write_text(text)
    console.print(f"wrote {output}", highlight=False)


@config_app.command("validate")
def config_validate(
    config_file: Annotated[
        Path | None, typer.Argument(metavar="FILE", help="Campaign YAML file (or -c).")
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a campaign file, plugin params included: exit 0 and "valid", or exit 3 with the
    file and the fields at fault."""
    from pestle.config import load_config

    path = config_file or config
    if path is None:
        raise typer.BadParameter("give the file: pestle config validate FILE")
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        if as_json:
            print_json({"file": str(path), "valid": False, "error": str(exc)})
            raise typer.Exit(3) from None
        fail(str(exc))
    if as_json:
        print_json({"file": str(path), "valid": True, "campaign": loaded.name})
        return
    console.print(
        f"{path}: valid (campaign {loaded.name}: {len(loaded.seeds)} seeds, "
        f"{len(loaded.samplers)} samplers, work_dir {loaded.work_dir})",
        highlight=False,
    )
