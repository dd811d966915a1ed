"""pestle's embedded store: a MongoDB-compatible server started as a separate process.

pestle is a plain MongoDB client; it never imports the server's code. It runs the
``secantusd-py`` executable (from the optional ``secantusdb`` package) on 127.0.0.1 with its
data in ``<work_dir>/db/data``, records pid and port in ``<work_dir>/db/server.json`` and
reuses that server from later commands until ``pestle db stop``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pymongo

SERVER_EXECUTABLE = "secantusd-py"
HOST = "127.0.0.1"  # never listen beyond this machine


class ServerError(RuntimeError):
    pass


@dataclass
class ServerState:
    pid: int
    port: int
    host: str
    data_dir: str

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_executable() -> str:
    # Prefer the one beside this interpreter (the project's venv), then PATH.
    beside = Path(sys.executable).parent / SERVER_EXECUTABLE
    if beside.is_file():
        return str(beside)
    found = shutil.which(SERVER_EXECUTABLE)
    if found:
        return found
    raise ServerError(
        f"{SERVER_EXECUTABLE} not found: install pestle with the embedded store "
        "(pip install 'pestle[embedded-db]') or set store.uri / PESTLE_MONGODB_URI to a MongoDB"
    )


def ping(uri: str, timeout_ms: int = 1000) -> bool:
    client = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms
    )
    try:
        client.admin.command("ping")
        return True
    except pymongo.errors.PyMongoError:
        return False
    finally:
        client.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (started by this very process, not yet reaped) is not alive.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


class EmbeddedServer:
    def __init__(self, work_dir: str | os.PathLike) -> None:
        self.root = Path(work_dir).resolve() / "db"
        self.data_dir = self.root / "data"
        self.state_file = self.root / "server.json"
        self.log_file = self.root / "server.log"

    @contextlib.contextmanager
    def _lock(self):
        # Two pestle commands starting at once must not start two servers on one folder.
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "server.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def state(self) -> ServerState | None:
        """The running server, or None (a stale state file is ignored)."""
        if not self.state_file.is_file():
            return None
        try:
            state = ServerState(**json.loads(self.state_file.read_text()))
        except (ValueError, TypeError):
            return None
        if not pid_alive(state.pid) or not ping(state.uri):
            return None
        return state

    def ensure_running(self, timeout: float = 60.0) -> ServerState:
        with self._lock():
            state = self.state()
            if state is not None:
                return state
            return self._start(timeout)

    def _start(self, timeout: float) -> ServerState:
        executable = find_executable()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = open(self.log_file, "ab")  # noqa: SIM115  (handed to the child)
        process = subprocess.Popen(
            [executable, "--host", HOST, "--port", str(port), "--storage-path", str(self.data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the command that started it
        )
        log.close()
        state = ServerState(pid=process.pid, port=port, host=HOST, data_dir=str(self.data_dir))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise ServerError(f"{SERVER_EXECUTABLE} exited with {process.returncode}:\n{tail}")
            if ping(state.uri, timeout_ms=500):
                self.state_file.write_text(json.dumps(asdict(state)))
                return state
            time.sleep(0.2)
        process.terminate()
        raise ServerError(
            f"{SERVER_EXECUTABLE} did not answer within {timeout:.0f} s (log: {self.log_file})"
        )

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server; True if one was running."""
        with self._lock():
            state = self.state()
            self.state_file.unlink(missing_ok=True)
            if state is None:
                return False
            os.kill(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and pid_alive(state.pid):
                time.sleep(0.1)
            if pid_alive(state.pid):
                os.kill(state.pid, signal.SIGKILL)
            return True
