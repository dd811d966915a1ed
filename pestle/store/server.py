"""pestle's embedded store: a MongoDB-compatible server started as a separate process.

pestle is a plain MongoDB client; it never imports the server's code. It runs the
``secantusd-py`` executable (from the optional ``secantusdb`` package) on 127.0.0.1 with its
data in ``<work_dir>/db/data`` and reuses that server from later commands until
``pestle db stop``.

Security: ``<work_dir>/db`` is owner-only (0700). The server requires SCRAM authentication
(``--auth``); its one user's generated password is in ``db/credentials.json`` (0600) and
nowhere else: URIs are masked wherever they are printed or stored. secantusd has no
"localhost exception", so the user is created once by a server started without ``--auth``
on a random loopback port (``provisioning``); the first authenticated start then drops any
other user (and, for a fresh folder, any data) that someone could have slipped in meanwhile.

Start-up is a sequence of recorded phases in ``db/server.json`` (written atomically, under
the lock ``db/server.lock`` that holds the locking command's pid): ``provisioning`` (no auth,
creating the user), ``starting`` (with auth, not yet answering), ``ready``, ``stopped``. A
command killed at any point leaves a state the next one resolves: a ``starting``/``ready``
server of this folder is adopted, anything else serving this folder (found by its command
line, which names the data folder) is stopped and the start done again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote_plus

import pymongo

from pestle.store.secrets import (
    SecretFileError,
    private_dir,
    read_private_json,
    write_private,
    write_private_json,
)
from pestle.store.uri import mask_uri

log = logging.getLogger("pestle.store.server")

SERVER_EXECUTABLE = "secantusd-py"
HOST = "127.0.0.1"  # never listen beyond this machine
USER = "pestle"
# Phases a command may adopt; a "provisioning" server runs without auth and never is.
ADOPTABLE = ("starting", "ready")


class ServerError(RuntimeError):
    pass


@dataclass
class ServerState:
    pid: int
    port: int
    host: str
    data_dir: str
    phase: str = "ready"
    auth: bool = True
    # From db/credentials.json, never written to server.json.
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        """The URI clients connect with (it holds the password: print ``uri_masked``)."""
        base = f"{self.host}:{self.port}/?directConnection=true"
        if self.auth and self.user and self.password:
            return (
                f"mongodb://{quote_plus(self.user)}:{quote_plus(self.password)}@{base}"
                "&authSource=admin"
            )
        return f"mongodb://{base}"

    @property
    def uri_masked(self) -> str:
        return mask_uri(self.uri)

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("user", "password")}


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        # As the server binds (asyncio sets SO_REUSEADDR): a port in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


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
    """Whether a server answers at ``uri`` (and, when it holds credentials, accepts them)."""
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
    """Whether process ``pid`` runs. A zombie (exited, not yet reaped by its parent) does
    not: this process reaps its own children; another's (a server that ``pestle run``
    started and ``pestle db stop`` stopped) is told by its state in /proc."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile, or no /proc: kill(0) has answered
        return not Path(f"/proc/{pid}").exists() and Path("/proc/self").exists()
    # "pid (command) state ...": the command may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 1 :].split()
    return bool(fields) and fields[0] in ("Z", "X")


def _command_line(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")


class EmbeddedServer:
    def __init__(self, work_dir: str | os.PathLike) -> None:
        self.root = Path(work_dir).resolve() / "db"
        self.data_dir = self.root / "data"
        self.state_file = self.root / "server.json"
        self.log_file = self.root / "server.log"
        self.credentials_file = self.root / "credentials.json"
        # Our own (empty) server config: passing one turns off secantusd's search of
        # ./secantusd.toml and ~/.secantus/, so no file elsewhere changes how it runs.
        self.config_file = self.root / "secantusd.toml"
        self.lock_file = self.root / "server.lock"

    # -- the lock and the recorded state ------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        # Two pestle commands starting at once must not start two servers on one folder.
        # flock dies with its holder, so a killed command never leaves the folder locked.
        private_dir(self.root)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")  # who holds it, for a human looking
                handle.flush()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read_state(self) -> ServerState | None:
        try:
            raw = json.loads(self.state_file.read_text())
            return ServerState(**{k: v for k, v in raw.items() if k not in ("user", "password")})
        except (OSError, ValueError, TypeError):
            return None

    def _write_state(self, state: ServerState) -> None:
        write_private(self.state_file, json.dumps(state.record()).encode())

    def _credentials(self, create: bool = False) -> dict | None:
        if not self.credentials_file.exists():
            if not create:
                return None
            # "fresh": no data yet, so whatever appears before our user exists is not ours.
            fresh = not self.data_dir.is_dir() or not any(self.data_dir.iterdir())
            creds = {"user": USER, "password": secrets.token_urlsafe(32), "provisioned": False,
                     "fresh": fresh}  # fmt: skip
            write_private_json(self.credentials_file, creds)
            return creds
        try:
            creds = read_private_json(self.credentials_file)
        except SecretFileError as exc:
            raise ServerError(f"the embedded store's credentials: {exc}") from None
        if not isinstance(creds.get("user"), str) or not isinstance(creds.get("password"), str):
            raise ServerError(f"{self.credentials_file} lacks user and password")
        return creds

    def _with_credentials(self, state: ServerState, creds: dict | None) -> ServerState:
        if creds is not None and state.auth:
            state.user, state.password = creds["user"], creds["password"]
        return state

    def _serves_our_data(self, pid: int) -> bool:
        """Whether ``pid`` is a secantusd process serving this folder (not a recycled pid)."""
        if not pid or not pid_alive(pid):
            return False
        args = _command_line(pid)
        if args is None:  # no /proc: trust the pid
            return True
        return str(self.data_dir) in args and any(SERVER_EXECUTABLE in a for a in args)

    def _strays(self) -> set[int]:
        """Our processes serving this folder, recorded or not (a start killed between
        spawning the server and recording it leaves one nobody knows of)."""
        found = set()
        proc = Path("/proc")
        if not proc.is_dir():
            return found
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if entry.stat().st_uid != os.getuid():
                    continue
            args = _command_line(int(entry.name))
            if not args or not any(SERVER_EXECUTABLE in a for a in args):
                continue
            for i, arg in enumerate(args[:-1]):
                if arg == "--storage-path" and args[i + 1] == str(self.data_dir):
                    found.add(int(entry.name))
        found.discard(os.getpid())
        return found

    def _terminate(self, pids: set[int], timeout: float = 30.0) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)

    # -- what commands ask ----------------------------------------------------------------
    def state(self) -> ServerState | None:
        """The running server (with its credentials), or None: stopped, never started, a
        start that did not get far enough, or a recorded pid that is no longer ours."""
        state = self._read_state()
        # Not while "starting": until its start is audited, the server is not handed out.
        if state is None or state.phase != "ready":
            return None
        if not self._serves_our_data(state.pid):
            return None
        state = self._with_credentials(state, self._credentials())
        if not ping(state.uri):
            return None
        return state

    def ensure_running(self, timeout: float = 60.0) -> ServerState:
        """The server of this folder: adopted when one runs, else (re)started."""
        with self._lock():
            recorded = self._read_state()
            if recorded is not None and recorded.phase in ADOPTABLE:
                adopted = self._adopt(recorded, timeout)
                if adopted is not None:
                    return adopted
            strays = self._strays()
            if recorded is not None and self._serves_our_data(recorded.pid):
                strays.add(recorded.pid)
            if strays:
                log.warning("stopping %s left by an interrupted start: pid %s",
                            SERVER_EXECUTABLE, ", ".join(map(str, sorted(strays))))  # fmt: skip
                self._terminate(strays)
            return self._start(timeout, recorded.port if recorded is not None else None)

    def _adopt(self, recorded: ServerState, timeout: float) -> ServerState | None:
        if not self._serves_our_data(recorded.pid):
            return None
        creds = self._credentials()
        if creds is None or not creds.get("provisioned"):
            return None
        state = self._with_credentials(recorded, creds)
        # A start killed in "starting" may be seconds from answering: wait for it.
        wait = timeout if recorded.phase == "starting" else 5.0
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not self._serves_our_data(recorded.pid):
                return None
            if ping(state.uri, timeout_ms=500):
                if state.phase != "ready":
                    self._audit(state, creds)
                    state.phase = "ready"
                    self._write_state(state)
                return state
            time.sleep(0.2)
        return None

    def _spawn(self, port: int, auth: bool) -> subprocess.Popen:
        executable = find_executable()
        private_dir(self.data_dir)
        if not self.config_file.is_file():
            write_private(self.config_file, b"# pestle's embedded store: settings are flags\n")
        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            return subprocess.Popen(
                [
                    executable,
                    "--config",
                    str(self.config_file),
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    "--storage-path",
                    str(self.data_dir),
                    *(["--auth"] if auth else []),
                ],  # fmt: skip
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the command that started it
            )
        finally:
            os.close(log_fd)

    def _wait(self, process: subprocess.Popen, uri: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise ServerError(
                    f"{SERVER_EXECUTABLE} exited with {process.returncode}:\n{mask_uri(tail)}"
                )
            if ping(uri, timeout_ms=500):
                return
            time.sleep(0.2)
        process.terminate()
        raise ServerError(
            f"{SERVER_EXECUTABLE} did not answer within {timeout:.0f} s (log: {self.log_file})"
        )

    def _start(self, timeout: float, port: int | None) -> ServerState:
        creds = self._credentials(create=True)
        if not creds.get("provisioned"):
            self._provision(creds, timeout)
        # The port of the last run when it is free: clients holding its URI reconnect.
        if not port or not port_free(port):
            port = free_port()
        process = self._spawn(port, auth=True)
        state = ServerState(process.pid, port, HOST, str(self.data_dir), phase="starting")
        self._write_state(state)
        state = self._with_credentials(state, creds)
        self._wait(process, state.uri, timeout)
        self._audit(state, creds)
        state.phase = "ready"
        self._write_state(state)
        return state

    def _provision(self, creds: dict, timeout: float) -> None:
        """Create the server's user: run it once without auth on a random loopback port."""
        if not creds.get("fresh"):
            log.warning("%s: securing an existing store with a password", self.data_dir)
        port = free_port()
        process = self._spawn(port, auth=False)
        state = ServerState(process.pid, port, HOST, str(self.data_dir), phase="provisioning",
                            auth=False)  # fmt: skip
        try:
            self._write_state(state)
            self._wait(process, state.uri, timeout)
            client = pymongo.MongoClient(state.uri, serverSelectionTimeoutMS=int(timeout * 1000))
            try:
                admin = client.admin
                if admin.command("usersInfo", creds["user"]).get("users"):
                    admin.command("updateUser", creds["user"], pwd=creds["password"])
                else:
                    admin.command("createUser", creds["user"], pwd=creds["password"],
                                  roles=[{"role": "root", "db": "admin"}])  # fmt: skip
            finally:
                client.close()
        finally:
            self._terminate({process.pid})
        creds["provisioned"] = True
        write_private_json(self.credentials_file, creds)

    def _audit(self, state: ServerState, creds: dict) -> None:
        """Drop what may have been slipped in while the server ran without auth: any user
        but ours, and, when the folder was fresh, any data."""
        client = pymongo.MongoClient(state.uri, serverSelectionTimeoutMS=10_000)
        try:
            for user in client.admin["system.users"].find({}, {"user": 1, "db": 1}):
                if (user.get("user"), user.get("db")) != (creds["user"], "admin"):
                    log.warning("dropping unknown store user %s.%s", user.get("db"),
                                user.get("user"))  # fmt: skip
                    client[user.get("db") or "admin"].command("dropUser", user.get("user"))
            if creds.get("fresh"):
                for name in client.list_database_names():
                    if name not in ("admin", "local", "config"):
                        log.warning("dropping database %s made while the store was set up",
                                    name)  # fmt: skip
                        client.drop_database(name)
                write_private_json(self.credentials_file, {**creds, "fresh": False})
                creds["fresh"] = False
        finally:
            client.close()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server (and anything else serving this folder); True if one was running.
        The port stays recorded so that the next start takes it again when free."""
        with self._lock():
            recorded = self._read_state()
            pids = self._strays()
            running = False
            if recorded is not None:
                running = recorded.phase in ADOPTABLE and self._serves_our_data(recorded.pid)
                if self._serves_our_data(recorded.pid):
                    pids.add(recorded.pid)
            if pids:
                self._terminate(pids, timeout)
            if recorded is not None:
                recorded.phase, recorded.pid = "stopped", 0
                self._write_state(recorded)
            return running or bool(pids)
