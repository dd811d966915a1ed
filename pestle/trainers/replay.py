"""Replay: keep a fine-tuned foundation model where the new labels say nothing.

A handful of off-equilibrium DFT labels per system pull every weight; what they do not
constrain (the equilibrium region of each seed, the elemental crystals of the campaign's
elements) drifts. Replay mixes into training structures near equilibrium of every seed and of
each element's crystal, labelled by the model itself before fine-tuning (after its element
references are refitted, so replayed and new energies share one zero), with a configurable
weight per structure. The structures are deterministic: the same seeds and settings always
give the same replay set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, reference_states

from pestle.structures import chemical_system

# ASE reference states whose crystal ``ase.build.bulk`` builds; molecular ones (F2, O2, N2,
# H2, the halogens) have no crystal to replay.
_CRYSTALS = {"fcc", "bcc", "hcp", "diamond", "sc"}


def element_crystal(symbol: str) -> Atoms | None:
    """The element's ASE reference crystal (conventional cell where one exists), or None
    for an element whose reference state is molecular or unknown."""
    state = reference_states[atomic_numbers[symbol]]
    if not state or state.get("symmetry") not in _CRYSTALS:
        return None
    symmetry = state["symmetry"]
    if symmetry == "hcp":
        return bulk(symbol, "hcp", orthorhombic=True)
    return bulk(symbol, symmetry, cubic=symmetry != "sc")


def replay_structures(
    seeds: Sequence[Atoms],
    elements: Iterable[str],
    *,
    per_structure: int = 2,
    volume_strain: float = 0.03,
    rattle: float = 0.02,
    rng_seed: int = 0,
) -> list[Atoms]:
    """Near-equilibrium structures of every seed and of each element's crystal (elements
    that are a seed's whole chemical system already have it): ``per_structure`` copies of
    each, isotropically scaled to volumes evenly spaced over ``1 ± volume_strain`` (1 alone
    when ``per_structure`` is 1) and rattled by ``rattle`` Å (normal, per axis), so they
    carry energies, forces and stresses near the minimum. ``info["replay"]`` names the
    origin (seed chemical system or element) and the volume factor."""
    origins: list[tuple[str, Atoms]] = []
    covered = set()
    for seed in seeds:
        origins.append((f"seed {chemical_system(seed)}", seed))
        covered.add(chemical_system(seed))
    for symbol in sorted(set(elements), key=lambda s: atomic_numbers[s]):
        if symbol in covered:
            continue
        crystal = element_crystal(symbol)
        if crystal is not None:
            origins.append((f"element {symbol}", crystal))
    factors = (
        [1.0]
        if per_structure == 1
        else np.linspace(1 - volume_strain, 1 + volume_strain, per_structure)  # fmt: skip
    )
    out = []
    rng = np.random.default_rng(rng_seed)
    for origin, atoms in origins:
        for factor in factors if per_structure > 0 else []:
            copy = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
            copy.set_cell(atoms.cell.array * float(factor) ** (1 / 3), scale_atoms=True)
            if rattle > 0 and len(copy) > 1:
                copy.positions += rng.normal(0.0, rattle, copy.positions.shape)
            copy.info["replay"] = f"{origin} @ V x {float(factor):.3f}"
            out.append(copy)
    return out


def unreplayable_elements(elements: Iterable[str]) -> list[str]:
    """Elements whose reference state has no crystal to replay (reported, not hidden)."""
    return sorted(s for s in set(elements) if element_crystal(s) is None)
