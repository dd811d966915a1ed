"""An ASE database (``ase.db``; SQLite for ``.db``, JSON for ``.json``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ase import Atoms


def write_ase_db(path: str | os.PathLike, images: Sequence[Atoms]) -> int:
    """One row per label with energy, forces and stress, and the string entries of
    ``atoms.info`` (ids, provenance) as key-value pairs. Rows already in the file (same
    ``label_id``) are not written twice; returns the number of rows written."""
    import ase.db

    written = 0
    with ase.db.connect(str(path)) as database:
        for atoms in images:
            info = atoms.info
            if database.count(label_id=info["label_id"]):
                continue
            # The results come from atoms.calc; ase.db does not store info, so its strings
            # go in as key-value pairs (searchable with ase db's own selections).
            database.write(atoms, **{k: v for k, v in info.items() if isinstance(v, str)})
            written += 1
    return written
