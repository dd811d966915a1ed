"""Export labelled structures for training and inspection: the store's labels as annotated
Atoms, written by the ``pestle.formats`` writers.

Every label carries, besides its ids and provenance, the energy convention of its labeller
(``energy_convention``: free, extrapolated or total; ``energy_code``; ``energy_smearing`` and
``energy_smearing_width`` in eV where there is smearing), so a file says which energy it holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ase import Atoms

from pestle.formats import write_ase_db, write_chgnet_json, write_extxyz, write_mace_xyz
from pestle.labellers import energy_convention
from pestle.store import Store

Exporter = Callable[[Store, str | os.PathLike, Mapping[str, Any] | None], int]


def _annotated(store: Store, label_filter: Mapping[str, Any] | None) -> list:
    """Labelled Atoms (reference results in ``atoms.calc``) with ids, provenance and the
    energy convention in info."""
    conventions: dict[tuple[str, str], dict[str, Any]] = {}  # one per level of theory
    out = []
    for stored in store.labels.labelled(label_filter):
        label = stored.label
        key = (label.labeller, label.lot_hash)
        if key not in conventions:
            conventions[key] = energy_convention(label.labeller, label.level_of_theory)
        stored.atoms.info.update(conventions[key])
        out.append(stored.atoms)
    return out


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
