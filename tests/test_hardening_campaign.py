"""Issue 15, defects 3 and 5, on real campaigns run by the ``pestle`` executable:

- no secret is stored: the password of a ``store.uri``, the embedded server's generated
  password and ``MP_API_KEY`` appear in no collection, log, report, export or command output;
- loopback only: every socket a running campaign's processes listen on (``pestle run``, its
  Dask scheduler, nannies, workers and dashboard, and the embedded server) is on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pymongo
import yaml
from bson import json_util

from pestle.store import EmbeddedServer

PESTLE = str(Path(sys.executable).with_name("pestle"))
MP_KEY = "mp-planted-key-5f3a9c"


def write_config(path: Path, **extra: object) -> Path:
    config = {
        "name": "secrets",
        "seed": 3,
        "work_dir": "work",
        "seeds": [{"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.61}],
        "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05, 0.1], "per_amplitude": 4}}],
        "potential": {"name": "emt"},
        "labeller": {"name": "emt"},
        "selection": {"per_system": 3},
        "evaluation": {"evaluation_set": {"per_system": 3}},
        "finetune": {"enabled": False},
        "dask": {"n_workers": 2},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PESTLE_MONGODB_URI"}
    return {**env, "MP_API_KEY": MP_KEY, "COLUMNS": "200", **extra}


class ListeningSockets(threading.Thread):
    """Every listening TCP socket of a process tree (and extra pids), sampled until stopped."""

    def __init__(self, root: int, extra_pids=lambda: ()) -> None:
        super().__init__(daemon=True)
        self.root, self.extra_pids = root, extra_pids
        self.seen: dict[tuple[str, int], str] = {}  # (ip, port) -> process name
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                processes = [psutil.Process(self.root)]
                processes += processes[0].children(recursive=True)
            except psutil.NoSuchProcess:
                processes = []
            for pid in self.extra_pids():
                with contextlib.suppress(psutil.NoSuchProcess):
                    processes.append(psutil.Process(pid))
            for process in processes:
                try:
                    for conn in process.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            self.seen[(conn.laddr.ip, conn.laddr.port)] = " ".join(
                                process.cmdline()[:4]
                            )
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass


def dump_database(uri: str, database: str) -> str:
    client = pymongo.MongoClient(uri)
    try:
        db = client[database]
        return "\n".join(
            json_util.dumps(doc) + (repr(doc) if name.endswith(".chunks") else "")
            for name in db.list_collection_names()
            for doc in db[name].find({})
        )
    finally:
        client.close()


def files_text(folder: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", errors="replace")
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "data" not in p.relative_to(folder).parts[:2]
    )


def assert_no_secret(where: str, text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret[:4]}... found in {where}"


def test_embedded_campaign_listens_on_loopback_and_stores_no_secret(tmp_path: Path) -> None:
    config = write_config(tmp_path / "campaign" / "c.yaml")
    work = tmp_path / "campaign" / "work"
    server = EmbeddedServer(work)

    def server_pid():
        state = server._read_state()
        return [state.pid] if state is not None and state.pid else []

    run = subprocess.Popen([PESTLE, "run", str(config)], env=environment(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    sockets = ListeningSockets(run.pid, server_pid)
    sockets.start()
    output, _ = run.communicate(timeout=900)
    sockets.done.set()
    sockets.join()
    try:
        assert run.returncode == 0, output
        print("listening:", sorted(sockets.seen.items()))
        names = " ".join(sockets.seen.values())
        assert "secantusd" in names and "pestle" in names, sockets.seen  # server and run
        assert len(sockets.seen) >= 4, sockets.seen  # + scheduler, dashboard, workers...
        exposed = {addr: who for addr, who in sockets.seen.items() if addr[0] != "127.0.0.1"}
        assert not exposed, f"listening beyond loopback: {exposed}"

        state = server.state()
        assert state is not None and state.password
        secrets = [state.password, MP_KEY]
        assert_no_secret("pestle run's output", output, secrets)
        assert_no_secret("the store", dump_database(state.uri, "pestle"), secrets)
        outputs = [
            subprocess.run([PESTLE, *args], env=environment(), capture_output=True, text=True)
            for args in (["query", "--collection", "runs", "--json", "-c", config],
                         ["status", "--json", "-c", config], ["db", "status", "-c", config],
                         ["export", "-c", config, "-o", tmp_path / "export.extxyz"])
        ]  # fmt: skip
        for done in outputs:
            assert done.returncode == 0, done.stdout + done.stderr
            assert_no_secret(" ".join(map(str, done.args[1:2])), done.stdout + done.stderr, secrets)
        assert_no_secret("the export", (tmp_path / "export.extxyz").read_text(), secrets)
        # Logs, reports, run folders; the credentials file is the one place it is kept.
        text = files_text(work).replace((work / "db" / "credentials.json").read_text(), "")
        assert_no_secret("the work directory", text, secrets)
    finally:
        server.stop()
    assert not server._strays()


def test_a_password_in_store_uri_is_stored_nowhere(
    tmp_path: Path, mongo_uri: str, database_name: str
) -> None:
    # The tests' server runs with auth: its URI carries a real (generated) password.
    password = pymongo.uri_parser.parse_uri(mongo_uri)["password"]
    assert password
    config = write_config(tmp_path / "c.yaml", store={"uri": mongo_uri, "database": database_name})
    done = subprocess.run([PESTLE, "run", str(config)], env=environment(),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    secrets = [password, MP_KEY]
    assert_no_secret("pestle run's output", done.stdout + done.stderr, secrets)
    dump = dump_database(mongo_uri, database_name)
    assert "***" in dump  # the masked URI is there, its password is not
    assert_no_secret("the store", dump, secrets)
    query = subprocess.run([PESTLE, "query", "--collection", "runs", "--json", "-c", str(config)],
                           env=environment(), capture_output=True, text=True)  # fmt: skip
    assert query.returncode == 0
    run_doc = json.loads(query.stdout.splitlines()[0])
    assert run_doc["config"]["store"]["uri"].count("***") == 1
    assert_no_secret("pestle query", query.stdout + query.stderr, secrets)
    assert_no_secret("the work directory", files_text(tmp_path / "work"), secrets)
    pymongo.MongoClient(mongo_uri).drop_database(database_name)
    time.sleep(0)
