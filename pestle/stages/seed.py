"""The seed stage, and seed structures from a campaign config: structure files (CIF, POSCAR, extxyz, anything
``ase.io.read`` knows), ``ase.build.bulk`` crystals, or the Materials Project via mp-api.

Structures fetched from the Materials Project are kept in the store with the query that
found them, so a second run of the same config needs no network and no API key.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms
from ase.build import bulk

from pestle.config import ConfigError, LimitsSpec, SeedSpec
from pestle.extras import MissingExtra, require
from pestle.plugins import PluginSpec
from pestle.samplers import Seed
from pestle.samplers.validity import check_within_limits
from pestle.structures import chemical_system

if TYPE_CHECKING:
    from pestle.stages.context import RunContext

log = logging.getLogger("pestle.seeds")

MP_FIELDS = ["material_id", "structure", "energy_above_hull", "formula_pretty", "symmetry"]
_MATERIAL_ID = re.compile(r"^(mp|mvc)-\d+$")


@dataclass
class SeedStructure:
    name: str
    atoms: Atoms
    source: dict[str, Any]


def mp_query(text: str) -> dict[str, str]:
    """``mp-149`` -> material id; ``Li-F`` -> chemical system; ``LiF`` -> formula."""
    text = text.strip()
    if _MATERIAL_ID.match(text):
        return {"material_ids": text}
    if "-" in text:
        return {"chemsys": "-".join(sorted(text.split("-")))}
    return {"formula": text}


def fetch_from_materials_project(
    query: dict[str, str], limit: int, where: str
) -> tuple[list[SeedStructure], str | None]:
    """Structures matching ``query``, most stable first, and the MP database version."""
    from pymatgen.io.ase import AseAtomsAdaptor

    try:
        require("mp", "a Materials Project seed")
    except MissingExtra as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not os.environ.get("MP_API_KEY"):
        raise ConfigError(
            f"{where}: fetching from the Materials Project needs an API key in MP_API_KEY "
            "(https://next-gen.materialsproject.org/api); a seed fetched once is reused from "
            "the store without one"
        )
    try:
        from mp_api.client import MPRester

        # mp-api reads MP_API_ENDPOINT once, at import; read it per call so that a mirror
        # (or a replay server in tests) set later is honoured.
        endpoint = os.environ.get("MP_API_ENDPOINT") or None
        with MPRester(endpoint=endpoint, mute_progress_bars=True) as rester:
            search = dict(query)
            if "material_ids" in search:
                search["material_ids"] = [search["material_ids"]]
            docs = rester.materials.summary.search(**search, fields=MP_FIELDS)
            db_version = getattr(rester, "db_version", None)
    except Exception as exc:  # mp-api raises requests, MPRestError, ValueError...
        raise ConfigError(
            f"{where}: the Materials Project query {query} failed: {type(exc).__name__}: {exc}"
        ) from None
    if not docs:
        raise ConfigError(f"{where}: the Materials Project has no structure for {query}")
    docs = sorted(
        docs,
        key=lambda d: (
            d.energy_above_hull if d.energy_above_hull is not None else float("inf"),
            str(d.material_id),
        ),
    )[:limit]
    fetched_at = datetime.now(timezone.utc).isoformat()
    seeds = []
    for doc in docs:
        material_id = str(doc.material_id)
        seeds.append(
            SeedStructure(
                name=f"{doc.formula_pretty or doc.structure.composition.reduced_formula}-{material_id}",
                atoms=AseAtomsAdaptor.get_atoms(doc.structure),
                source={
                    "materials_project": {
                        "query": query,
                        "material_id": material_id,
                        "energy_above_hull": doc.energy_above_hull,
                        "database_version": db_version,
                        "fetched_at": fetched_at,
                    }
                },
            )
        )
    return seeds, db_version


def _from_file(spec: SeedSpec, where: str) -> list[SeedStructure]:
    from ase.io import read

    try:
        atoms = read(spec.file)
    except Exception as exc:  # ase raises many types for unreadable files
        reason = str(exc) or type(exc).__name__
        raise ConfigError(f"{where}: cannot read structure file {spec.file}: {reason}") from None
    if isinstance(atoms, list):  # some readers give a list for one image
        atoms = atoms[-1] if atoms else Atoms()
    if not isinstance(atoms, Atoms):
        raise ConfigError(f"{where}: {spec.file} holds no structure")
    return [SeedStructure(spec.name or spec.file.stem, atoms, {"file": str(spec.file)})]


def check_seed(seed: SeedStructure, limits: LimitsSpec, where: str) -> None:
    """A seed pestle can work from, within the config's limits; ConfigError naming it."""
    atoms = seed.atoms
    what = f"{where} ({seed.name})"
    if len(atoms) == 0:
        raise ConfigError(f"{what}: the structure has no atoms")
    if len(atoms) > limits.max_atoms:
        raise ConfigError(
            f"{what}: {len(atoms)} atoms, above limits.max_atoms ({limits.max_atoms}); check "
            "its supercell, or raise the limit"
        )
    if not (np.all(np.isfinite(atoms.positions)) and np.all(np.isfinite(atoms.cell.array))):
        raise ConfigError(f"{what}: positions or cell are not finite numbers")
    lengths = atoms.cell.lengths()
    longest = float(max(lengths[atoms.pbc], default=0.0))
    if longest > limits.max_cell_length:
        raise ConfigError(
            f"{what}: a cell vector of {longest:.4g} Å, above limits.max_cell_length "
            f"({limits.max_cell_length:g} Å)"
        )
    if atoms.pbc.any() and atoms.cell.rank < 3:
        raise ConfigError(f"{what}: periodic, but its cell has no volume")
    reason = check_within_limits(atoms, limits)
    if reason is not None:
        raise ConfigError(f"{what}: {reason}")


def _from_bulk(spec: SeedSpec, where: str) -> list[SeedStructure]:
    try:
        atoms = bulk(spec.bulk, spec.crystalstructure, a=spec.a, cubic=spec.cubic)
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        raise ConfigError(f"{where}: cannot build bulk {spec.bulk!r}: {reason}") from None
    source = {
        "ase.build.bulk": {
            "name": spec.bulk,
            "crystalstructure": spec.crystalstructure,
            "a": spec.a,
            "cubic": spec.cubic,
        }
    }
    return [SeedStructure(spec.name or spec.bulk, atoms, source)]


def _from_materials_project(spec: SeedSpec, where: str, store) -> list[SeedStructure]:
    query = mp_query(spec.mp)
    if store is not None:
        cached = store.structures.materials_project_seeds(query)
        if len(cached) >= spec.mp_limit or (cached and "material_ids" in query):
            log.info(
                "%s: %d Materials Project seeds for %s from the store", where, len(cached), query
            )
            return [
                SeedStructure(
                    doc.name or doc.id, store.structures.atoms_of(doc), doc.provenance.source
                )
                for doc in cached[: spec.mp_limit]
            ]
    seeds, _ = fetch_from_materials_project(query, spec.mp_limit, where)
    if spec.name and len(seeds) == 1:
        seeds[0].name = spec.name
    return seeds


def seed_from_object(obj: Any, name: str | None = None) -> SeedStructure:
    """A seed from a Python object: ``ase.Atoms`` or a pymatgen ``Structure``."""
    if isinstance(obj, Atoms):
        atoms, kind = obj.copy(), "ase.Atoms"
    else:
        from pymatgen.core import Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        if not isinstance(obj, Structure):
            raise TypeError(f"a seed must be ase.Atoms or pymatgen Structure, not {type(obj)}")
        atoms, kind = AseAtomsAdaptor.get_atoms(obj), "pymatgen.Structure"
    atoms = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    return SeedStructure(name or atoms.get_chemical_formula(), atoms, {"python": kind})


def build_seeds(
    spec: SeedSpec, where: str = "seeds", store=None, limits: LimitsSpec | None = None
) -> list[SeedStructure]:
    """The seed structures one config entry stands for (a Materials Project chemical system
    may give several). ``store`` lets fetched structures be reused without network."""
    if spec.file is not None:
        seeds = _from_file(spec, where)
    elif spec.bulk is not None:
        seeds = _from_bulk(spec, where)
    else:
        seeds = _from_materials_project(spec, where, store)
    for seed in seeds:
        if tuple(spec.supercell) != (1, 1, 1):
            n = len(seed.atoms) * int(np.prod(spec.supercell))
            if limits is not None and n > limits.max_atoms:  # refused before it is built
                raise ConfigError(
                    f"{where}.supercell: {list(spec.supercell)} of {seed.name} makes {n} atoms, "
                    f"above limits.max_atoms ({limits.max_atoms})"
                )
            seed.atoms = seed.atoms.repeat(spec.supercell)
            seed.source = {**seed.source, "supercell": list(spec.supercell)}
        seed.atoms.calc = None
    return seeds


def config_seeds(config, store=None, extra: list[SeedStructure] = ()) -> list[SeedStructure]:
    """Every seed of ``config`` (files read, crystals built, Materials Project structures
    fetched or reused from the store), then ``extra``, each checked against the config's
    limits. ConfigError, naming the config file and seed, for the first that fails."""
    prefix = f"{config.source}: " if config.source else ""
    seeds = []
    for index, spec in enumerate(config.seeds):
        where = f"{prefix}seeds.{index}"
        for seed in build_seeds(spec, where, store, config.limits):
            check_seed(seed, config.limits, where)
            seeds.append(seed)
    for index, seed in enumerate(extra):
        check_seed(seed, config.limits, f"seed object {index}")
        seeds.append(seed)
    return seeds


def check_plugins_on(config, structures: list[Atoms]) -> None:
    """The plugins that can only be checked against structures (an EMT labeller asked for
    Si, a solid solution whose host is in no seed): ConfigError naming the field."""
    from pestle.labellers import LABELLERS
    from pestle.potentials import POTENTIALS
    from pestle.samplers import SAMPLERS

    prefix = f"{config.source}: " if config.source else ""
    checks = [("potential", POTENTIALS, config.potential), ("labeller", LABELLERS, config.labeller)]
    checks += [(f"scoring.committee.{i}", POTENTIALS, spec)
               for i, spec in enumerate(config.scoring.committee)]  # fmt: skip
    for i, spec in enumerate(config.samplers):
        checks.append((f"samplers.{i}", SAMPLERS, spec))
        potential = spec.params.get("potential")
        if isinstance(potential, dict) and "name" in potential:  # the potential it drives with
            checks.append((f"samplers.{i}.params.potential", POTENTIALS,
                           PluginSpec.model_validate(potential)))  # fmt: skip
    for where, registry, spec in checks:
        try:
            registry.build_spec(spec).check_structures(structures)
        except ValueError as exc:
            raise ConfigError(f"{prefix}{where} ({spec.name}): {exc}") from None


class SeedStage:
    """Build the config's seeds (and those given as Python objects), store them, and hand
    them on; the same crystal given twice is used once."""

    name = "seed"
    requires: tuple[str, ...] = ()
    provides = ("seeds",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        seeds: list[Seed] = []
        for structure in ctx.seed_structures:  # built (and checked) before the run began
            sid, _ = ctx.store.structures.add(
                structure.atoms,
                kind="seed",
                name=structure.name,
                provenance={"source": structure.source, "campaign": ctx.config.name,
                            "run_id": ctx.run_id},
                run_id=ctx.run_id,
            )  # fmt: skip
            if any(s.id == sid for s in seeds):
                log.warning("seed %s is a duplicate of an earlier seed; used once", structure.name)
                continue
            seeds.append(Seed(structure.atoms, sid, structure.name, structure.source))
        ctx.record("seed", {"seeds": [{"id": s.id, "name": s.name,
                                       "chemical_system": chemical_system(s.atoms)}
                                      for s in seeds]})  # fmt: skip
        if ctx.round is not None and ctx.round.systems is not None:  # the still open ones
            seeds = [s for s in seeds if chemical_system(s.atoms) in ctx.round.systems]
        return {"seeds": seeds}
