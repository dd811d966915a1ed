"""Issue 15, defect 6: every bad input is a message, never a traceback, never a half-written
run. A table of bad inputs (configs, structure files, URIs, command-line arguments), each
given to the command line against a store that already holds a campaign: each must exit
with 3 (bad input) or 2 (usage), name the file or field at fault, show no traceback, and
leave every collection's document count as it was. The totals are printed.

Beside the table: SIGTERM records the run as interrupted before ``pestle run`` exits, and a
refused port fails at once instead of after a 10 s timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo
import pytest
import yaml
from typer.testing import CliRunner

from pestle.cli import app
from pestle.store import Store

BASE: dict[str, Any] = {
    "name": "bad",
    "seed": 1,
    "work_dir": "work",
    "seeds": [{"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.61}],
    "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05], "per_amplitude": 3}}],
    "potential": {"name": "emt"},
    "labeller": {"name": "emt"},
    "selection": {"per_system": 1},
    "evaluation": {"evaluation_set": {"per_system": 2}},
    "convergence": {"enabled": False},
    "eos": {"enabled": False},
    "finetune": {"enabled": False},
    "dask": {"n_workers": 1},
}


@dataclass
class Case:
    name: str
    args: tuple[str, ...]  # {c}: the case's config, {d}: its folder
    names: str  # the message must contain this (the file or field at fault)
    config: dict[str, Any] | str | None = None  # overrides of BASE, or the file's raw text
    files: dict[str, str | bytes] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    code: int = 3


def seeds(**seed: Any) -> dict[str, Any]:
    return {"seeds": [seed]}


def seed_file(name: str) -> dict[str, Any]:
    return seeds(file=name)


def rattle(**params: Any) -> dict[str, Any]:
    return {"samplers": [{"name": "rattle", "params": {"amplitudes": [0.05], **params}}]}


def xyz(symbols: str, positions: list, cell: str = "5 0 0 0 5 0 0 0 5", pbc: str = "T T T"):
    lines = [str(len(positions)), f'Lattice="{cell}" Properties=species:S:1:pos:R:3 pbc="{pbc}"']
    lines += [f"{s} {x} {y} {z}" for s, (x, y, z) in zip(symbols.split(), positions, strict=True)]
    return "\n".join(lines) + "\n"


CU = "Cu"
RUN = ("run", "{c}")
CASES = [
    # -- the config file itself ----------------------------------------------------------
    Case("missing config", ("run", "{d}/nope.yaml"), "nope.yaml"),
    Case("config is a folder", ("run", "{d}"), "no such config file"),
    Case("empty config", RUN, "top level must be a mapping", config=""),
    Case("YAML syntax", RUN, "not valid YAML", config="name: [bad\nseeds: {"),
    Case("top-level list", RUN, "top level must be a mapping", config="- a\n- b\n"),
    Case("duplicate key", RUN, "duplicate key 'name'", config="name: a\nname: b\n"),
    Case(
        "duplicate nested key",
        RUN,
        "duplicate key 'amplitudes'",
        config=yaml.safe_dump(BASE).replace("amplitudes:", "amplitudes: [0.1]\n    amplitudes:"),
    ),
    Case("binary config", RUN, "bad.yaml", config=bytes(range(256)).decode("latin-1")),
    Case("unknown section", RUN, "sedes", config={"sedes": []}),
    Case("no seeds", RUN, "seeds", config={"seeds": []}),
    Case("no samplers", RUN, "samplers", config={"samplers": None}),
    Case("name with space", RUN, "name", config={"name": "my campaign"}),
    Case("empty name", RUN, "name", config={"name": ""}),
    Case("seed with two sources", RUN, "exactly one", config=seeds(bulk="Cu", mp="mp-30")),
    Case("seed with no source", RUN, "exactly one", config=seeds(name="x")),
    Case("unknown sampler", RUN, "samplers.0.name", config={"samplers": [{"name": "shake"}]}),
    Case("unknown sampler param", RUN, "samplers.0.params", config=rattle(wobble=1)),
    Case("unknown labeller", RUN, "labeller.name", config={"labeller": {"name": "dft"}}),
    Case("unknown potential", RUN, "potential.name", config={"potential": {"name": "nn"}}),
    Case("per_system 0", RUN, "selection.per_system", config={"selection": {"per_system": 0}}),
    Case(
        "per_system text", RUN, "selection.per_system", config={"selection": {"per_system": "many"}}
    ),
    Case(
        "unknown selector",
        RUN,
        "selection.selector.name",
        config={"selection": {"selector": {"name": "best"}}},
    ),
    Case(
        "unknown selector score",
        RUN,
        "selection.selector.params.score",
        config={"selection": {"selector": {"name": "topk", "params": {"score": "bogus"}}}},
    ),
    Case(
        "committee score without committee",
        RUN,
        "selection.selector.params.score",
        config={
            "selection": {"selector": {"name": "topk", "params": {"score": "committee_force"}}}
        },
    ),
    Case("unknown weight", RUN, "unknown scores", config={"scoring": {"weights": {"x": 1}}}),
    Case("n_workers 0", RUN, "dask.n_workers", config={"dask": {"n_workers": 0}}),
    Case("threads -1", RUN, "dask.threads_per_worker", config={"dask": {"threads_per_worker": -1}}),
    Case(
        "scheduler and jobqueue",
        RUN,
        "not both",
        config={
            "dask": {
                "scheduler_address": "tcp://h:1",
                "jobqueue": {"system": "slurm", "cores": 1, "memory": "1GB"},
            }
        },
    ),
    Case("tls without files", RUN, "tls", config={"dask": {"scheduler_address": "tls://h:1"}}),
    Case(
        "missing CA file",
        RUN,
        "dask.tls_ca_file",
        config={
            "dask": {
                "scheduler_address": "tls://h:1",
                "tls_ca_file": "ca.pem",
                "tls_client_cert": "c.pem",
                "tls_client_key": "k.pem",
            }
        },
    ),
    Case("bad cron", RUN, "cron", config={"daemon": {"retrain": {"cron": "every day"}}}),
    Case(
        "inverted band",
        RUN,
        "softening_band",
        config={"daemon": {"stop": {"softening_band": [2, 3]}}},
    ),
    Case("eos points 100", RUN, "eos.points", config={"eos": {"points": 100}}),
    Case(
        "validation_fraction 1.5",
        RUN,
        "finetune.validation_fraction",
        config={"finetune": {"enabled": False, "validation_fraction": 1.5}},
    ),
    Case(
        "negative holdout",
        RUN,
        "evaluation.holdout_fraction",
        config={"evaluation": {"holdout_fraction": -0.1}},
    ),
    Case("work_dir is a file", RUN, "work_dir", config={"work_dir": "afile"}, files={"afile": "x"}),
    # -- numbers no field may hold, sizes beyond the caps ----------------------------------
    Case(
        "NaN amplitude",
        RUN,
        "samplers.0.params.amplitudes.0",
        config={"samplers": [{"name": "rattle", "params": {"amplitudes": [float("nan")]}}]},
    ),
    Case(
        "infinite lattice constant",
        RUN,
        "seeds.0.a",
        config=seeds(bulk="Cu", crystalstructure="fcc", a=float("inf")),
    ),
    Case(
        "minus infinite a",
        RUN,
        "seeds.0.a",
        config=seeds(bulk="Cu", crystalstructure="fcc", a=float("-inf")),
    ),
    Case(
        "NaN softening prior",
        RUN,
        "scoring.softening_prior",
        config={"scoring": {"softening_prior": float("nan")}},
    ),
    Case(
        "infinite weight",
        RUN,
        "scoring.weights.max_force",
        config={"scoring": {"weights": {"max_force": float("inf")}}},
    ),
    Case(
        "NaN temperature",
        RUN,
        "samplers.0.params.temperatures.0",
        config={
            "samplers": [
                {
                    "name": "md",
                    "params": {"potential": {"name": "emt"}, "temperatures": [float("nan")]},
                }
            ]
        },
    ),
    Case(
        "40x40x40 supercell",
        RUN,
        "limits.max_atoms",
        config=seeds(bulk="Cu", crystalstructure="fcc", a=3.61, supercell=[40, 40, 40]),
    ),
    Case("zero supercell", RUN, "seeds.0.supercell", config=seeds(bulk="Cu", supercell=[0, 1, 1])),
    Case(
        "negative supercell",
        RUN,
        "seeds.0.supercell",
        config=seeds(bulk="Cu", supercell=[-1, 1, 1]),
    ),
    Case("two-axis supercell", RUN, "seeds.0.supercell", config=seeds(bulk="Cu", supercell=[2, 2])),
    Case(
        "10^6 A cell",
        RUN,
        "limits.max_cell_length",
        config=seeds(bulk="Cu", crystalstructure="fcc", a=1e6),
    ),
    Case(
        "a billion candidates",
        RUN,
        "samplers.0.params.per_amplitude",
        config=rattle(per_amplitude=10**9),
    ),
    Case(
        "absurd per_system",
        RUN,
        "selection.per_system",
        config={"selection": {"per_system": 10**12}},
    ),
    Case("absurd max_rounds", RUN, "daemon.max_rounds", config={"daemon": {"max_rounds": 10**10}}),
    Case("zero atom cap", RUN, "limits.max_atoms", config={"limits": {"max_atoms": 0}}),
    Case(
        "below the atom cap set lower",
        RUN,
        "limits.max_atoms",
        config=seeds(bulk="Cu", crystalstructure="fcc", a=3.61, supercell=[3, 3, 3])
        | {"limits": {"max_atoms": 50}},
    ),
    # -- structure files -----------------------------------------------------------------
    Case("missing seed file", RUN, "seeds.0.file", config=seed_file("gone.cif")),
    Case(
        "seed file is a folder",
        RUN,
        "seeds.0.file",
        config=seed_file("adir"),
        files={"adir/x": "x"},
    ),
    Case(
        "binary CIF",
        RUN,
        "bin.cif",
        config=seed_file("bin.cif"),
        files={"bin.cif": bytes(range(256)) * 4},
    ),
    Case(
        "empty extxyz",
        RUN,
        "empty.extxyz",
        config=seed_file("empty.extxyz"),
        files={"empty.extxyz": ""},
    ),
    Case(
        "zero atoms",
        RUN,
        "no atoms",
        config=seed_file("zero.extxyz"),
        files={"zero.extxyz": xyz("", [])},
    ),
    Case(
        "overlapping atoms",
        RUN,
        "apart",
        config=seed_file("overlap.extxyz"),
        files={"overlap.extxyz": xyz("Cu Cu", [(0, 0, 0), (0.1, 0, 0)])},
    ),
    Case(
        "atoms on one site",
        RUN,
        "apart",
        config=seed_file("same.extxyz"),
        files={"same.extxyz": xyz("Cu Cu Cu", [(0, 0, 0), (1.8, 1.8, 0), (0, 0, 0)])},
    ),
    Case(
        "10^6 A cell in a file",
        RUN,
        "limits.max_cell_length",
        config=seed_file("big.extxyz"),
        files={"big.extxyz": xyz("Cu", [(0, 0, 0)], "1e6 0 0 0 1e6 0 0 0 1e6")},
    ),
    Case(
        "NaN position",
        RUN,
        "not finite",
        config=seed_file("nan.extxyz"),
        files={"nan.extxyz": xyz("Cu Cu", [(0, 0, 0), ("nan", 1, 1)])},
    ),
    Case(
        "flat periodic cell",
        RUN,
        "seeds.0",
        config=seed_file("flat.extxyz"),
        files={"flat.extxyz": xyz("Cu", [(0, 0, 0)], "5 0 0 0 5 0 0 0 0")},
    ),
    Case(
        "garbage POSCAR",
        RUN,
        "POSCAR",
        config=seed_file("POSCAR"),
        files={"POSCAR": "this is\nnot a\nPOSCAR\n"},
    ),
    Case(
        "unknown format",
        RUN,
        "thing.foo",
        config=seed_file("thing.foo"),
        files={"thing.foo": "hello"},
    ),
    Case(
        "unknown element",
        RUN,
        "xx.extxyz",
        config=seed_file("xx.extxyz"),
        files={"xx.extxyz": xyz("Xx", [(0, 0, 0)])},
    ),
    Case(
        "too many atoms in a file",
        RUN,
        "limits.max_atoms",
        config=seed_file("many.extxyz"),
        files={
            "many.extxyz": xyz(
                " ".join(["Cu"] * 2100),
                [(2.6 * (i % 13), 2.6 * (i // 13 % 13), 2.6 * (i // 169)) for i in range(2100)],
                "40 0 0 0 40 0 0 0 40",
            )
        },
    ),
    Case(
        "truncated CIF",
        RUN,
        "cut.cif",
        config=seed_file("cut.cif"),
        files={"cut.cif": "data_x\n_cell_length_a 3.6\n_cell_length_b\n"},
    ),
    # -- what only the structures tell -----------------------------------------------------
    Case("unknown bulk element", RUN, "seeds.0", config=seeds(bulk="Xx")),
    Case(
        "unknown crystal structure",
        RUN,
        "seeds.0",
        config=seeds(bulk="Cu", crystalstructure="nonsense", a=3.6),
    ),
    Case(
        "Materials Project without a key",
        RUN,
        "MP_API_KEY",
        config=seeds(mp="Li-F"),
        env={"MP_API_KEY": ""},
    ),
    Case(
        "EMT asked for Si",
        RUN,
        "potential (emt): EMT has no parameters for Si",
        config=seeds(bulk="Si", crystalstructure="diamond", a=5.43),
    ),
    Case(
        "EMT labeller for Si",
        RUN,
        "labeller (emt)",
        config=seeds(bulk="Si", crystalstructure="diamond", a=5.43)
        | {"potential": {"name": "chgnet"}},
    ),
    Case(
        "solid solution host missing",
        RUN,
        "samplers.0",
        config={
            "samplers": [{"name": "solid_solution", "params": {"host": "Ni", "substituent": "Pd"}}]
        },
    ),
    Case(
        "migration species missing",
        RUN,
        "samplers.0",
        config={"samplers": [{"name": "migration", "params": {"species": "Li"}}]},
    ),
    Case(
        "md with EMT on Si",
        RUN,
        "samplers.0.params.potential",
        config=seeds(bulk="Si", crystalstructure="diamond", a=5.43)
        | {
            "potential": {"name": "chgnet"},
            "labeller": {"name": "gpaw"},
            "samplers": [{"name": "md", "params": {"potential": {"name": "emt"}}}],
        },
    ),
    Case(
        "dry run with a bad seed file",
        ("run", "--dry-run", "{c}"),
        "bin.cif",
        config=seed_file("bin.cif"),
        files={"bin.cif": bytes(range(256)) * 4},
    ),
    # -- where the store is --------------------------------------------------------------
    Case("http URI", RUN, "store.uri", config={"store": {"uri": "http://localhost"}}),
    Case(
        "unescaped password",
        RUN,
        "store.uri",
        config={"store": {"uri": "mongodb://u:p@ss@localhost"}},
    ),
    Case("port out of range", RUN, "store.uri", config={"store": {"uri": "mongodb://h:99999"}}),
    Case("port not a number", RUN, "store.uri", config={"store": {"uri": "mongodb://h:abc"}}),
    Case(
        "unknown URI option", RUN, "store.uri", config={"store": {"uri": "mongodb://h/?tls=maybe"}}
    ),
    Case("missing uri_file", RUN, "store.uri_file", config={"store": {"uri_file": "none.txt"}}),
    Case(
        "garbage uri_file",
        RUN,
        "store.uri_file",
        config={"store": {"uri_file": "u.txt"}},
        files={"u.txt": "hello"},
    ),
    Case("database with a slash", RUN, "store.database", config={"store": {"database": "a/b"}}),
    Case("empty database", RUN, "store.database", config={"store": {"database": ""}}),
    Case(
        "database with a dot",
        ("status", "-c", "{c}"),
        "store.database",
        config={"store": {"database": "a.b"}},
    ),
    Case("env URI not a URI", RUN, "PESTLE_MONGODB_URI", env={"PESTLE_MONGODB_URI": "localhost"}),
    Case(
        "env URI bad port",
        ("status", "-c", "{c}"),
        "PESTLE_MONGODB_URI",
        env={"PESTLE_MONGODB_URI": "mongodb://h:99999"},
    ),
    # -- command-line arguments ----------------------------------------------------------
    Case("--workers 0", ("run", "--workers", "0", "{c}"), "--workers", code=2),
    Case("--workers -3", ("run", "--workers", "-3", "{c}"), "--workers", code=2),
    Case("--workers text", ("run", "--workers", "many", "{c}"), "--workers", code=2),
    Case("run without config", ("run",), "config", code=2),
    Case("two configs", ("run", "{c}", "-c", "{d}/other.yaml"), "two configs", code=2),
    Case("--json without --dry-run", ("run", "--json", "{c}"), "--json", code=2),
    Case("unknown command", ("frobnicate",), "frobnicate", code=2),
    Case("unknown option", ("status", "--colour"), "--colour", code=2),
    Case("bad JSON query", ("query", "{nope", "-c", "{c}"), "{nope"),
    Case("unknown collection", ("query", "--collection", "nope", "-c", "{c}"), "nope", code=2),
    Case(
        "export to a missing folder", ("export", "-o", "{d}/no/x.extxyz", "-c", "{c}"), "--output"
    ),
    Case("export onto a folder", ("export", "-o", "{d}", "-c", "{c}"), "--output"),
    Case(
        "export format",
        ("export", "-o", "{d}/x.dat", "-f", "nope", "-c", "{c}"),
        "--format",
        code=2,
    ),
    Case("unknown job", ("jobs", "-c", "{c}", "show", "label-nope"), "label-nope"),
    Case("unknown job state", ("jobs", "--state", "nope", "-c", "{c}"), "nope", code=2),
    Case("promote unknown model", ("models", "-c", "{c}", "promote", "model-nope"), "model-nope"),
    Case("trust unknown model", ("models", "-c", "{c}", "trust", "model-nope"), "model-nope"),
    Case("evaluate unknown model", ("evaluate", "model-nope", "-c", "{c}"), "model-nope"),
    Case(
        "evaluate with missing data",
        ("evaluate", "emt", "-d", "{d}/gone.extxyz", "-c", "{c}"),
        "gone.extxyz",
    ),
    Case(
        "evaluate binary data",
        ("evaluate", "emt", "-d", "{d}/bin.extxyz", "-c", "{c}"),
        "bin.extxyz",
        files={"bin.extxyz": bytes(range(256)) * 4},
    ),
    Case("report unknown run", ("report", "--run", "nope", "-c", "{c}"), "nope"),
    Case(
        "work dir that is a file", ("db", "start", "-w", "{d}/afile"), "afile", files={"afile": "x"}
    ),
    Case(
        "work dir without a store",
        ("status", "-w", "{d}/nowhere"),
        "nowhere",
        env={"PESTLE_MONGODB_URI": ""},
    ),
    Case("daemon without config", ("daemon", "start"), "config", code=2),
    Case(
        "validate a duplicate key",
        ("config", "validate", "{c}"),
        "duplicate key 'seed'",
        config="seed: 1\nseed: 2\n",
    ),
]


@pytest.fixture
def populated(tmp_path: Path, store: Store, mongo_uri: str, monkeypatch: pytest.MonkeyPatch):
    """A store holding a finished run (structures, labels, jobs, a run), a failed job and a
    model version; the command line finds it through PESTLE_MONGODB_URI."""
    monkeypatch.setenv("PESTLE_MONGODB_URI", mongo_uri)
    monkeypatch.setenv("COLUMNS", "250")
    config = tmp_path / "good" / "good.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({**BASE, "store": {"database": store.database}}))
    done = CliRunner().invoke(app, ["run", str(config)])
    assert done.exit_code == 0, done.output
    checkpoint = tmp_path / "emt.ckpt"
    checkpoint.write_text("nothing")
    store.models.put("model-emt", checkpoint, {"family": "emt", "potential": "emt"})
    return store


def counts(client: pymongo.MongoClient, database: str) -> dict[str, int]:
    db = client[database]
    found = {name: db[name].count_documents({}) for name in db.list_collection_names()}
    found["(databases)"] = len(client.list_database_names())
    return found


def materialise(case: Case, folder: Path, database: str) -> list[str]:
    folder.mkdir(parents=True)
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    config = folder / "bad.yaml"
    if isinstance(case.config, str):
        config.write_text(case.config, errors="surrogateescape")
    else:
        merged = {**BASE, **(case.config or {})}
        store = {"database": database, **(case.config or {}).get("store", {})}
        config.write_text(yaml.safe_dump({**merged, "store": store}))
    (folder / "other.yaml").write_text(config.read_text())
    return [a.replace("{c}", str(config)).replace("{d}", str(folder)) for a in case.args]


def test_bad_inputs_are_messages_and_change_nothing(
    populated: Store, tmp_path: Path, mongo_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(CASES) >= 80
    client = pymongo.MongoClient(mongo_uri)
    database = populated.database
    totals = {"tried": 0, "clean message": 0, "traceback": 0, "accepted": 0, "store changed": 0}
    problems = []
    for index, case in enumerate(CASES):
        args = materialise(case, tmp_path / f"case{index:03d}", database)
        before = counts(client, database)
        with monkeypatch.context() as env:
            for key, value in case.env.items():
                env.setenv(key, value)
            result = CliRunner().invoke(app, args)
        after = counts(client, database)
        output = result.output
        traceback = (result.exception is not None and not isinstance(result.exception, SystemExit)
                     ) or "Traceback" in output  # fmt: skip
        totals["tried"] += 1
        outcome = []
        if traceback:
            totals["traceback"] += 1
            outcome.append(f"traceback {type(result.exception).__name__}: {result.exception}")
        elif result.exit_code == 0:
            totals["accepted"] += 1
            outcome.append("accepted")
        elif result.exit_code == case.code and case.names in output:
            totals["clean message"] += 1
        else:
            outcome.append(f"exit {result.exit_code} (want {case.code}), message: {output!r}")
        if after != before:
            totals["store changed"] += 1
            changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
            outcome.append(f"store changed: {changed}")
        if outcome:
            problems.append(f"{case.name}: " + "; ".join(outcome))
    client.close()
    print("\nbad inputs: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    assert not problems, "\n".join(problems)
    assert totals["clean message"] == totals["tried"]


# -- beside the table ---------------------------------------------------------------------
def start_run(config: Path, mongo_uri: str, database_name: str) -> tuple[subprocess.Popen, Store]:
    """``pestle run CONFIG`` as a user starts it (its output captured), and the store."""
    env = {**os.environ, "PESTLE_MONGODB_URI": mongo_uri}
    pestle = str(Path(sys.executable).with_name("pestle"))
    run = subprocess.Popen([pestle, "run", str(config)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return run, Store(mongo_uri, database_name)


def test_sigterm_records_the_run_as_interrupted(
    tmp_path: Path, mongo_uri: str, database_name: str
) -> None:
    """SIGTERM while labelling: the run says "interrupted" before ``pestle run`` exits (143),
    no worker is left behind, and the same command resumes and finishes it."""
    import psutil

    config = tmp_path / "c.yaml"
    slow = {**BASE, "selection": {"per_system": 40},
            "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05, 0.1],
                                                        "per_amplitude": 40}}],
            "seeds": [{"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.61,
                       "supercell": [3, 3, 3]}],
            "dask": {"n_workers": 2}, "store": {"database": database_name}}  # fmt: skip
    config.write_text(yaml.safe_dump(slow))
    run, store = start_run(config, mongo_uri, database_name)
    pestle = str(Path(sys.executable).with_name("pestle"))
    env = {**os.environ, "PESTLE_MONGODB_URI": mongo_uri}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.poll() is None:
            if store.labels.count({}) >= 3:  # labelling has begun
                break
            time.sleep(0.2)
        children = psutil.Process(run.pid).children(recursive=True)
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=120)
        assert run.returncode == 143, output
        assert "interrupted by SIGTERM" in output and "Traceback" not in output
        assert [r.state for r in store.runs.recent()] == ["interrupted"]
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        again = subprocess.run([pestle, "run", str(config)], env=env, capture_output=True,
                               text=True, timeout=900)  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        assert [r.state for r in store.runs.recent()] == ["finished"]
    finally:
        if run.poll() is None:
            run.kill()
        store.drop()
        store.close()


def test_a_sigterm_that_lands_in_a_finalizer_still_stops_the_run() -> None:
    """A SIGTERM handled while a ``__del__`` runs (a Dask future collected at that instant)
    used to raise inside it, where Python prints "Exception ignored" and drops it, and the
    run went on to finish (exit 0). It is raised a moment later, outside."""
    from pestle.cli.run import Terminated, _terminated

    class CollectedDuringTheSignal:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside __del__

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with pytest.raises(Terminated):
            CollectedDuringTheSignal()  # no reference kept: collected at once
            time.sleep(2.0)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_sigterm_during_the_convergence_gate_does_not_wait_for_it(
    tmp_path: Path, mongo_uri: str, database_name: str
) -> None:
    """The gate's calculations (one thread per chemical system, each waiting on the Dask
    workers) must not hold ``pestle run`` after SIGTERM: it exits at once, interrupted, with
    no worker left computing. (It used to wait for every gate calculation to finish.)"""
    import psutil

    config = tmp_path / "c.yaml"
    # Two systems (two gate threads), each a GPAW calculation of minutes on one core.
    gated = {**BASE, "seeds": [{"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc",
                                "a": 3.61, "cubic": True},
                               {"name": "Al", "bulk": "Al", "crystalstructure": "fcc",
                                "a": 4.04, "cubic": True}],
             "labeller": {"name": "gpaw", "params": {"ecut": 700, "kpoint_density": 4.0}},
             "convergence": {"enabled": True},
             "dask": {"n_workers": 2}, "store": {"database": database_name}}  # fmt: skip
    config.write_text(yaml.safe_dump(gated))
    run, store = start_run(config, mongo_uri, database_name)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None:
            if store.jobs.counts().get("running", 0) >= 2:  # both gates computing
                break
            time.sleep(0.2)
        assert run.poll() is None, run.communicate()[0]
        time.sleep(2)
        children = psutil.Process(run.pid).children(recursive=True)
        signalled = time.monotonic()
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=90)
        assert time.monotonic() - signalled < 60, output
        assert run.returncode == 143, output
        assert "interrupted by SIGTERM" in output and "Traceback" not in output
        assert [r.state for r in store.runs.recent()] == ["interrupted"]
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        assert store.labels.count({}) == 0  # nothing finished: the calculations were cut
    finally:
        if run.poll() is None:
            run.kill()
        store.drop()
        store.close()


def test_a_refused_port_fails_at_once(tmp_path: Path) -> None:
    from pestle.store.server import free_port

    config = tmp_path / "c.yaml"
    port = free_port()  # nothing listens there
    config.write_text(yaml.safe_dump({**BASE, "store": {
        "uri": f"mongodb://u:secret@127.0.0.1:{port}/?directConnection=true"}}))  # fmt: skip
    started = time.monotonic()
    result = CliRunner().invoke(app, ["run", str(config)])
    elapsed = time.monotonic() - started
    assert result.exit_code == 4, result.output
    assert "refused" in result.output and "secret" not in result.output
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_the_table_names_every_kind_of_input() -> None:
    kinds = json.dumps([c.args[0] for c in CASES])
    for command in ("run", "query", "export", "jobs", "models", "evaluate", "report", "db"):
        assert f'"{command}"' in kinds
