"""Files of labelled structures: what the exporters write for users and the trainers write
(and read) for the libraries they drive.

Every writer takes ASE ``Atoms`` with the reference results in ``atoms.calc`` (a
``SinglePointCalculator``: energy in eV, forces in eV/A, stress as ASE's Voigt 6-vector in
eV/A^3) and ids and provenance in ``atoms.info`` (``structure_id``, ``label_id``,
``parent_id``, ``sampler``, ... as ``pestle.export`` annotates them), writes one file and
returns how many structures it wrote. The input Atoms are left as they are.
"""

from __future__ import annotations

from pestle.formats.ase_db import write_ase_db
from pestle.formats.chgnet_json import write_chgnet_json
from pestle.formats.extxyz import write_extxyz
from pestle.formats.mace_xyz import read_mace_xyz, write_mace_xyz

__all__ = ["read_mace_xyz", "write_ase_db", "write_chgnet_json", "write_extxyz", "write_mace_xyz"]
