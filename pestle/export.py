"""Export labelled structures for training and inspection: the store's labels as annotated
Atoms, written by the ``pestle.formats`` writers."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ase import Atoms

from pestle.formats import write_ase_db, write_chgnet_json, write_extxyz, write_mace_xyz
from pestle.store import Store

Exporter = Callable[[Store, str | os.PathLike, Mapping[str, Any] | None], int]


def _annotated(store: Store, label_filter: Mapping[str, Any] | None) -> list:
    """Labelled Atoms (reference results in ``atoms.calc``) with ids and provenance in info."""
    return [stored.atoms for stored in store.labels.labelled(label_filter)]


def _exporter(write: Callable[[str | os.PathLike, Sequence[Atoms]], int]) -> Exporter:
    def export(
        store: Store, path: str | os.PathLike, label_filter: Mapping[str, Any] | None = None
    ) -> int:
        """Write the labels matching ``label_filter`` (all by default) to ``path``; returns
        how many were written."""
        return write(path, _annotated(store, label_filter))

    return export


# --format of `pestle export` -> (store, path, label filter) -> structures written.
EXPORTERS: dict[str, Exporter] = {
    "extxyz": _exporter(write_extxyz),
    "ase-db": _exporter(write_ase_db),
    "chgnet": _exporter(write_chgnet_json),
    "mace": _exporter(write_mace_xyz),
}
