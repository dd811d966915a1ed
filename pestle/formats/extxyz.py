"""Extended XYZ as ASE reads it back: the reference results in the calculator fields
``ase.io.read`` turns into a ``SinglePointCalculator``, ids and provenance in ``info``."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ase import Atoms


def write_extxyz(path: str | os.PathLike, images: Sequence[Atoms]) -> int:
    from ase.io import write

    images = list(images)
    write(path, images, format="extxyz")
    return len(images)
