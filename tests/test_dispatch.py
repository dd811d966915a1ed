"""Labelling and training dispatch on a real Dask LocalCluster against a real store server:
leases, orphaned jobs, races, non-retryable failures, and GPU-resource routing on CPU."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from pestle.config import DaskSpec
from pestle.dispatch.cluster import make_client
from pestle.dispatch.labelling import label_jobs, run_label_job
from pestle.dispatch.training import workers_with_gpu
from pestle.labellers import LABELLERS, level_of_theory_hash
from pestle.store import Store, label_id
from pestle.store.errors import utcnow

EMT_SPEC = {"name": "emt", "params": {}}


def enqueue(store: Store, atoms, *, max_attempts: int = 3) -> tuple[str, str]:
    sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": "test"})
    lot_hash = level_of_theory_hash(LABELLERS.build("emt", {}))
    job_id = f"label-{sid}-{lot_hash}"
    store.jobs.enqueue(
        job_id,
        "label",
        {"structure_id": sid, "labeller": EMT_SPEC, "lot_hash": lot_hash},
        max_attempts=max_attempts,
    )
    return sid, job_id


def rattled_cu(seed: int):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def client():
    with make_client(DaskSpec(n_workers=2, threads_per_worker=1)) as client:
        yield client


def test_local_workers_advertise_cpu_not_gpu(client) -> None:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    assert len(workers) == 2
    assert all(w["resources"] == {"CPU": 1} for w in workers.values())
    assert workers_with_gpu(client) == []


def test_jobs_run_on_workers_and_labels_match_the_calculator(
    client, store: Store, mongo_uri: str, tmp_path, raw_db
) -> None:
    structures = [rattled_cu(seed) for seed in range(4)]
    jobs = [enqueue(store, atoms) for atoms in structures]
    seen = []
    states = label_jobs(
        client,
        store,
        [j for _, j in jobs],
        store_uri=mongo_uri,
        work_root=str(tmp_path),
        progress=lambda done, total, job_id, state: seen.append((done, total)),
        timeout_seconds=300,
    )
    assert set(states.values()) == {"done"} and seen[-1] == (4, 4)
    lot_hash = jobs[0][1].rsplit("-", 1)[1]
    workers = set()
    for atoms, (sid, job_id) in zip(structures, jobs, strict=True):
        label = raw_db["labels"].find_one({"_id": label_id(sid, lot_hash)})
        reference = atoms.copy()
        reference.calc = EMT()
        assert label["energy"] == pytest.approx(reference.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(label["forces"], reference.get_forces(), atol=1e-10)
        assert label["level_of_theory"]["code"] == "ase-emt" and label["job_id"] == job_id
        job = raw_db["jobs"].find_one({"_id": job_id})
        assert job["state"] == "done" and job["attempts"] == 1
        workers.add(job["worker"])
    # The work ran in the worker processes, not in the driver.
    assert all(not w.endswith(f":{__import__('os').getpid()}") for w in workers)


def test_unlabellable_structure_fails_once_without_retry(
    client, store, mongo_uri, tmp_path, raw_db
):
    _, job_id = enqueue(store, bulk("Si", "diamond", a=5.43))  # EMT has no Si
    states = label_jobs(
        client, store, [job_id], store_uri=mongo_uri, work_root=str(tmp_path), timeout_seconds=120
    )
    assert states == {job_id: "failed"}
    job = raw_db["jobs"].find_one({"_id": job_id})
    assert job["attempts"] == 1 and "LabelError" in job["error"] and "Si" in job["error"]
    assert raw_db["labels"].count_documents({}) == 0


def test_orphaned_lease_of_a_dead_process_is_taken_over(client, store, mongo_uri, tmp_path, raw_db):
    _, job_id = enqueue(store, rattled_cu(7))
    # A worker on this host that died mid-calculation, its lease still an hour long.
    dead = f"{socket.gethostname()}:{2**22 + 12345}"
    assert store.jobs.claim(job_id, dead, lease_seconds=3600)
    states = label_jobs(
        client, store, [job_id], store_uri=mongo_uri, work_root=str(tmp_path), timeout_seconds=120
    )
    assert states == {job_id: "done"}
    job = raw_db["jobs"].find_one({"_id": job_id})
    assert job["attempts"] == 2 and job["worker"] != dead


def test_live_lease_elsewhere_is_waited_for_then_taken(client, store, mongo_uri, tmp_path, raw_db):
    _, job_id = enqueue(store, rattled_cu(8))
    assert store.jobs.claim(job_id, "another-host:1", lease_seconds=2)
    with pytest.raises(TimeoutError):
        label_jobs(
            client,
            store,
            [job_id],
            store_uri=mongo_uri,
            work_root=str(tmp_path),
            timeout_seconds=0.8,
        )
    assert raw_db["jobs"].find_one({"_id": job_id})["worker"] == "another-host:1"
    states = label_jobs(
        client, store, [job_id], store_uri=mongo_uri, work_root=str(tmp_path), timeout_seconds=60
    )
    assert states == {job_id: "done"}


def test_racing_tasks_compute_one_label(store, mongo_uri, tmp_path, raw_db) -> None:
    _, job_id = enqueue(store, rattled_cu(9))
    results = []

    def attempt() -> None:
        results.append(run_label_job(mongo_uri, store.database, job_id, str(tmp_path)))

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r["claimed"] for r in results) == 1
    assert raw_db["labels"].count_documents({}) == 1
    assert raw_db["jobs"].find_one({"_id": job_id})["attempts"] == 1


def test_label_stored_before_a_crash_is_not_recomputed(store, mongo_uri, tmp_path, raw_db) -> None:
    sid, job_id = enqueue(store, rattled_cu(10))
    run_label_job(mongo_uri, store.database, job_id, str(tmp_path))
    before = raw_db["labels"].find_one()
    # As if the worker died after storing the label but before closing the job.
    raw_db["jobs"].update_one(
        {"_id": job_id},
        {
            "$set": {
                "state": "running",
                "worker": "gone:1",
                "lease_expires": utcnow() - timedelta(seconds=1),
            }
        },
    )
    result = run_label_job(mongo_uri, store.database, job_id, str(tmp_path))
    assert result["state"] == "done"
    assert raw_db["labels"].find_one() == before and raw_db["labels"].count_documents({}) == 1


def test_retryable_error_backs_off_then_fails(store, mongo_uri, tmp_path, raw_db) -> None:
    _, job_id = enqueue(store, rattled_cu(11), max_attempts=2)
    raw_db["structures"].delete_many({})  # the structure vanished: an error worth retrying
    first = run_label_job(mongo_uri, store.database, job_id, str(tmp_path))
    assert first["state"] == "queued"
    job = raw_db["jobs"].find_one({"_id": job_id})
    assert job["not_before"] > job["history"][-1]["at"]  # backoff before the next attempt
    raw_db["jobs"].update_one({"_id": job_id}, {"$set": {"not_before": utcnow()}})
    second = run_label_job(mongo_uri, store.database, job_id, str(tmp_path))
    assert second["state"] == "failed"


def test_training_asks_for_a_gpu_worker_when_one_exists() -> None:
    """A cluster whose worker advertises GPU=1 (as `dask worker --resources GPU=1` does):
    pestle routes fine-tuning there; on this CPU-only machine the task falls back to CPU."""
    from distributed import Client, LocalCluster

    from pestle.dispatch.training import pick_training_placement

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, resources={"GPU": 1}, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as gpu_client,
    ):
        assert len(workers_with_gpu(gpu_client)) == 1
        resources, device = pick_training_placement(gpu_client)
        assert resources == {"GPU": 1} and device == "cuda"
        from pestle.devices import pick_device

        assert gpu_client.submit(pick_device, device, resources=resources).result() == "cpu"


def test_slurm_and_pbs_job_scripts_from_the_config() -> None:
    from pestle.config import JobqueueSpec
    from pestle.dispatch.cluster import jobqueue_cluster

    slurm = JobqueueSpec(
        system="slurm", cores=8, memory="16GB", walltime="02:00:00", queue="compute",
        account="proj42", gpus_per_job=1, job_script_prologue=["module load gpaw"],
    )  # fmt: skip
    cluster = jobqueue_cluster(slurm)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p compute", "#SBATCH -A proj42", "#SBATCH -t 02:00:00",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --gres=gpu:1", "module load gpaw",
                 "export OMP_NUM_THREADS=1"):  # fmt: skip
        assert line in script, line
    assert "--resources CPU=8,GPU=1" in script
    assert script.index("module load gpaw") < script.index("dask_worker")

    pbs = JobqueueSpec(system="pbs", cores=4, memory="8GB", queue="workq", processes=2)
    cluster = jobqueue_cluster(pbs)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#PBS -q workq" in script and "ncpus=4" in script and "--nworkers 2" in script
    assert "--resources CPU=2" in script and "GPU" not in script
    with pytest.raises(ValueError, match="gpus_per_job needs processes: 1"):
        JobqueueSpec(system="slurm", cores=8, memory="8GB", processes=2, gpus_per_job=2)


def test_tls_scheduler_needs_certificates() -> None:
    with pytest.raises(ValueError, match="tls_ca_file, tls_client_cert and tls_client_key"):
        DaskSpec(scheduler_address="tls://10.0.0.1:8786")
    with pytest.raises(ValueError, match="not both"):
        DaskSpec(
            scheduler_address="tcp://10.0.0.1:8786",
            jobqueue={"system": "slurm", "cores": 1, "memory": "1GB"},
        )


def test_tls_scheduler_from_config_files(tmp_path) -> None:
    """A tls:// scheduler reached with the CA, certificate and key files a config names."""
    from distributed import LocalCluster
    from distributed.security import Security

    security = Security.temporary()  # a throwaway CA and certificate, PEM in memory
    files = {}
    for field in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        files[field] = tmp_path / f"{field}.pem"
        files[field].write_text(getattr(security, field))
    with LocalCluster(
        n_workers=1, threads_per_worker=1, protocol="tls", security=security,
        host="127.0.0.1", dashboard_address=":0",
    ) as cluster:  # fmt: skip
        assert cluster.scheduler_address.startswith("tls://")
        spec = DaskSpec(scheduler_address=cluster.scheduler_address, **files)
        with make_client(spec) as tls_client:
            assert tls_client.submit(sum, [1, 2, 3]).result() == 6


def enqueue_gpaw(store: Store, atoms, params: dict) -> str:
    sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": "test"})
    lot_hash = level_of_theory_hash(LABELLERS.build("gpaw", params))
    job_id = f"label-{sid}-{lot_hash}"
    store.jobs.enqueue(
        job_id,
        "label",
        {"structure_id": sid, "labeller": {"name": "gpaw", "params": params}, "lot_hash": lot_hash},
    )
    return job_id


def test_worker_killed_mid_calculation_job_finishes_elsewhere(
    client, store, mongo_uri, tmp_path, raw_db
):
    import os
    import signal

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=4)
    job_id = enqueue_gpaw(store, atoms, {"ecut": 250, "kpoint_density": 1.5})
    outcome: dict = {}
    driver = threading.Thread(
        target=lambda: outcome.update(
            label_jobs(client, store, [job_id], store_uri=mongo_uri, work_root=str(tmp_path),
                       timeout_seconds=300)
        )
    )  # fmt: skip
    driver.start()
    victim = None
    for _ in range(600):  # wait until a worker holds the job, then kill that process
        job = raw_db["jobs"].find_one({"_id": job_id})
        if job["state"] == "running":
            victim = int(job["worker"].rsplit(":", 1)[1])
            os.kill(victim, signal.SIGKILL)
            break
        threading.Event().wait(0.05)
    driver.join(timeout=300)
    assert victim is not None and outcome == {job_id: "done"}
    job = raw_db["jobs"].find_one({"_id": job_id})
    assert job["attempts"] == 2 and not job["worker"].endswith(f":{victim}")
    assert raw_db["labels"].count_documents({}) == 1


def test_unconverged_scf_is_a_failed_job_not_a_label(client, store, mongo_uri, tmp_path, raw_db):
    job_id = enqueue_gpaw(store, bulk("Si", "diamond", a=5.43), {"ecut": 200, "kpoint_density": 1.0,
                                                                  "maxiter": 2})  # fmt: skip
    states = label_jobs(
        client, store, [job_id], store_uri=mongo_uri, work_root=str(tmp_path), timeout_seconds=120
    )
    assert states == {job_id: "failed"}
    job = raw_db["jobs"].find_one({"_id": job_id})
    assert "did not converge" in job["error"] and job["attempts"] == 1 and job["traceback"]
    assert raw_db["labels"].count_documents({}) == 0


def test_job_over_its_time_limit_restarts_the_worker_and_is_retried(
    client, store, mongo_uri, tmp_path, raw_db
):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=6)
    params = {"ecut": 250, "kpoint_density": 1.5}
    job_id = enqueue_gpaw(store, atoms, params)
    raw_db["jobs"].update_one({"_id": job_id}, {"$set": {"max_attempts": 2}})
    before = set(client.run(os.getpid).values())
    states = label_jobs(
        client, store, [job_id], store_uri=mongo_uri, work_root=str(tmp_path),
        job_timeout_seconds=0.5, timeout_seconds=240,
    )  # fmt: skip
    assert states == {job_id: "failed"}
    job = raw_db["jobs"].find_one({"_id": job_id})
    assert job["attempts"] == 2 and job["error"].startswith("timeout: still running after 0.5 s")
    assert [h["event"] for h in job["history"]] == ["failed", "failed"]
    assert raw_db["labels"].count_documents({}) == 0
    # The workers came back and still work: fresh processes in place of the timed-out ones.
    client.wait_for_workers(2, timeout=60)
    assert client.submit(sum, [1, 1]).result() == 2
    assert set(client.run(os.getpid).values()) != before


def test_labelling_tasks_declare_their_cores(client) -> None:
    from distributed import Client, LocalCluster

    from pestle.dispatch.labelling import cpu_resources

    assert cpu_resources(client, 1) == {"CPU": 1}
    with pytest.raises(ValueError, match="needs 2 cores but no Dask worker offers more than 1"):
        cpu_resources(client, 2)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as plain,
        Client(plain) as plain_client,
    ):
        assert cpu_resources(plain_client, 2) is None  # a cluster that declares nothing


def test_unphysical_structure_is_rejected_before_dispatch(
    store, mongo_uri, tmp_path, raw_db
) -> None:
    from pestle.config import CampaignConfig
    from pestle.stages import LabelStage, RunContext

    config = CampaignConfig.model_validate(
        {"name": "guard", "work_dir": str(tmp_path), "samplers": [{"name": "rattle"}],
         "seeds": [{"bulk": "Cu", "crystalstructure": "fcc", "a": 3.61}],
         "labeller": {"name": "emt"}}
    )  # fmt: skip
    squashed = bulk("Cu", "fcc", a=3.61, cubic=True)
    squashed.positions[1] = squashed.positions[0] + [0.4, 0, 0]
    sid, _ = store.structures.add(squashed, kind="candidate", provenance={"sampler": "import"})
    context = RunContext(
        config, store, mongo_uri, outputs={"selected": [sid], "evaluation_set": {}}
    )
    context.start()
    LabelStage().run(context)
    outcome = store.runs.require(context.run_id).stages["label"]
    assert outcome["dispatched"] == 0 and "apart" in outcome["rejected_before_dispatch"][sid]
    assert raw_db["jobs"].count_documents({}) == 0 and raw_db["labels"].count_documents({}) == 0


# --- GPUs of the local cluster, on a machine without one: the detection is forced -------------


def test_dask_gpus_setting(monkeypatch) -> None:
    from pestle.dispatch.gpus import GPUWorkers, local_gpus

    monkeypatch.setattr("pestle.devices.detect_gpus", lambda: ["0", "1"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert local_gpus("auto") == ["0", "1"]
    assert local_gpus(0) == []
    monkeypatch.setattr("pestle.devices.detect_gpus", lambda: pytest.fail("N: no detection"))
    assert local_gpus(1) == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # a batch job's allocation
    assert local_gpus(2) == ["3", "5"]
    pinned = GPUWorkers(["3", "5"])
    assert pinned.options(1, {"resources": {"CPU": 1}, "env": {"OMP_NUM_THREADS": "1"}}) == {
        "resources": {"CPU": 1, "GPU": 1},
        "env": {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "5"},
    }
    assert pinned.options(2, {"resources": {"CPU": 1}})["env"] == {"CUDA_VISIBLE_DEVICES": ""}
    with pytest.raises(ValueError, match="gpus applies to the local cluster"):
        DaskSpec(scheduler_address="tcp://127.0.0.1:8786", gpus=2)


def test_fine_tuning_runs_on_a_detected_gpu_worker(
    monkeypatch, store: Store, mongo_uri: str, tmp_path, caplog
) -> None:
    """Two CUDA devices 'detected' (the detection function forced; torch itself untouched):
    a real LocalCluster gives two of its three workers one each, as the Dask resource GPU=1
    and their own CUDA_VISIBLE_DEVICES (the third sees none); the fine-tune goes to one of
    them, and where it ran is logged and stored with the model."""
    import logging
    import os

    from pestle.dispatch.training import train_model

    monkeypatch.setattr("pestle.devices.detect_gpus", lambda: ["0", "1"])
    label_ids = []
    for seed in (1, 2):
        atoms = rattled_cu(seed)
        sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": "rattle"})
        atoms.calc = EMT()
        store.labels.put(sid, labeller="emt", level_of_theory={"code": "emt"}, lot_hash="emt",
                         energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                         stress=atoms.get_stress())  # fmt: skip
        label_ids.append(f"{sid}-emt")
    with make_client(DaskSpec(n_workers=3, threads_per_worker=1)) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        visible = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        by_name = {str(w["name"]): (w["resources"], visible[a]) for a, w in info.items()}
        assert by_name == {
            "0": ({"CPU": 1, "GPU": 1}, "0"),
            "1": ({"CPU": 1, "GPU": 1}, "1"),
            "2": ({"CPU": 1}, ""),
        }
        with caplog.at_level(logging.INFO, logger="pestle.placement"):
            model_id = train_model(
                client,
                store_uri=mongo_uri,
                database=store.database,
                model_id="model-gpu-placement",
                trainer={"name": "chgnet", "params": {"mode": "linear_correction"}},
                train_label_ids=label_ids,
                val_label_ids=[],
                workdir=str(tmp_path / "training"),
                record={"family": "chgnet"},
            )
    where = store.models.require(model_id).model_dump()["placement"]
    assert where["worker"] in ("0", "1") and where["gpu_worker"] is True
    assert where["cuda_visible_devices"] == where["worker"]  # its own device
    assert where["requested"] == "cuda" and where["device"] == "cpu"  # no CUDA here: fell back
    assert f"fine-tuned {model_id} on worker {where['worker']}" in caplog.text
    assert f"GPU {where['worker']}: device cpu, asked for cuda" in caplog.text
    from pestle.cli.models import trained_on
    from pestle.engine.status import model_versions

    [version] = model_versions(store)  # what `pestle models --json` prints
    assert version.placement == where
    assert trained_on(where) == f"cpu (GPU {where['worker']}, worker {where['worker']})"


def test_a_store_call_waits_out_an_outage_then_gives_up_naming_it(caplog) -> None:
    """Issue 15: an unreachable store is asked again with backoff, for a bounded time."""
    from pymongo.errors import AutoReconnect, OperationFailure, ServerSelectionTimeoutError

    from pestle.store.errors import StoreUnreachable, is_store_outage
    from pestle.store.retry import patiently

    calls = []

    def flaky(answer: str) -> str:
        calls.append(answer)
        if len(calls) < 3:
            raise AutoReconnect("127.0.0.1:1: connection closed")
        return answer

    with caplog.at_level("WARNING", logger="pestle.store"):
        assert patiently(flaky, "ok", outage_seconds=30, what="a test") == "ok"
    assert len(calls) == 3
    assert "unreachable" in caplog.text and "answers again" in caplog.text

    def down() -> None:
        raise ServerSelectionTimeoutError("127.0.0.1:1: [Errno 111] Connection refused")

    with pytest.raises(StoreUnreachable, match="stayed unreachable .* during labelling"):
        patiently(down, outage_seconds=0.3, what="labelling")

    def refused() -> None:  # an answer, not an outage: not asked again
        calls.append("refused")
        raise OperationFailure("not authorized")

    calls.clear()
    with pytest.raises(OperationFailure):
        patiently(refused, outage_seconds=30)
    assert calls == ["refused"]
    assert is_store_outage(AutoReconnect()) and not is_store_outage(OperationFailure("x"))


def test_a_claim_asked_again_after_a_lost_reply_answers_what_it_took(store, raw_db) -> None:
    """A take whose reply an outage lost is repeated with the same token: it holds the job
    (once: one attempt), instead of finding it under its own live lease."""
    _, job_id = enqueue(store, rattled_cu(21))
    _, other = enqueue(store, rattled_cu(22))
    assert store.jobs.take(job_id, "w:1", 60, claim="token-a")
    assert store.jobs.take(job_id, "w:1", 60, claim="token-a")  # the repeat
    assert not store.jobs.take(job_id, "w:1", 60, claim="token-b")  # another claim
    assert not store.jobs.take(job_id, "w:2", 60)
    assert raw_db["jobs"].find_one({"_id": job_id})["attempts"] == 1
    assert store.jobs.take_many([other], "w:1", 60, claim="token-c") == {other}
    assert store.jobs.take_many([other], "w:1", 60, claim="token-c") == {other}
    assert store.jobs.take_many([other], "w:1", 60, claim="token-d") == set()
    assert raw_db["jobs"].find_one({"_id": other})["attempts"] == 1


def test_a_zombie_is_not_alive() -> None:
    """A server stopped by another command than the one that started it stays a zombie of
    its parent until reaped: stopping it must not wait for it to vanish."""
    import subprocess
    import time

    import psutil

    from pestle.store.server import pid_alive

    # sh's background child exits; exec'd sleep, its parent now, never reaps it.
    parent = subprocess.Popen(["sh", "-c", "sleep 0.1 & exec sleep 30"])
    try:
        deadline = time.monotonic() + 10
        zombies = []
        while time.monotonic() < deadline and not zombies:
            time.sleep(0.1)
            zombies = [c for c in psutil.Process(parent.pid).children()
                       if c.status() == psutil.STATUS_ZOMBIE]  # fmt: skip
        assert zombies, "no zombie appeared"
        assert not pid_alive(zombies[0].pid)
        assert pid_alive(parent.pid)
    finally:
        parent.kill()
        parent.wait()
