"""Extended XYZ as mace-torch's ``run_train`` reads it with ``--energy_key=REF_energy
--forces_key=REF_forces --stress_key=REF_stress``.

The reference results are plain info/arrays under those keys, never a calculator (which mace
would mistake for predictions), in ASE's units and sign: total energy in eV, forces in eV/A,
stress as ASE's Voigt 6-vector in eV/A^3 (mace reads that order with ``voigt_to_matrix`` and
predicts stress with ASE's sign).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from pestle.formats.extxyz import readable_info

REF_ENERGY = "REF_energy"
REF_FORCES = "REF_forces"
REF_STRESS = "REF_stress"
# Per-structure keys mace reads besides the labels (loss weighting and grouping).
MACE_INFO_KEYS = ("config_type", "config_weight")


def mace_frame(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` with its reference results (``atoms.calc``) under the REF_ keys and
    no calculator. ``config_type``: the frame's own, else its pestle ``sampler`` (``seed``
    when it has none) when the frame carries that provenance. Info values ASE's extxyz
    would garble (empty strings, None) are left out."""
    results = atoms.calc.results
    frame = atoms.copy()  # info and arrays copied, the calculator left behind
    frame.info = readable_info(frame.info)
    frame.info[REF_ENERGY] = float(results["energy"])
    frame.arrays[REF_FORCES] = np.array(results["forces"], dtype=float)
    if results.get("stress") is not None:
        frame.info[REF_STRESS] = np.array(results["stress"], dtype=float)
    if "config_type" not in frame.info and "sampler" in atoms.info:
        frame.info["config_type"] = atoms.info["sampler"] or "seed"
    return frame


def write_mace_xyz(path: str | os.PathLike, images: Sequence[Atoms]) -> int:
    from ase.io import write

    frames = [mace_frame(atoms) for atoms in images]
    write(path, frames, format="extxyz")
    return len(frames)


def read_mace_xyz(
    path: str | os.PathLike, *, limit: int | None = None, seed: int = 0
) -> list[Atoms]:
    """Labelled structures from an extended XYZ file (or anything ASE reads) whose labels
    sit under the REF_ keys or in the calculator results ASE makes of plain
    ``energy``/``forces``/``stress`` keys; e.g. the pretraining data mace replays.

    Returns clean copies of the geometries, with the labels in a ``SinglePointCalculator``
    and ``config_type``/``config_weight`` kept; a structure not periodic in 3D has no volume
    and so keeps no stress. ``limit``: a random subset of that many structures (seeded by
    ``seed``, in file order)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read

    frames = read(path, index=":")
    if not frames:
        raise ValueError(f"{path} holds no structures")
    if limit is not None and len(frames) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(frames), limit, replace=False))
        frames = [frames[i] for i in keep]
    out = []
    for index, atoms in enumerate(frames):
        results = atoms.calc.results if atoms.calc is not None else {}
        energy = atoms.info.get(REF_ENERGY, results.get("energy"))
        forces = atoms.arrays.get(REF_FORCES, results.get("forces"))
        stress = atoms.info.get(REF_STRESS, results.get("stress"))
        if energy is None or forces is None:
            raise ValueError(
                f"{path}: structure {index} has no energy or forces (looked for "
                f"{REF_ENERGY}/{REF_FORCES} and for ASE calculator results)"
            )
        frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell,
                      pbc=atoms.pbc)  # fmt: skip
        for key in MACE_INFO_KEYS:
            if key in atoms.info:
                frame.info[key] = atoms.info[key]
        if stress is not None and np.all(atoms.pbc):
            stress = np.asarray(stress, dtype=float).reshape(-1)
        else:
            stress = None
        frame.calc = SinglePointCalculator(
            frame, energy=float(energy), forces=np.asarray(forces, dtype=float), stress=stress
        )
        out.append(frame)
    return out
