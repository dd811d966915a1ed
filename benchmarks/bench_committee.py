"""Committee scoring throughput: pestle's scoring path (each potential predicts energies and
forces only for the whole set in atom-bounded batches, then committee_disagreement) against a
per-structure loop through each library's own ASE calculator (chgnet's CHGNetCalculator,
which computes energy, forces, stress and magnetic moments on every call), measured in the same
run.

    python benchmarks/bench_committee.py [--structures 200] [--max-atoms 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase.build import bulk

from pestle.potentials import POTENTIALS
from pestle.scoring import committee_disagreement

MODELS = ("0.3.0", "0.2.0")


def candidates(count: int):
    out = []
    for i in range(count):
        atoms = (bulk("Si", "diamond", a=5.43, cubic=True) if i % 2
                 else bulk("LiF", "rocksalt", a=4.03, cubic=True))  # fmt: skip
        atoms.rattle(0.05 + 0.1 * (i % 3), seed=i)
        out.append(atoms)
    return out


def batched(structures, max_atoms: int) -> list[dict]:
    committee = [POTENTIALS.build("chgnet", {"model": m, "max_atoms_per_batch": max_atoms})
                 for m in MODELS]  # fmt: skip
    for potential in committee:
        potential.load_model()
    start = time.perf_counter()
    # Scoring needs energies and forces; skipping the strain derivative is most of the gain.
    scores = committee_disagreement(
        structures, [p.predict(structures, stress=False) for p in committee]
    )
    return scores, time.perf_counter() - start


def ase_loop(structures) -> float:
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    calculators = [CHGNetCalculator(CHGNet.load(model_name=m, verbose=False), use_device="cpu")
                   for m in MODELS]  # fmt: skip
    start = time.perf_counter()
    forces = []
    for atoms in structures:
        per_model = []
        for calculator in calculators:
            copy = atoms.copy()
            copy.calc = calculator
            per_model.append(copy.get_forces())
        forces.append(np.stack(per_model))
    return forces, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=200)
    parser.add_argument("--max-atoms", type=int, default=256)
    args = parser.parse_args()
    structures = candidates(args.structures)
    scores, fast = batched(structures, args.max_atoms)
    forces, slow = ase_loop(structures)
    # Same numbers both ways (float32 models: agree to ~1e-4 eV/A).
    spread = [float(np.linalg.norm(f.std(axis=0), axis=1).max()) for f in forces]
    worst = max(abs(a - s["committee_force"]) for a, s in zip(spread, scores, strict=True))
    n = len(structures)
    print(f"{n} candidates, committee CHGNet {' + '.join(MODELS)}, CPU")
    print(f"  per-structure ASE calculators: {slow:7.2f} s ({slow / n * 1e3:.1f} ms/candidate)")
    print(
        f"  batched (<= {args.max_atoms} atoms)      : {fast:7.2f} s ({fast / n * 1e3:.1f} ms/candidate)"
    )
    print(f"  speed-up: {slow / fast:.2f}x; largest committee_force difference {worst:.2e} eV/A")


if __name__ == "__main__":
    main()
