"""Extended XYZ as ASE reads it back: the reference results in the calculator fields
``ase.io.read`` turns into a ``SinglePointCalculator``, ids and provenance in ``info``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ase import Atoms


def unreadable_info(value: Any) -> bool:
    """Info values ASE's extxyz writer puts in a form its reader gets wrong: an empty (or
    blank) string is written ``key=`` and the reader takes the next ``key=value`` as its
    value (a seed's empty parent_id swallowed rng_seed, even energy); None is written as a
    bare ``key`` and read back as True."""
    return value is None or (isinstance(value, str) and not value.strip())


def readable_info(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` without the values :func:`unreadable_info` names (a missing key reads back
    as what an empty value meant)."""
    return {key: value for key, value in info.items() if not unreadable_info(value)}


def extxyz_frame(atoms: Atoms) -> Atoms:
    """``atoms`` itself when ASE writes its info faithfully, else a copy without the values it
    would garble, with the same reference results."""
    if not any(unreadable_info(v) for v in atoms.info.values()):
        return atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()  # the calculator stays behind: results are copied below
    frame.info = readable_info(atoms.info)
    if atoms.calc is not None:
        frame.calc = SinglePointCalculator(frame, **atoms.calc.results)
    return frame


def write_extxyz(path: str | os.PathLike, images: Sequence[Atoms]) -> int:
    from ase.io import write

    frames = [extxyz_frame(atoms) for atoms in images]
    write(path, frames, format="extxyz")
    return len(frames)
