"""Issue 15, defect 4: the daemon's PID file belongs to the process that holds the store's
lease. A second ``pestle daemon start``, refused because a daemon runs, must leave that
daemon's PID file alone, so ``daemon status`` and ``daemon stop`` still find it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from pestle.cli import app
from pestle.engine.service import daemon_pid_file, running_daemon
from pestle.store import Store
from pestle.store.meta import DAEMON_LEASE


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_refused_start_leaves_the_running_daemons_pid_file(
    tmp_path: Path, store: Store, raw_db, mongo_uri: str, monkeypatch
) -> None:
    monkeypatch.setenv("PESTLE_MONGODB_URI", mongo_uri)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "pid", "work_dir": "work", "seeds": [{"bulk": "Cu", "crystalstructure": "fcc",
                                                    "a": 3.61}],
        "samplers": [{"name": "rattle"}], "potential": {"name": "emt"},
        "labeller": {"name": "emt"}, "finetune": {"enabled": False},
        "store": {"database": store.database},
    }))  # fmt: skip
    # A running daemon, as far as files and the store can tell: a live process named like
    # one, its PID file, and the store's lease in its name.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "pestle", "daemon"]
    )
    try:
        pid_file = daemon_pid_file(tmp_path / "work")
        pid_file.parent.mkdir(parents=True)
        pid_file.write_text(f"{holder.pid}\n")
        store.meta.acquire_daemon_lease(f"here:{holder.pid}:x", 600, {})
        raw_db["meta"].update_one({"_id": DAEMON_LEASE}, {"$set": {"pid": holder.pid}})

        refused = cli("daemon", "start", "-c", config)  # detached, as a user types it
        assert refused.exit_code == 5, refused.output
        assert pid_file.read_text().strip() == str(holder.pid)
        assert running_daemon(tmp_path / "work") == holder.pid
        status = cli("daemon", "status", "-c", config)
        assert f"running, pid {holder.pid}" in status.output, status.output

        stopped = cli("daemon", "stop", "-c", config, "--timeout", "10")
        assert stopped.exit_code == 0 and "daemon stopped" in stopped.output, stopped.output
        assert holder.wait(timeout=10) is not None
    finally:
        holder.kill()
        holder.wait()


def test_a_recycled_pid_is_not_taken_for_the_daemon(tmp_path: Path) -> None:
    """A stale PID file naming a pid some other program now has: nobody to stop."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file = daemon_pid_file(tmp_path)
        pid_file.parent.mkdir(parents=True)
        pid_file.write_text(f"{other.pid}\n")
        assert running_daemon(tmp_path) is None
    finally:
        other.kill()
        other.wait()
