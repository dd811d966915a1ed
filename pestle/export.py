"""Export labelled structures for training and inspection."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ase.io import write

from pestle.store import Store


def write_extxyz(
    store: Store, path: str | os.PathLike, label_filter: Mapping[str, Any] | None = None
) -> int:
    """Write labels as extended XYZ: energy, forces and stress in the calculator fields that
    ``ase.io.read`` gives back; ids, provenance and level of theory in ``info``."""
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
    write(path, images, format="extxyz")
    return len(images)
