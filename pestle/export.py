"""Export labelled structures for training and inspection: the store's labels as annotated
Atoms, written by the ``pestle.formats`` writers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ase import Atoms

from pestle.formats import write_ase_db, write_chgnet_json, write_extxyz, write_mace_xyz
from pestle.store import Store

Exporter = Callable[[Store, str | os.PathLike, Mapping[str, Any] | None], int]


def _annotated(store: Store, label_filter: Mapping[str, Any] | None) -> list:
    """Labelled Atoms (reference results in ``atoms.calc``) with ids and provenance in info."""
    images = []
    for atoms, structure, label in store.labelled_atoms(label_filter):
        provenance = structure.get("provenance", {})
        atoms.info.update(
            {
                "structure_id": structure["_id"],
                "label_id": label["_id"],
                "chemical_system": label["chemical_system"],
                "sampler": provenance.get("sampler") or structure.get("kind"),
                "parent_id": provenance.get("parent_id") or "",
                "rng_seed": str(provenance.get("rng_seed", "")),
                "sampler_params": json.dumps(provenance.get("params", {}), sort_keys=True),
                "labeller": label["labeller"],
                "lot_hash": label["lot_hash"],
                "level_of_theory": json.dumps(
                    label["level_of_theory"], sort_keys=True, default=str
                ),
            }
        )
        images.append(atoms)
    return images


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
