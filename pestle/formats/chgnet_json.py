"""The JSON that ``chgnet.data.dataset.StructureJsonData`` reads."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ase import Atoms

# The energy-convention keys pestle.export puts in info (pestle.labellers.ENERGY_KEYS; not
# imported from there: the formats depend on nothing else of pestle).
ENERGY_KEYS = ("energy_convention", "energy_code", "energy_smearing", "energy_smearing_width")


def write_chgnet_json(path: str | os.PathLike, images: Sequence[Atoms]) -> int:
    """``{parent: {label_id: {structure, energy_per_atom, force, stress, magmom}}}``, grouped
    by ``parent_id`` (or the structure's own id) so chgnet's split by id keeps a seed's
    perturbations together. Stress is written in VASP's kBar convention (compressive
    positive), which chgnet multiplies by -0.1 into its GPa. The energy convention in
    ``atoms.info`` (``energy_convention``, ``energy_code``, ``energy_smearing``...) goes into
    each entry beside the labels (chgnet reads only the keys it asks for)."""
    from ase import units
    from ase.stress import voigt_6_to_full_3x3_stress
    from pymatgen.io.ase import AseAtomsAdaptor

    data: dict[str, dict[str, dict]] = {}
    for atoms in images:
        results = atoms.calc.results
        stress = results.get("stress")
        group = atoms.info.get("parent_id") or atoms.info["structure_id"]
        bare = atoms.copy()
        bare.info = {}
        data.setdefault(group, {})[atoms.info["label_id"]] = {
            "structure": AseAtomsAdaptor.get_structure(bare).as_dict(),
            "energy_per_atom": float(results["energy"]) / len(atoms),
            "force": results["forces"].tolist(),
            "stress": None
            if stress is None
            else (-10.0 * voigt_6_to_full_3x3_stress(stress) / units.GPa).tolist(),
            "magmom": None,
            **{k: v for k, v in atoms.info.items() if k in ENERGY_KEYS},
        }
    with open(path, "w") as handle:
        json.dump(data, handle)
    return sum(len(v) for v in data.values())
