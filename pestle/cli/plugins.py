"""``pestle plugins`` and ``pestle samplers``: every implementation and its params."""

from __future__ import annotations

import dataclasses

from rich.markup import escape
from rich.table import Table

from pestle.cli.common import JsonOption, console, print_json


def plugin_rows(registry) -> list[tuple[str, str, str, str, str, str]]:
    """(name, from, parameter, type, default, description) for every implementation: the
    built-ins (from ``pestle``) and other packages' entry points (from their distribution).
    An entry point that cannot be loaded gets one row saying why, and the rest are listed."""
    from pestle.plugins import describe_plugins

    rows = []
    for info in describe_plugins(registry):
        if info.missing_extra:
            info = dataclasses.replace(
                info,
                summary=f"not installed: pip install 'pestle[{info.missing_extra}]'\n"
                + info.summary,
            )
        if info.error is not None or not info.params:
            rows.append((info.name, info.origin, "", "", "", info.error or info.summary))
            continue
        for index, param in enumerate(info.params):
            first = index == 0
            rows.append(
                (
                    info.name if first else "",
                    info.origin if first else "",
                    param.name,
                    param.type,
                    param.default,
                    (info.summary + "\n" if first and info.summary else "") + param.description,
                )
            )
    return rows


def list_plugins(kind: str, registry, as_json: bool = False) -> None:
    if as_json:
        from pestle.plugins import describe_plugins

        for info in describe_plugins(registry):
            print_json({"kind": kind, **dataclasses.asdict(info)})
        return
    table = Table(title=f"{kind} (name: params in the config)", show_lines=True)
    for column in ("name", "from", "parameter", "type", "default", "description"):
        table.add_column(column, overflow="fold")
    for row in plugin_rows(registry):
        table.add_row(*(escape(cell) for cell in row))  # "list[float]" is not rich markup
    console.print(table)


def samplers(as_json: JsonOption = False) -> None:
    """List the samplers (built-in and from installed packages) with their parameters."""
    from pestle.samplers import SAMPLERS

    list_plugins("samplers", SAMPLERS, as_json)


def plugins(as_json: JsonOption = False) -> None:
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
        list_plugins(kind, registry, as_json)
