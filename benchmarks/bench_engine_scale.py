"""The engine's own cost per candidate from 10³ to 10⁴ candidates (10⁵ with --large): the same
cheap campaign (the ``emt`` potential and labeller, fine-tuning, the convergence gate and the
equation of state off) at each size, 8-atom cells, one chemical system per 100 candidates, 10%
of the candidates labelled (5 picks and 5 evaluation-set structures per system).

    python benchmarks/bench_engine_scale.py [--sizes 1000 10000] [--large] [--profile DIR]

Per stage it prints the time per candidate at each size and the growth ratio
t(10 N) / (10 t(N)) (1.0: flat per candidate). Every ratio is of two figures measured in this
run, so it holds on a loaded machine:

- label dispatch: the engine driving M labelling jobs (claim, lease, label write, finish) on
  a 2-worker cluster against a bare ``client.map`` of the same labelling function on the same
  cluster, interleaved, best of each;
- driver peak RSS at the largest size against the smallest (each size runs in its own driver
  process, with its own local cluster);
- scoring throughput with 2 Dask workers against 1, on CHGNet and small cells (models loaded
  before the clock starts), interleaved, best of three each.

The last line is one JSON object for machines. ``--profile DIR`` writes a cProfile of each
size's driver to DIR/driver-<N>.prof and prints its largest costs. Starts its own embedded
store in a temporary folder unless PESTLE_MONGODB_URI is set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve()
PER_SYSTEM = 100  # candidates per chemical system
PICKS, EVALUATION = 5, 5  # labels per system: 10 % of its candidates
ELEMENTS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al", "H", "C", "N", "O")  # EMT knows these
# What the issue calls each stage (the JSON keys) -> the engine's stages it covers.
GROUPS = {
    "sample": ("sample",),
    "score": ("score",),
    "select": ("evaluation_set", "select"),
    "label": ("label_evaluation_set", "label"),
    "evaluate": ("split", "evaluate", "report"),
}


# -- the campaign ---------------------------------------------------------------------------
def systems(count: int) -> list[tuple[str, ...]]:
    """``count`` distinct chemical systems of EMT elements, the smallest first."""
    out: list[tuple[str, ...]] = []
    for size in range(1, 9):
        for combo in itertools.combinations(ELEMENTS, size):
            out.append(combo)
            if len(out) == count:
                return out
    raise ValueError(f"no {count} distinct systems of at most 8 of {ELEMENTS}")


def seed_atoms(elements: tuple[str, ...]):
    """An 8-atom fcc cell with the elements in turn on its sites."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.9, cubic=True).repeat((2, 1, 1))
    atoms.set_chemical_symbols([elements[i % len(elements)] for i in range(len(atoms))])
    return atoms


def campaign_config(n: int, work: Path, database: str):
    from pestle.config import CampaignConfig

    amplitudes = [0.02, 0.05, 0.08, 0.12]
    return CampaignConfig.model_validate(
        {
            "name": f"scale{n}",
            "seed": 1,
            "work_dir": str(work),
            "seeds": [{"name": "Cu8", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.9,
                       "supercell": [2, 1, 1]}],
            "samplers": [{"name": "rattle", "params": {
                "amplitudes": amplitudes, "per_amplitude": PER_SYSTEM // len(amplitudes)}}],
            "potential": {"name": "emt"},
            "labeller": {"name": "emt"},
            "selection": {"per_system": PICKS},
            "evaluation": {"holdout_fraction": 0.34,
                           "evaluation_set": {"per_system": EVALUATION, "min_structures": 5}},
            "finetune": {"enabled": False},
            "convergence": {"enabled": False},
            "eos": {"enabled": False},
            "store": {"database": database},
            "dask": {"n_workers": 2, "threads_per_worker": 1},
        }
    )  # fmt: skip


def timed_campaign(n: int, uri: str, client, work: Path) -> tuple[dict[str, float], int, dict]:
    """Run the campaign's stages one by one; seconds per stage, labels stored and where
    the candidates were scored."""
    from pestle.stages import RunContext, campaign_stages
    from pestle.store import Store

    database = f"scale_{n}_{uuid.uuid4().hex[:6]}"
    config = campaign_config(n, work / f"run{n}", database)
    # The config's Cu seed is the first system; the others are given as Python objects.
    extra = [seed_atoms(s) for s in systems(n // PER_SYSTEM)[1:]]
    seconds: dict[str, float] = {}
    with Store(uri, database) as store:
        ctx = RunContext(config, store, uri, client=client, seeds=extra)
        ctx.start()
        for stage in campaign_stages():
            start = time.perf_counter()
            ctx.outputs.update(stage.run(ctx))
            seconds[stage.name] = time.perf_counter() - start
        ctx.finish("finished")
        placement = (store.runs.stage(ctx.run_id, "score") or {}).get("placement") or {}
        labels = store.labels.count()
        candidates = store.structures.count({"kind": "candidate"})
        store.drop()
    if candidates != n:
        raise RuntimeError(f"expected {n} candidates, the campaign stored {candidates}")
    return seconds, labels, placement


# -- label dispatch against a bare client.map ----------------------------------------------
def bare_label(spec: dict, atoms, workdir: str) -> float:
    from pestle.labellers import LABELLERS

    return LABELLERS.build(spec["name"], spec["params"]).label(atoms, Path(workdir)).energy


def rattled(count: int, salt: int):
    from ase.build import bulk

    out = []
    for i in range(count):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
        atoms.rattle(0.05, seed=salt * 100_000 + i)
        out.append(atoms)
    return out


def dispatch_ratio(uri: str, client, work: Path, jobs: int, rounds: int = 2) -> dict[str, float]:
    """Engine and bare seconds per labelling task, best of ``rounds`` interleaved."""
    from pestle.dispatch.labelling import label_jobs
    from pestle.labellers import LABELLERS, level_of_theory_hash
    from pestle.store import NewStructure, Store

    spec = {"name": "emt", "params": {}}
    lot_hash = level_of_theory_hash(LABELLERS.build("emt", {}))
    engine, bare = [], []
    for r in range(rounds):
        structures = rattled(jobs, salt=r + 1)
        start = time.perf_counter()
        futures = client.map(bare_label, [spec] * jobs, structures,
                             [str(work / f"bare{r}-{i}") for i in range(jobs)], pure=False)  # fmt: skip
        client.gather(futures)
        bare.append((time.perf_counter() - start) / jobs)
        del futures
        with Store(uri, f"dispatch_{uuid.uuid4().hex[:6]}") as store:
            added = store.structures.add_many(
                [NewStructure(a, "candidate", {"sampler": "bench"}) for a in structures]
            )
            ids = [f"label-{sid}-{lot_hash}" for sid, _ in added]
            store.jobs.enqueue_many(
                [(job_id, {"structure_id": sid, "labeller": spec, "lot_hash": lot_hash})
                 for job_id, (sid, _) in zip(ids, added, strict=True)], "label")  # fmt: skip
            start = time.perf_counter()
            states = label_jobs(client, store, ids, store_uri=uri, work_root=str(work / "jobs"))
            engine.append((time.perf_counter() - start) / jobs)
            assert set(states.values()) == {"done"}, set(states.values())
            store.drop()
    return {"engine_ms": min(engine) * 1e3, "bare_ms": min(bare) * 1e3}


# -- scoring on 1 and 2 workers ------------------------------------------------------------
def scoring_throughput(uri: str, workers: int, structures: int) -> float:
    """Candidates per second scored by CHGNet as Dask tasks on ``workers`` single-threaded
    workers (the models loaded on every worker before the clock starts)."""
    from ase.build import bulk

    from pestle.config import DaskSpec
    from pestle.dispatch.cluster import make_client
    from pestle.dispatch.scoring import score_on_workers, warm_workers
    from pestle.stages.score import CHUNK
    from pestle.store import NewStructure, Store

    main = {"name": "chgnet", "params": {"model": "0.3.0"}}
    cells = []
    for i in range(structures):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True) if i % 2 else bulk(
            "LiF", "rocksalt", a=4.03, cubic=True)  # fmt: skip
        atoms.rattle(0.08, seed=i)
        cells.append(atoms)
    cluster = DaskSpec(n_workers=workers, threads_per_worker=1)
    database = f"scoring_{uuid.uuid4().hex[:6]}"
    with Store(uri, database) as store, make_client(cluster) as client:
        added = store.structures.add_many(
            [NewStructure(a, "candidate", {"sampler": "bench"}) for a in cells]
        )
        ids = sorted(sid for sid, _ in added)
        chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]
        warm_workers(client, uri, database, [main])
        start = time.perf_counter()
        scored = score_on_workers(client, uri, database, chunks, main, [], "bench", False,
                                  per_task=1)  # fmt: skip
        seconds = time.perf_counter() - start
        assert scored == len(ids), (scored, len(ids))
        store.drop()
    return len(ids) / seconds


# -- one driver process per size -----------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    from pestle.config import DaskSpec
    from pestle.dispatch.cluster import make_client

    work = Path(args.work)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    out: dict = {"n": args.child}
    with make_client(DaskSpec(n_workers=2, threads_per_worker=1)) as client:
        client.submit(len, [1]).result()  # workers up before any clock starts
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        out["stages"], out["labels"], out["placement"] = timed_campaign(
            args.child, os.environ["PESTLE_MONGODB_URI"], client, work
        )
        out["wall"] = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
            path = Path(args.profile) / f"driver-{args.child}.prof"
            path.parent.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(str(path))
            out["profile"] = str(path)
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.dispatch:
            out["dispatch"] = dispatch_ratio(
                os.environ["PESTLE_MONGODB_URI"], client, work, args.dispatch
            )
    print("RESULT " + json.dumps(out), flush=True)


def run_child(n: int, uri: str, work: Path, dispatch: int, profile: str | None) -> dict:
    command = [sys.executable, str(HERE), "--child", str(n), "--work", str(work),
               "--dispatch", str(dispatch)] + (["--profile", profile] if profile else [])  # fmt: skip
    # The URI carries the store's password: through the environment, never the command line
    # (which every user of the machine can read in ps).
    env = {**os.environ, "PESTLE_MONGODB_URI": uri}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"size {n} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def print_profile(path: str, limit: int = 25) -> None:
    import pstats

    print(f"\nLargest cumulative costs in the driver ({path}):")
    pstats.Stats(path).sort_stats("cumulative").print_stats(limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--large", action="store_true", help="add 100 000 candidates")
    parser.add_argument("--dispatch-jobs", type=int, default=500)
    parser.add_argument("--scoring-structures", type=int, default=128)
    parser.add_argument("--no-scoring", action="store_true", help="skip the CHGNet comparison")
    parser.add_argument("--profile", help="folder for cProfile output of each driver")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dispatch", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    if args.child:
        child(args)
        return
    sizes = sorted(set(args.sizes + ([100_000] if args.large else [])))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pestle-scale-") as tmp:
        work = Path(tmp)
        uri = os.environ.get("PESTLE_MONGODB_URI")
        server = None
        if not uri:
            from pestle.store import EmbeddedServer, resolve_uri

            server = EmbeddedServer(work / "store")
            server.ensure_running()
            uri = resolve_uri(work / "store")  # the embedded server as pestle uses it
        try:
            results = {}
            for n in sizes:
                dispatch = args.dispatch_jobs if n == max(args.sizes) else 0
                results[n] = run_child(n, uri, work, dispatch, args.profile)
                r = results[n]
                print(f"{n:>7} candidates: {r['wall']:8.1f} s wall, {r['labels']} labels, "
                      f"driver peak RSS {r['rss_mb']:.0f} MB; scored on "
                      f"{r['placement'].get('on')} ({r['placement'].get('reason')})", flush=True)  # fmt: skip
            speed = None
            if not args.no_scoring:
                # Interleaved, best of three each (as the dispatch comparison): one pass swings
                # by +-0.1 in the ratio on this machine.
                ones, twos = [], []
                for _ in range(3):
                    ones.append(scoring_throughput(uri, 1, args.scoring_structures))
                    twos.append(scoring_throughput(uri, 2, args.scoring_structures))
                speed = {"one": max(ones), "two": max(twos)}
        finally:
            if server is not None:
                server.stop()
    report(sizes, args.sizes, results, speed, load_before, os.getloadavg())
    if args.profile:
        for n in sizes:
            print_profile(results[n]["profile"])


def report(sizes, base_sizes, results, speed, load_before, load_after) -> None:
    print(f"\nLoad average (1, 5, 15 min) before: {' '.join(f'{x:.1f}' for x in load_before)}, "
          f"after: {' '.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} cores")  # fmt: skip
    stages = list(results[sizes[0]]["stages"])
    header = "".join(f"{n:>12,}" for n in sizes)
    print(f"\n{'stage':<22}{header}   ms per candidate; growth t(10N)/(10 t(N))")
    pairs = [(a, b) for a, b in itertools.pairwise(sizes) if b == 10 * a]

    def growth(names, a, b):
        ta = sum(results[a]["stages"][s] for s in names)
        tb = sum(results[b]["stages"][s] for s in names)
        return tb / (10 * ta)

    for stage in stages:
        per = "".join(f"{results[n]['stages'][stage] / n * 1e3:12.3f}" for n in sizes)
        ratios = "  ".join(f"{growth([stage], a, b):.2f}" for a, b in pairs)
        print(f"{stage:<22}{per}   {ratios}")
    walls = "".join(f"{results[n]['wall'] / n * 1e3:12.3f}" for n in sizes)
    print(f"{'whole campaign':<22}{walls}   " + "  ".join(
        f"{results[b]['wall'] / (10 * results[a]['wall']):.2f}" for a, b in pairs))  # fmt: skip
    small, large = min(base_sizes), max(base_sizes)
    grouped = {}
    print(f"\nGrowth {small:,} -> {large:,} per issue stage (target <= 1.3):")
    for key, names in GROUPS.items():
        ratio = (
            sum(results[large]["stages"][s] for s in names)
            / sum(results[small]["stages"][s] for s in names)
            / (large / small)
        )
        grouped[key] = round(ratio, 3)
        print(f"  {key:<9} {ratio:5.2f}  ({' + '.join(names)})")
    dispatch = results[large].get("dispatch")
    out: dict = {"growth": grouped}
    if dispatch:
        ratio = dispatch["engine_ms"] / dispatch["bare_ms"]
        out["dispatch_ratio"] = round(ratio, 3)
        print(f"\nLabel dispatch, 2 workers, instant EMT tasks (target <= 1.5):\n"
              f"  engine (claim, lease, store): {dispatch['engine_ms']:7.2f} ms/task\n"
              f"  bare client.map             : {dispatch['bare_ms']:7.2f} ms/task\n"
              f"  ratio                       : {ratio:.2f}")  # fmt: skip
    rss = results[large]["rss_mb"] / results[small]["rss_mb"]
    out["rss_ratio"] = round(rss, 3)
    print(f"\nDriver peak RSS (target <= 1.5): {small:,}: {results[small]['rss_mb']:.0f} MB, "
          f"{large:,}: {results[large]['rss_mb']:.0f} MB, ratio {rss:.2f}")  # fmt: skip
    if speed:
        ratio = speed["two"] / speed["one"]
        out["scoring_speedup_2_workers"] = round(ratio, 3)
        print(f"\nCHGNet scoring on the workers (target >= 1.7):\n"
              f"  1 worker : {speed['one']:6.2f} candidates/s\n"
              f"  2 workers: {speed['two']:6.2f} candidates/s\n"
              f"  speed-up : {ratio:.2f}")  # fmt: skip
    for n in sizes:
        if n >= 100_000:
            print(f"\n{n:,}-candidate campaign: {results[n]['wall']:.0f} s wall")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
