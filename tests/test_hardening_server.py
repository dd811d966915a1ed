"""Issue 15, defects 2 and 7: the embedded store under kills and outages.

- SIGKILL of the first ``pestle run`` at every phase of the server's start-up (credentials
  written, the provisioning server up, its user created, the authenticated server starting,
  ready) leaves a work directory the next command adopts or repairs: a normal run then
  succeeds, with one server and no process left over.
- The server stopped for a few seconds and restarted while a run labels costs retries, not
  the run: no label lost or duplicated, no job stuck, nothing left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from pestle.store import EmbeddedServer, Store

PESTLE = str(Path(sys.executable).with_name("pestle"))


def write_config(path: Path, **extra) -> Path:
    config = {
        "name": "kills",
        "seed": 2,
        "work_dir": "work",
        "seeds": [{"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.61}],
        "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05], "per_amplitude": 4}}],
        "potential": {"name": "emt"},
        "labeller": {"name": "emt"},
        "selection": {"per_system": 2},
        "evaluation": {"evaluation_set": {"per_system": 2}},
        "convergence": {"enabled": False},
        "eos": {"enabled": False},
        "finetune": {"enabled": False},
        "dask": {"n_workers": 1},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PESTLE_MONGODB_URI"}


def servers_of(work: Path) -> list[int]:
    return sorted(EmbeddedServer(work)._strays())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# What each kill waits for, read from the files the start-up writes.
POINTS = {
    "credentials written": lambda db: (db / "credentials.json").exists(),
    "provisioning server recorded": lambda db: (
        read_json(db / "server.json").get("phase") == "provisioning"
    ),
    "user created": lambda db: read_json(db / "credentials.json").get("provisioned") is True,
    "authenticated server starting": lambda db: (
        read_json(db / "server.json").get("phase") == "starting"
    ),
    "server ready": lambda db: read_json(db / "server.json").get("phase") == "ready",
}


def kill_at(config: Path, db: Path, point: str) -> bool:
    """Start ``pestle run`` and SIGKILL its process group once ``point`` is reached;
    whether it was reached (else the run ended first)."""
    run = subprocess.Popen([PESTLE, "run", str(config)], env=environment(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    reached = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        if POINTS[point](db):
            os.killpg(run.pid, signal.SIGKILL)
            reached = True
            break
        time.sleep(0.005)
    run.wait()
    return reached


def test_sigkill_during_the_first_start_of_the_server(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml")
    work = tmp_path / "work"
    db = work / "db"
    kills = 0
    try:
        for point in ("credentials written", "provisioning server recorded", "user created"):
            assert kill_at(config, db, point), f"never reached: {point}"
            kills += 1
        # A stopped server: the next start goes through "starting" again.
        stop = subprocess.run([PESTLE, "db", "stop", "-w", str(work)], env=environment(),
                              capture_output=True, text=True)  # fmt: skip
        assert stop.returncode == 0, stop.stderr
        for point in ("authenticated server starting", "server ready"):
            if point == "server ready":
                subprocess.run([PESTLE, "db", "stop", "-w", str(work)], env=environment(),
                               capture_output=True)  # fmt: skip
            assert kill_at(config, db, point), f"never reached: {point}"
            kills += 1
        done = subprocess.run([PESTLE, "run", str(config)], env=environment(),
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(servers_of(work)) == 1
        state = EmbeddedServer(work).state()
        with Store(state.uri, "pestle") as store:
            runs = store.runs.recent()
            assert [r.state for r in runs] == ["finished"]
            n_labels = store.labels.count({})
            assert n_labels == 4  # 2 picks + 2 of the evaluation set
            assert store.jobs.counts() == {"done": n_labels}
        print(f"\nserver start-up: {kills} kills, then a run with {n_labels} labels, "
              f"{len(servers_of(work))} server")  # fmt: skip
    finally:
        EmbeddedServer(work).stop()
    assert servers_of(work) == []


def test_a_store_outage_during_labelling_costs_retries_not_the_run(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        seeds=[{"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.61,
                "supercell": [2, 2, 2]},
               {"name": "Al", "bulk": "Al", "crystalstructure": "fcc", "a": 4.05,
                "supercell": [2, 2, 2]}],
        samplers=[{"name": "rattle", "params": {"amplitudes": [0.03, 0.06],
                                                 "per_amplitude": 40}}],
        selection={"per_system": 60},
        evaluation={"evaluation_set": {"per_system": 4}},
        dask={"n_workers": 2},
    )  # fmt: skip
    work = tmp_path / "work"
    server = EmbeddedServer(work)
    run = subprocess.Popen([PESTLE, "run", str(config)], env=environment(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    outage = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.poll() is None and outage is None:
            state = server.state()
            if state is not None:
                with Store(state.uri, "pestle") as store:
                    labelled = store.labels.count({})
                    if labelled >= 10:  # labelling the picks: the outage
                        port = state.port
                        server.stop()
                        time.sleep(4)
                        restarted = server.ensure_running()
                        outage = (labelled, port, restarted.port)
            time.sleep(0.2)
        try:
            children = psutil.Process(run.pid).children(recursive=True)
        except psutil.NoSuchProcess:  # already ended
            children = []
        output, _ = run.communicate(timeout=900)
        assert outage is not None, "labelling ended before the outage: " + output
        assert outage[1] == outage[2], "the server came back on another port"
        assert run.returncode == 0, output
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"

        state = server.state()
        with Store(state.uri, "pestle") as store:
            # recent() reads a summary without the stages: the whole run document.
            run_doc = store.runs.require(store.runs.recent()[0].id)
            label = run_doc.stages["label"]
            wanted = label["requested"] + label["evaluation_set"] - label["already_labelled"]
            jobs = store.jobs.counts()
            labels = list(store.query("labels", {}, ["structure_id", "lot_hash"]))
            keys = [(d["structure_id"], d["lot_hash"]) for d in labels]
            done_jobs = jobs.get("done", 0)
            stuck = sum(n for s, n in jobs.items() if s not in ("done", "failed", "withdrawn"))
            failed = jobs.get("failed", 0)
            lost = done_jobs + failed - len(labels)
            duplicated = len(keys) - len(set(keys))
        print(f"\noutage after {outage[0]} labels: {len(labels)} labels, {lost} lost, "
              f"{duplicated} duplicated, {stuck} stuck jobs, {failed} failed jobs, "
              f"{len(alive)} leftover processes; run {run_doc.state}")  # fmt: skip
        assert run_doc.state == "finished"
        assert (lost, duplicated, stuck, failed) == (0, 0, 0, 0), jobs
        assert len(labels) == wanted + label["already_labelled"] > 60
    finally:
        if run.poll() is None:
            run.kill()
        server.stop()
    assert servers_of(work) == []


def test_a_stray_server_of_the_folder_is_replaced(tmp_path: Path) -> None:
    """A start killed right after spawning the server, before recording it: the next
    start finds that process by its data folder, stops it, and starts cleanly."""
    server = EmbeddedServer(tmp_path)
    first = server.ensure_running().pid
    (server.root / "server.json").unlink()  # as if the record had never been written
    again = server.ensure_running()
    assert again.pid != first
    assert servers_of(tmp_path) == [again.pid]
    server.stop()
    assert servers_of(tmp_path) == []
