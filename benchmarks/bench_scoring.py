"""Scoring throughput: CHGNet predictions packed into atom-bounded batches, against the
baseline of one structure per forward pass measured in the same run.

    python benchmarks/bench_scoring.py [--structures 16] [--max-atoms 64]

Prints seconds per structure for both and their ratio (baseline / batched; > 1 means
batching helps). Timings stay here, never in tests.
"""

from __future__ import annotations

import argparse
import time

from ase.build import bulk

from pestle.potentials import POTENTIALS


def structures(count: int):
    out = []
    for i in range(count):
        atoms = (
            bulk("Si", "diamond", a=5.43, cubic=True)
            if i % 2
            else bulk("LiF", "rocksalt", a=4.03, cubic=True)
        )
        atoms.rattle(0.1, seed=i)
        out.append(atoms)
    return out


def timed(function, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=16)
    parser.add_argument("--max-atoms", type=int, default=64)
    args = parser.parse_args()
    batch = structures(args.structures)
    potential = POTENTIALS.build(
        "chgnet", {"model": "0.3.0", "max_atoms_per_batch": args.max_atoms}
    )
    single = POTENTIALS.build("chgnet", {"model": "0.3.0", "max_atoms_per_batch": 1})
    potential.predict(batch[:1])  # load weights outside the timing
    single.predict(batch[:1])
    baseline = timed(lambda: single.predict(batch))
    packed = timed(lambda: potential.predict(batch))
    n = len(batch)
    print(f"one structure per pass : {baseline / n * 1e3:8.1f} ms/structure")
    print(f"batches <= {args.max_atoms:4d} atoms  : {packed / n * 1e3:8.1f} ms/structure")
    print(f"speed-up (baseline / batched): {baseline / packed:.2f}x")


if __name__ == "__main__":
    main()
