"""Seed structures from a campaign config: structure files or ``ase.build.bulk`` crystals."""

from __future__ import annotations

from ase import Atoms
from ase.build import bulk

from pestle.config import ConfigError, SeedSpec


def build_seed(spec: SeedSpec) -> tuple[str, Atoms, dict]:
    """(name, atoms, source provenance) for one seed entry."""
    if spec.file is not None:
        from ase.io import read

        try:
            atoms = read(spec.file)
        except Exception as exc:  # ase raises many types for unreadable files
            raise ConfigError(f"seeds: cannot read structure file {spec.file}: {exc}") from None
        source = {"file": str(spec.file)}
        name = spec.name or spec.file.stem
    else:
        try:
            atoms = bulk(spec.bulk, spec.crystalstructure, a=spec.a, cubic=spec.cubic)
        except Exception as exc:
            raise ConfigError(f"seeds: cannot build bulk {spec.bulk!r}: {exc}") from None
        source = {
            "ase.build.bulk": {
                "name": spec.bulk,
                "crystalstructure": spec.crystalstructure,
                "a": spec.a,
                "cubic": spec.cubic,
            }
        }
        name = spec.name or spec.bulk
    if tuple(spec.supercell) != (1, 1, 1):
        atoms = atoms.repeat(spec.supercell)
        source["supercell"] = list(spec.supercell)
    atoms.calc = None
    return name, atoms, source
