"""An ASE database (``ase.db``; SQLite for ``.db``, JSON for ``.json``)."""

from __future__ import annotations

import os
import sqlite3
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms


def split_info(info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(key-value pairs, data) of a row: every entry of ``info`` that ase.db accepts as a
    searchable key-value pair (numbers, bools, strings that do not read as a number), and the
    rest in the row's ``data`` (a string of digits such as a hash, a key ase.db reserves,
    a dict), so that nothing is lost and nothing fails the export. Empty values are left out."""
    from ase.db.core import check

    pairs: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for key, value in info.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, np.generic):
            value = value.item()
        try:
            with warnings.catch_warnings():  # "a key that is also a formula": still valid
                warnings.simplefilter("ignore")
                check({key: value})
        except ValueError:
            data[key] = value
        else:
            pairs[key] = value
    return pairs, data


def write_ase_db(path: str | os.PathLike, images: Sequence[Atoms]) -> int:
    """One row per label with energy, forces and stress, and ``atoms.info`` (ids,
    provenance) as key-value pairs where ase.db can search them, else in the row's data
    (:func:`split_info`). Rows already in the file (same ``label_id``) are not written twice;
    returns the number of rows written. A file this call created is removed when writing
    fails, so a failed export leaves nothing that looks like a result."""
    import ase.db

    rows = [(atoms, *split_info(atoms.info)) for atoms in images]  # refuse before writing
    path = Path(path)
    created = not path.exists()
    written = 0
    try:
        with ase.db.connect(str(path)) as database:
            for atoms, pairs, data in rows:
                if database.count(label_id=atoms.info["label_id"]):
                    continue
                # The results come from atoms.calc; ase.db does not store info itself.
                database.write(atoms, key_value_pairs=pairs, data=data)
                written += 1
    except BaseException as exc:
        if created:
            path.unlink(missing_ok=True)
        if isinstance(exc, sqlite3.DatabaseError):  # a file of another kind in the way
            raise OSError(f"{path} exists and is not an ASE database ({exc})") from None
        raise
    return written
