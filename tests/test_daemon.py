"""The daemon: the split that keeps trained labels out of every later held-out set, the
store lease that admits one daemon, retraining triggers, withdrawal; and end to end, a real
detached daemon (CHGNet scoring, GPAW labels on Dask, CHGNet fine-tuning) that is SIGKILLed
in the middle of labelling, restarted, and ends with no lost or duplicated label and one
promoted model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pymongo
import pytest
import yaml

from pestle.config import load_config
from pestle.engine.daemon import Daemon
from pestle.stages.split import SplitPolicy, split_by_role
from pestle.store import Store, StoreError
from pestle.store.documents import CampaignState

PESTLE = str(Path(sys.executable).with_name("pestle"))


def tiny_config(tmp_path: Path, database: str, **daemon: object) -> Path:
    config = {
        "name": "tiny",
        "seed": 5,
        "work_dir": str(tmp_path / "work"),
        "seeds": [
            {"name": "LiF", "bulk": "LiF", "crystalstructure": "rocksalt", "a": 4.03},
        ],
        "samplers": [
            # One amplitude: the evaluation set and the picks come from the same distribution.
            {"name": "rattle", "params": {"amplitudes": [0.2], "per_amplitude": 8}},
        ],
        "potential": {"name": "chgnet", "params": {"model": "0.3.0"}},
        "labeller": {"name": "gpaw", "params": {"ecut": 300, "kpoint_density": 1.0}},
        # Stress stays out of the loss: at 300 eV GPAW's LiF stress carries a large Pulay
        # error (measured: ~125 GPa at 350 eV) that would swamp the forces.
        # No validation labels: with two labels a round, the split (one held out of two,
        # two of four) leaves training labels after round 1, so a retraining comes before
        # the last round.
        "finetune": {
            "trainer": {"name": "chgnet", "params": {"epochs": 8, "stress_weight": 0}},
            "validation_fraction": 0,
        },
        # Eight evaluation structures (six drawn in round 0, two in round 1) judge the
        # retraining after round 1: with fewer, no structure-level interval is narrow
        # enough to call an improvement.
        "evaluation": {"holdout_fraction": 0.34, "evaluation_set": {"per_system": 8}},
        # DFT at deliberately low settings, for speed: the convergence gate would stop the
        # system (tests/test_checks_stage.py shows it doing so).
        "convergence": {"enabled": False},
        "store": {"database": database},
        "dask": {"n_workers": 2},
        "daemon": {
            "per_round": 2,
            "max_rounds": 3,
            "retrain": {"every_n_labels": 2},
            "stop": {"softening_band": [0.98, 1.02], "min_structures": 20},
            **daemon,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_trained_label_never_becomes_held_out(tmp_path) -> None:
    config = load_config(tiny_config(tmp_path, "unused"))
    policy = SplitPolicy.from_config(config)
    ids = [f"label-{i:03d}" for i in range(40)]
    trained: set[str] = set()
    roles: dict[str, str] = {}  # recorded as they are decided, as the store keeps them
    for n in range(2, 41):
        roles = policy.assign({"F-Li": ids[:n]}, roles)
        split = split_by_role({"F-Li": ids[:n]}, roles)["F-Li"]
        assert not trained & set(split["holdout"]), n
        assert sorted(split["holdout"] + split["validation"] + split["train"]) == sorted(ids[:n])
        assert split["holdout"], "a system with two labels or more holds one out"
        trained |= set(split["train"]) | set(split["validation"])
    share = sum(role == "holdout" for role in roles.values()) / len(ids)
    assert 0.3 < share < 0.4  # holdout_fraction 0.34 of every system's labels


def test_one_daemon_per_store(store: Store, raw_db) -> None:
    store.meta.acquire_daemon_lease("first", 60, {})
    with pytest.raises(StoreError, match="another pestle daemon holds this store: pid"):
        store.meta.acquire_daemon_lease("second", 60, {})
    assert store.meta.acquire_daemon_lease("first", 60, {})["owner"] == "first"  # renewal
    assert store.meta.renew_daemon_lease("first", 60)
    assert not store.meta.renew_daemon_lease("second", 60)

    # A SIGKILLed daemon on this host: its pid is gone, its lease is taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    raw_db["meta"].update_one({"_id": "daemon-lease"}, {"$set": {"pid": dead.pid}})
    assert store.meta.acquire_daemon_lease("second", 60, {})["owner"] == "second"
    # An expired lease is free whoever held it.
    raw_db["meta"].update_one(
        {"_id": "daemon-lease"},
        {"$set": {"pid": os.getpid(), "expires_at": datetime.now(timezone.utc) - timedelta(1)}},
    )
    assert store.meta.acquire_daemon_lease("third", 60, {})["owner"] == "third"
    store.meta.release_daemon_lease("third")
    assert store.meta.daemon_lease() is None


def test_retraining_triggers(tmp_path) -> None:
    path = tiny_config(tmp_path, "unused", retrain={"every_n_labels": 3, "cron": "0 3 * * *"})
    daemon = Daemon([path])
    config = daemon.configs[path.resolve()]
    now = datetime.now(timezone.utc)

    def state(n_labels: int, at: datetime) -> CampaignState:
        return CampaignState.model_validate(
            {"_id": "daemon:tiny", "retrain": {"n_labels": n_labels, "at": at}}
        )

    assert daemon.retrain_due(config, 2, state(0, now)) is None
    assert "3 new labels" in daemon.retrain_due(config, 5, state(2, now))
    assert daemon.retrain_due(config, 5, state(5, now)) is None
    two_days_ago = now - timedelta(days=2)
    due = daemon.retrain_due(config, 3, state(2, two_days_ago))
    assert due.startswith("cron '0 3 * * *' fell due")


def test_bad_cron_is_named(tmp_path) -> None:
    from pestle.config import ConfigError

    with pytest.raises(ConfigError, match=r"daemon\.retrain\.cron"):
        load_config(tiny_config(tmp_path, "unused", retrain={"cron": "every day"}))


def test_only_a_queued_job_is_withdrawn(store: Store) -> None:
    store.jobs.enqueue("j1", "label", {"structure_id": "s1"})
    store.jobs.enqueue("j2", "label", {"structure_id": "s2"})
    assert store.jobs.claim("j2", "host:1", 60)
    assert store.jobs.withdraw("j1", "not worth it")
    assert not store.jobs.withdraw("j2", "a worker holds it")
    assert store.jobs.state("j1") == "withdrawn"
    assert store.jobs.claim("j1", "host:1", 60) is None  # never claimed again


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_daemon_survives_sigkill_mid_labelling(tmp_path, mongo_uri) -> None:
    database = f"pestle_daemon_{uuid.uuid4().hex[:8]}"
    config = tiny_config(tmp_path, database)
    env = {**os.environ, "PESTLE_MONGODB_URI": mongo_uri}
    store = Store(mongo_uri, database)
    db = pymongo.MongoClient(mongo_uri, tz_aware=True)[database]  # what is stored, as stored
    work = tmp_path / "work"

    def pestle(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([PESTLE, *args], env=env, capture_output=True, text=True, timeout=900)
        if check and done.returncode != 0:
            raise AssertionError(f"pestle {' '.join(args)}:\n{done.stdout}\n{done.stderr}")
        return done

    try:
        started = pestle("daemon", "start", str(config))
        assert "daemon started: pid" in started.stdout
        pid = int((work / "daemon" / "daemon.pid").read_text())
        assert f"running, pid {pid}" in pestle("daemon", "status", "-c", str(config)).stdout

        # A second daemon on the same store is refused while the first holds the lease.
        second = pestle("daemon", "start", "--foreground", str(config), check=False)
        assert second.returncode == 5  # ExitCode.STORE_BUSY
        assert "another pestle daemon holds this store" in second.stderr

        # A round and a retraining, then SIGKILL while a later round's GPAW label runs.
        _wait(lambda: db["decisions"].count_documents({"kind": "retrain", "outcome": {"$in": ["promoted", "kept"]}}), 600, "a retraining")  # fmt: skip
        _wait(
            lambda: db["jobs"].count_documents({"state": "running", "run_id": {"$regex": "-r000[12]$"}}),
            600,
            "a label job of round 1 or 2 in flight",
        )  # fmt: skip
        os.killpg(pid, signal.SIGKILL)  # the daemon with its Dask scheduler and workers
        _wait(lambda: subprocess.run(["pgrep", "-g", str(pid)], capture_output=True).returncode, 30, "the process group to die")  # fmt: skip
        in_flight = [j["_id"] for j in db["jobs"].find({"state": "running"})]
        assert in_flight, "the kill was meant to land in the middle of labelling"
        assert store.meta.daemon_lease() is not None  # left behind by the killed daemon

        status = pestle("daemon", "status", "-c", str(config)).stdout
        assert "not running" in status
        pestle("daemon", "start", "--foreground", "--exit-when-idle", str(config))

        state = db["meta"].find_one({"_id": "daemon:tiny"})
        assert state["round"] == 3
        jobs = list(db["jobs"].find({"kind": "label"}))
        assert {j["state"] for j in jobs} <= {"done", "withdrawn"}, [j["state"] for j in jobs]
        for job_id in in_flight:  # nothing lost: the killed jobs were computed after all
            assert db["jobs"].find_one({"_id": job_id})["state"] in ("done", "withdrawn")
        done = [j for j in jobs if j["state"] == "done"]
        labels = list(db["labels"].find({}, {"structure_id": 1, "lot_hash": 1}))
        assert len(labels) == len(done)  # one label per finished job, none twice
        pairs = [(lab["structure_id"], lab["lot_hash"]) for lab in labels]
        assert len(pairs) == len(set(pairs))
        assert sorted(j["payload"]["structure_id"] for j in done) == sorted(
            lab["structure_id"] for lab in labels
        )
        promoted = list(db["meta"].find({"_id": {"$regex": "^promoted:"}}))
        assert [p["family"] for p in promoted] == ["chgnet"]
        assert db["models"].count_documents({"_id": promoted[0]["model_id"]}) == 1
        decisions = list(db["decisions"].find({"kind": "retrain"}))
        assert all(d.get("reason") for d in decisions)
        assert any(d["outcome"] == "promoted" for d in decisions)
        # Every judged retraining rests on figures with structure-level intervals: the paired
        # improvement, each system's own paired change (non-regression), the EOS check.
        for d in (d for d in decisions if d["outcome"] in ("promoted", "kept")):
            difference = d["difference"]
            assert difference["n_structures"] == 8 and difference["metric"] == "force_mae_ratio"
            assert difference["ratio_low"] <= difference["ratio"] <= difference["ratio_high"]
            assert "regressions" in d and "eos_regressions" in d
            per_system = d["evaluation"]["levels"]["chemical_system"]["F-Li"]["paired"]
            assert {"low", "high"} <= set(per_system["candidate"]["force_mae_ratio"])
            assert "interval" in d["reason"] or "%" in d["reason"]
        # Rounds after the promotion scored with the promoted model.
        rounds = {r["_id"]: r for r in db["runs"].find({"daemon_round": {"$exists": True}})}
        assert len(rounds) == 3
        assert any(r.get("scored_with_model") for r in rounds.values())
        assert store.meta.daemon_lease() is None  # released on a clean exit
        assert not (work / "daemon" / "daemon.pid").exists()

        # Started again with every round done it idles; `daemon stop` (SIGTERM) ends it.
        assert "daemon started" in pestle("daemon", "start", str(config)).stdout
        stopped = pestle("daemon", "stop", "-c", str(config), "--timeout", "120").stdout
        assert "daemon stopped" in stopped
        assert store.meta.daemon_lease() is None
        assert "stop requested" in (work / "daemon" / "daemon.log").read_text()

        # A queued label that the promoted model no longer finds worth DFT is withdrawn.
        daemon = Daemon([config])
        daemon.store, daemon.store_uri = store, mongo_uri
        settings = daemon.configs[config.resolve()]
        settings.daemon.withdraw_below = 1e3  # eV/A: every candidate falls below it
        labelled = db["labels"].distinct("structure_id")
        spare = db["structures"].find_one({"kind": "candidate", "_id": {"$nin": labelled}})
        # Under one of the campaign's rounds: a campaign's jobs are those of its filed runs.
        store.jobs.enqueue("spare", "label", {"structure_id": spare["_id"]}, run_id=max(rounds))
        daemon.withdraw_unworthy(settings, promoted[0]["model_id"])
        spare_job = db["jobs"].find_one({"_id": "spare"})
        assert spare_job["state"] == "withdrawn"
        assert "expected softening error" in spare_job["withdrawn_reason"]

        # The promoted model against its parent on its held-out labels.
        evaluated = pestle("evaluate", promoted[0]["model_id"], "-c", str(config)).stdout
        assert f"| F-Li | {promoted[0]['model_id']} |" in evaluated
        assert "| F-Li | chgnet:0.3.0 |" in evaluated
        assert list((work / "evaluations" / promoted[0]["model_id"]).glob("parity-*.png"))

        # The report draws its figures from what the store holds.
        written = pestle("report", "-c", str(config)).stdout
        report = work / "report"
        assert str(report / "report.html") in written.replace("\n", "")
        for png in (
            "dataset-growth.png",
            "softening-by-model.png",
            "jobs.png",
            "learning-curves.png",
            "softening-vs-labels.png",
            "decisions-force_mae_ratio.png",
        ):
            assert (report / "figures" / png).stat().st_size > 10_000
        assert list(report.glob("figures/*parity-forces-F-Li.png"))
        page = (report / "report.html").read_text()
        assert promoted[0]["model_id"] in page and "F-Li" in page
        # Titled by the campaign; the retraining decisions are shown with their intervals.
        assert "<title>pestle store report — campaign tiny</title>" in page
        assert "force_mae_ratio candidate − incumbent" in page
    finally:
        subprocess.run(["pkill", "-9", "-f", str(config)], check=False)
        store.drop()
        store.close()
        db.client.close()


def test_md_runs_with_the_promoted_model(store: Store, tmp_path) -> None:
    import torch
    from ase.build import bulk

    from pestle.potentials import POTENTIALS
    from pestle.potentials.chgnet import save_checkpoint
    from pestle.samplers import SAMPLERS, Seed

    path = tiny_config(tmp_path, store.database, md_with_promoted_model=True)
    raw = yaml.safe_load(path.read_text())
    md = {"temperatures": [300.0], "equilibration_steps": 2, "snapshot_every": 1,
          "snapshots_per_temperature": 1}  # fmt: skip
    raw["samplers"].append({"name": "md", "params": md})
    path.write_text(yaml.safe_dump(raw))
    daemon = Daemon([path])
    daemon.store = store
    config = daemon.configs[path.resolve()]
    assert daemon.round_samplers(config, None) == config.samplers  # nothing promoted yet

    model = POTENTIALS.build("chgnet", {"device": "cpu"}).load_model()
    with torch.no_grad():
        model.composition_model.fc.weight.add_(0.01)  # a version that differs from the wheel's
    checkpoint = save_checkpoint(model, tmp_path / "tuned.pt", {})
    store.models.put("model-md", checkpoint, {"family": "chgnet", "potential": "chgnet"})
    spec = daemon.round_samplers(config, "model-md")[1]
    assert spec.params["potential"]["params"]["checkpoint"].endswith("tuned.pt")
    assert config.samplers[1].params == md  # the config itself is left as it is

    seed_atoms = bulk("Si", "diamond", a=5.43)
    sampler = SAMPLERS.build("md", spec.params)
    (candidate,) = sampler.sample(Seed(atoms=seed_atoms, id="si", name="Si"), 1)
    used = candidate.params["potential"]
    stored_sha = store.models.get("model-md").checkpoint.sha256
    assert used["checkpoint_sha256"] == stored_sha


def test_a_failing_step_is_recorded_and_the_daemon_goes_on(store: Store, tmp_path) -> None:
    daemon = Daemon([tiny_config(tmp_path, store.database)], idle_poll_seconds=0)
    daemon.store = store
    config = next(iter(daemon.configs.values()))

    def broken_step(config, client):
        raise RuntimeError("the store hiccuped")

    daemon.step = broken_step
    assert daemon.guarded_step(config, client=None) is False
    (decision,) = store.decisions.find("error")
    assert decision.campaign == "tiny" and "the store hiccuped" in decision.reason
    assert not daemon.stopping.is_set()


def test_rounds_wait_for_round_interval_seconds(store: Store, tmp_path) -> None:
    path = tiny_config(tmp_path, store.database, round_interval_seconds=3600)
    daemon = Daemon([path], idle_poll_seconds=0)
    daemon.store = store
    config = next(iter(daemon.configs.values()))
    config.finetune.enabled = False  # only the round matters here
    rounds: list[int] = []
    daemon.run_round = lambda config, client: rounds.append(1)
    now = datetime.now(timezone.utc)
    store.meta.save_campaign_state(
        "tiny", {"round": 1, "systems": ["F-Li"], "last_round": {"ended_at": now}}
    )
    assert daemon.step(config, client=None) is False and rounds == []  # not due yet
    store.meta.save_campaign_state("tiny", {"last_round": {"ended_at": now - timedelta(hours=2)}})
    assert daemon.step(config, client=None) is True and rounds == [1]


def test_a_system_finishes_on_its_interval_not_its_point_estimate(store: Store, tmp_path) -> None:
    """The stop rule on evaluation-set labels: finished only when the softening scale's
    structure-level interval lies inside the band, on enough structures."""
    from ase.build import bulk

    from pestle.labellers import LABELLERS, level_of_theory_hash
    from pestle.stages import Round

    path = tiny_config(tmp_path, store.database, stop={"softening_band": [0.9, 1.1],
                                                      "min_structures": 5})  # fmt: skip
    raw = yaml.safe_load(path.read_text())
    raw.update(potential={"name": "emt"}, labeller={"name": "emt"},
               seeds=[{"bulk": "Cu", "crystalstructure": "fcc", "a": 3.61}])  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    daemon = Daemon([path])
    daemon.store, daemon.store_uri = store, "unused"
    config = next(iter(daemon.configs.values()))
    emt = LABELLERS.build("emt", {})
    lot, lot_hash = emt.level_of_theory(), level_of_theory_hash(emt)

    def evaluation_set(n: int, force_scale: float, offset: int) -> None:
        ids = []
        for i in range(n):
            atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
            atoms.rattle(0.08, seed=offset + i)
            result = emt.label(atoms, tmp_path)
            sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": "t"})
            store.labels.put(sid, labeller="emt", level_of_theory=lot, lot_hash=lot_hash,
                             energy=result.energy, forces=result.forces * force_scale,
                             stress=result.stress, role="evaluation")  # fmt: skip
            ids.append(sid)
        store.structures.add_to_evaluation_set("tiny", ids)

    context = daemon.context(config, round=Round(0, None))
    evaluation_set(4, 1.0, 0)  # the model is exact, but 4 structures are too few
    assert daemon.finished_systems(context, {}) == {}
    evaluation_set(2, 1.0, 10)  # 6: the interval (of an exact model) lies in the band
    (finished,) = daemon.finished_systems(context, {}).values()
    assert finished["softening"]["n_structures"] == 6
    assert 0.9 <= finished["softening"]["low"] <= finished["softening"]["high"] <= 1.1
    assert "inside [0.9, 1.1] on 6 evaluation-set structures" in finished["reason"]
    # Labels 1.3x stronger than the model: softening ~0.77, outside the band.
    store.drop()
    evaluation_set(6, 1.3, 20)
    assert daemon.finished_systems(context, {}) == {}
