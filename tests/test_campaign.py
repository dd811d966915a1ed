"""A miniature campaign end to end on real components: CHGNet scoring, GPAW labels on a Dask
LocalCluster, a MongoDB-compatible server over TCP, a one-epoch CHGNet fine-tune, evaluation.
Then idempotence (a second run adds nothing) and a run killed mid-labelling that resumes to
exactly the records of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pymongo
import pytest
import yaml
from ase.io import read

from pestle.store import Store

pytestmark = pytest.mark.slow

PESTLE = str(Path(sys.executable).with_name("pestle"))


def mini_config(tmp_path: Path, database: str) -> Path:
    config = {
        "name": "mini",
        "seed": 3,
        "work_dir": str(tmp_path / "work"),
        # The same crystal twice under two names: stored once.
        "seeds": [
            {
                "name": "Si-prim",
                "bulk": "Si",
                "crystalstructure": "diamond",
                "a": 5.43,
                "cubic": False,
            },
            {
                "name": "Si-again",
                "bulk": "Si",
                "crystalstructure": "diamond",
                "a": 5.43,
                "cubic": False,
            },
        ],
        "samplers": [
            {"name": "rattle", "params": {"amplitudes": [0.08, 0.15], "per_amplitude": 2}},
            {"name": "strain", "params": {"max_strain": 0.05, "count": 2}},
        ],
        "potential": {"name": "chgnet", "params": {"model": "0.3.0"}},
        "selection": {"per_system": 3},
        "evaluation": {"holdout_fraction": 0.34, "evaluation_set": {"per_system": 2}},
        "labeller": {"name": "gpaw", "params": {"ecut": 200, "kpoint_density": 1.0}},
        "finetune": {"trainer": {"name": "chgnet", "params": {"epochs": 1}}},
        # DFT at deliberately low settings, for speed: the convergence gate would stop the
        # system (tests/test_checks_stage.py shows it doing so).
        "convergence": {"enabled": False},
        "store": {"database": database},
        "dask": {"n_workers": 2},
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pestle(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([PESTLE, *args], env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"pestle {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def snapshot(db) -> dict[str, set]:
    return {
        name: {d["_id"] for d in db[name].find({}, {"_id": 1})}
        for name in ("structures", "labels", "models", "jobs")
    }


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, mongo_uri):
    tmp_path = tmp_path_factory.mktemp("campaign")
    database = f"pestle_e2e_{uuid.uuid4().hex[:8]}"
    # Wide enough that rich does not wrap the summary table's cells.
    env = {**os.environ, "PESTLE_MONGODB_URI": mongo_uri, "COLUMNS": "250"}
    config = mini_config(tmp_path, database)
    first = pestle("run", str(config), env=env)
    store = Store(mongo_uri, database)
    db = pymongo.MongoClient(mongo_uri, tz_aware=True)[database]  # what is stored, as stored
    yield {"config": config, "env": env, "store": store, "db": db, "output": first.stdout,
           "tmp": tmp_path}  # fmt: skip
    store.drop()
    store.close()
    db.client.close()


def test_run_stores_everything_with_provenance(campaign) -> None:
    store: Store = campaign["store"]
    db = campaign["db"]
    run = db["runs"].find_one()
    assert run["state"] == "finished"
    report = Path(run["report"])
    assert report.is_file() and campaign["output"].strip().endswith(str(report))
    # An HTML page in the run folder, showing the evaluate stage's plots from beside it.
    assert report.name == "report.html"
    assert (report.parent / "evaluation_set" / "parity-forces-Si.png").is_file()
    assert "src='evaluation_set/parity-forces-Si.png'" in report.read_text()
    for which in ("evaluation_set", "holdout"):
        for kind in ("parity-forces", "parity-energy", "parity-stress", "force-error"):
            assert (report.parent / which / f"{kind}-Si.png").stat().st_size > 10_000

    seeds = list(db["structures"].find({"kind": "seed"}))
    assert len(seeds) == 1  # the duplicate seed is stored once
    candidates = list(db["structures"].find({"kind": "candidate"}))
    assert len(candidates) == 6
    for doc in candidates:
        prov = doc["provenance"]
        assert prov["sampler"] in {"rattle", "strain"}
        assert prov["parent_id"] == seeds[0]["_id"]
        assert isinstance(prov["rng_seed"], int) and prov["params"]
        assert prov["code_versions"]["chgnet"] and prov["run_id"] == run["_id"]

    everything = list(db["labels"].find())
    # 7 equation-of-state volumes of the seed, labelled once, role "check" (never trained on)
    checks = [label for label in everything if label.get("role") == "check"]
    assert len(checks) == 7
    kinds = [db["structures"].find_one({"_id": c["structure_id"]})["kind"] for c in checks]
    assert sorted(kinds) == ["eos"] * 6 + ["seed"]  # the scan's middle volume is the seed
    labels = [label for label in everything if label.get("role") != "check"]
    assert len(labels) == 5  # 3 selected, 2 drawn at random for the evaluation set
    for label in everything:
        lot = label["level_of_theory"]
        assert lot["code"] == "gpaw" and lot["xc"] == "PBE" and lot["ecut"] == 200
        assert lot["version"] and lot["setups"]
        assert np.isfinite(label["energy"]) and np.asarray(label["forces"]).shape == (2, 3)
        assert len(label["stress"]) == 6
    assert store.jobs.counts() == {"done": 12}

    [model] = list(db["models"].find())
    holdout = set(model["training"]["holdout_label_ids"])
    train = set(model["training"]["label_ids"])
    evaluation = {label["_id"] for label in labels if label.get("role") == "evaluation"}
    assert len(evaluation) == 2 and not evaluation & (train | holdout)
    assert train and holdout and not train & holdout
    assert train | holdout | evaluation == {label["_id"] for label in labels}
    assert len(model["checkpoint"]["sha256"]) == 64

    evaluate = run["stages"]["evaluate"]
    # Judged on the evaluation set (2 random structures here) and, beside it, the held-out
    # picks; every figure has a structure-level interval, or says the data are too few.
    assert sorted(evaluate["evaluation_set"]["label_ids"]) == sorted(evaluation)
    assert sorted(evaluate["holdout"]["label_ids"]) == sorted(holdout)
    for which in ("evaluation_set", "holdout"):
        per_model = evaluate[which]["evaluation"]["levels"]["chemical_system"]["Si"]["models"]
        for name in ("pretrained", "fine-tuned"):
            fit = per_model[name]["softening"]
            assert 0.2 < fit["value"] < 2.0
            assert fit["n_structures"] < 5 and fit["enough"] is False  # min_structures 5
            if fit["n_structures"] >= 2:
                assert fit["low"] <= fit["value"] <= fit["high"]
    assert "not enough structures (n = 2)" in campaign["output"]
    text = report.read_text()
    assert "softening scale" in text and "fine-tuned" in text and "pretrained" in text


def test_second_run_adds_nothing(campaign) -> None:
    db = campaign["db"]
    before = snapshot(db)
    pestle("run", str(campaign["config"]), env=campaign["env"])
    assert snapshot(db) == before
    assert db["labels"].count_documents({}) == 12


def test_query_and_export(campaign) -> None:
    env, config = campaign["env"], str(campaign["config"])
    out = pestle(
        "query", "-c", config, "--json", "kind=candidate", "provenance.sampler=strain", env=env
    ).stdout
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 2 and all(d["provenance"]["sampler"] == "strain" for d in docs)
    table = pestle("query", "-c", config, "--collection", "labels", env=env).stdout
    assert "gpaw" in table
    target = campaign["tmp"] / "labels.extxyz"
    pestle("export", "-c", config, "--format", "extxyz", "--output", str(target), env=env)
    images = read(target, index=":")
    assert len(images) == 12  # every label, the equation-of-state scan's too
    stored = {d["_id"]: d for d in campaign["db"]["labels"].find()}
    for atoms in images:
        label = stored[atoms.info["label_id"]]
        assert atoms.get_potential_energy() == pytest.approx(label["energy"])
        np.testing.assert_allclose(atoms.get_forces(), label["forces"], atol=1e-6)
        assert atoms.info["sampler"] in {"rattle", "strain", "eos", "seed"}
        assert json.loads(atoms.info["level_of_theory"])["code"] == "gpaw"
    bad = pestle("query", "-c", config, "{nope", env=env, check=False)
    assert bad.returncode == 3 and "not valid JSON" in bad.stderr


def test_killed_run_resumes_to_the_same_records(campaign, mongo_uri, tmp_path) -> None:
    database = f"pestle_kill_{uuid.uuid4().hex[:8]}"
    config = mini_config(tmp_path, database)
    env = campaign["env"]
    store = Store(mongo_uri, database)
    db = pymongo.MongoClient(mongo_uri, tz_aware=True)[database]
    try:
        process = subprocess.Popen(
            [PESTLE, "run", str(config)],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            if db["labels"].count_documents({}) >= 1:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run finished before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)  # the whole run: driver, scheduler, workers
        process.wait()
        assert db["runs"].find_one()["state"] == "running"
        assert db["labels"].count_documents({}) < 12

        pestle("run", str(config), env=env)
        assert db["runs"].find_one()["state"] == "finished"
        assert snapshot(db) == snapshot(campaign["db"])
        assert store.jobs.counts() == {"done": 12}
        assert db["labels"].count_documents({}) == 12
    finally:
        store.drop()
        store.close()
        db.client.close()


def test_models_listed_and_promoted(campaign) -> None:
    env, config, store = campaign["env"], str(campaign["config"]), campaign["store"]
    db = campaign["db"]
    [model] = list(db["models"].find({}, {"_id": 1}))
    listed = pestle("models", "-c", config, env={**env, "COLUMNS": "250"}).stdout
    assert model["_id"] in listed and "Si not enough structures (n = 2)" in listed
    promoted = pestle("models", "promote", model["_id"], "--reason", "test", "-c", config, env=env)
    assert "is current" in promoted.stdout
    assert store.models.promoted("chgnet") == model["_id"]
    assert db["models"].find_one({"_id": model["_id"]})["promotions"][-1]["reason"] == "test"
    bad = pestle("models", "promote", "model-nope", "-c", config, env=env, check=False)
    assert bad.returncode == 3 and "no model model-nope" in bad.stderr
