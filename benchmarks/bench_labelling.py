"""Labelling throughput: the same batch of GPAW labels with 1 and with 2 Dask workers, and the
engine's per-task dispatch overhead (store claim, lease heartbeat, label write) against a bare
``client.map`` of the same calculation, all measured in this run.

    python benchmarks/bench_labelling.py [--structures 6] [--ecut 250] [--quick 40]

Starts its own embedded store server in a temporary folder unless PESTLE_MONGODB_URI is set.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

from ase.build import bulk

from pestle.config import DaskSpec
from pestle.dispatch.cluster import make_client
from pestle.dispatch.labelling import label_jobs
from pestle.labellers import LABELLERS, level_of_theory_hash
from pestle.store import EmbeddedServer, Store


def enqueue(store: Store, structures, spec: dict) -> list[str]:
    labeller = LABELLERS.build(spec["name"], spec["params"])
    lot_hash = level_of_theory_hash(labeller)
    jobs = []
    for atoms in structures:
        sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": "bench"})
        job_id = f"label-{sid}-{lot_hash}"
        store.jobs.enqueue(
            job_id, "label", {"structure_id": sid, "labeller": spec, "lot_hash": lot_hash}
        )
        jobs.append(job_id)
    return jobs


def engine_seconds(uri: str, structures, spec: dict, workers: int, work: Path) -> float:
    with Store(uri, f"bench_{uuid.uuid4().hex[:8]}") as store:
        jobs = enqueue(store, structures, spec)
        with make_client(DaskSpec(n_workers=workers)) as client:
            client.submit(len, [1]).result()  # workers up before the clock starts
            start = time.perf_counter()
            states = label_jobs(client, store, jobs, store_uri=uri, work_root=str(work),
                                poll_seconds=0.05)  # fmt: skip
            seconds = time.perf_counter() - start
        assert set(states.values()) == {"done"}, states
        store.client.drop_database(store.database)
    return seconds


def bare_label(spec: dict, atoms, workdir: str):
    return LABELLERS.build(spec["name"], spec["params"]).label(atoms, Path(workdir)).energy


def bare_seconds(structures, spec: dict, workers: int, work: Path) -> float:
    with make_client(DaskSpec(n_workers=workers)) as client:
        client.submit(len, [1]).result()
        start = time.perf_counter()
        futures = client.map(bare_label, [spec] * len(structures), structures,
                             [str(work / f"bare{i}") for i in range(len(structures))], pure=False)  # fmt: skip
        client.gather(futures)
        return time.perf_counter() - start


def rattled(symbol: str, structure: str, a: float, count: int, cubic: bool = True):
    out = []
    for seed in range(count):
        atoms = bulk(symbol, structure, a=a, cubic=cubic)
        atoms.rattle(0.05, seed=seed)
        out.append(atoms)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=6)
    parser.add_argument("--ecut", type=float, default=250.0)
    parser.add_argument("--quick", type=int, default=40, help="EMT tasks for the overhead")
    args = parser.parse_args()
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        uri = os.environ.get("PESTLE_MONGODB_URI")
        server = None
        if not uri:
            server = EmbeddedServer(work / "store")
            uri = server.ensure_running().uri
        try:
            gpaw = {"name": "gpaw", "params": {"ecut": args.ecut, "kpoint_density": 1.5}}
            batch = rattled("Si", "diamond", 5.43, args.structures)
            one = engine_seconds(uri, batch, gpaw, 1, work)
            two = engine_seconds(uri, batch, gpaw, 2, work)
            print(f"GPAW batch of {len(batch)} (8-atom Si, {args.ecut:.0f} eV):")
            print(f"  1 worker : {one:7.2f} s")
            print(f"  2 workers: {two:7.2f} s")
            print(f"  speed-up : {one / two:.2f}x (2 cores)")
            emt = {"name": "emt", "params": {}}
            quick = rattled("Cu", "fcc", 3.61, args.quick)
            engine = engine_seconds(uri, quick, emt, 2, work)
            bare = bare_seconds(quick, emt, 2, work)
            print(f"Dispatch overhead on {len(quick)} instant EMT tasks, 2 workers:")
            print(f"  engine (claim, lease, store): {engine / len(quick) * 1e3:7.1f} ms/task")
            print(f"  bare client.map             : {bare / len(quick) * 1e3:7.1f} ms/task")
            print(f"  overhead ratio              : {engine / bare:.1f}x, "
                  f"+{(engine - bare) / len(quick) * 1e3:.0f} ms/task")  # fmt: skip
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
