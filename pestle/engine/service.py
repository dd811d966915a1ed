"""The daemon as a service: where its PID and log files live, starting it detached (a new
session that outlives the terminal), running it in the foreground with signal handling, and
stopping it (SIGTERM, a timeout, then SIGKILL of its process group if asked)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pestle.store.server import pid_alive

START_WAIT_SECONDS = 120.0


class ServiceError(RuntimeError):
    """The daemon did not start or stop as asked; ``returncode``: its exit status, if any."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


def daemon_dir(work_dir: str | os.PathLike) -> Path:
    """``<work_dir>/daemon``: the daemon's PID file, log and fetched models."""
    return Path(work_dir).resolve() / "daemon"


def daemon_pid_file(work_dir: str | os.PathLike) -> Path:
    """The one place the daemon's PID file is named (written by the daemon, read here)."""
    return daemon_dir(work_dir) / "daemon.pid"


def daemon_log_file(work_dir: str | os.PathLike) -> Path:
    return daemon_dir(work_dir) / "daemon.log"


def running_daemon(work_dir: str | os.PathLike) -> int | None:
    """The pid of the daemon of this work directory, if its PID file names a live pestle
    daemon (a pid recycled by some other program after a crash is not ours to signal)."""
    path = daemon_pid_file(work_dir)
    if not path.is_file():
        return None
    text = path.read_text().strip()
    pid = int(text) if text.isdigit() else 0
    return pid if pid and pid_alive(pid) and _is_pestle_daemon(pid) else None


def _is_pestle_daemon(pid: int) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return True  # no /proc to ask: trust the file
    return "daemon" in args and any("pestle" in arg for arg in args)


def write_pid_file(path: Path) -> None:
    """Written by the daemon once it holds the store's lease, and only then: atomically, so
    a reader sees the old pid or the new one, never an empty file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pid_file(path: Path) -> None:
    """Removed by the daemon that wrote it, and only while it still names this process."""
    if path.is_file() and path.read_text().strip() == str(os.getpid()):
        path.unlink()


@dataclass
class DaemonProcess:
    pid: int
    log_file: Path


def start_detached(
    config_paths: Sequence[str | os.PathLike],
    work_dir: str | os.PathLike,
    *,
    exit_when_idle: bool = False,
    idle_poll_seconds: float = 30.0,
    wait_seconds: float = START_WAIT_SECONDS,
) -> DaemonProcess:
    """Start ``pestle daemon start --foreground`` in a new session with its output in
    ``<work_dir>/daemon/daemon.log``; returns once it has written its PID file (it holds the
    store's lease by then). Raises ServiceError (with the child's exit status) otherwise."""
    log_path, pid_path = daemon_log_file(work_dir), daemon_pid_file(work_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The PID file is left alone: only the process that wins the lease writes it (over a
    # stale one), so a start refused because a daemon runs cannot hide that daemon.
    command = [sys.executable, "-m", "pestle", "daemon", "start", "--foreground",
               f"--idle-poll={idle_poll_seconds}",
               *([] if not exit_when_idle else ["--exit-when-idle"]),
               *[str(Path(p).resolve()) for p in config_paths]]  # fmt: skip
    with open(log_path, "ab") as log_handle:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the terminal; SIGHUP does not reach it
            env={**os.environ, "DASK_LOGGING__DISTRIBUTED": "warning"},
        )
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if pid_path.is_file() and pid_path.read_text().strip() == str(child.pid):
            return DaemonProcess(child.pid, log_path)
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise ServiceError(
                f"the daemon exited ({child.returncode}):\n" + "\n".join(tail), child.returncode
            )
        time.sleep(0.2)
    raise ServiceError(
        f"the daemon (pid {child.pid}) did not report in {wait_seconds:.0f} s; see {log_path}"
    )


class DaemonBusy(ServiceError):
    """Another daemon holds the store's lease: one daemon per store."""


def run_in_foreground(daemon) -> None:
    """Run a ``pestle.engine.daemon.Daemon`` in this process until it stops: SIGTERM and
    SIGINT ask it to finish its current step first. Raises DaemonBusy when another daemon
    holds the store's lease (StoreError for any other failure of the store)."""
    from pestle.store import StoreError

    previous = {
        sig: signal.signal(sig, daemon.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        daemon.run()
    except StoreError as exc:
        holder = _lease_holder(daemon)
        if holder is not None and holder != daemon.owner:
            raise DaemonBusy(str(exc)) from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _lease_holder(daemon) -> str | None:
    """The owner of the store's daemon lease, read after a failure (None if unknown)."""
    try:
        lease = daemon.store.meta.daemon_lease() if daemon.store is not None else None
    except Exception:  # the store may be what failed
        return None
    return None if lease is None else lease.get("owner")


@dataclass
class StopOutcome:
    pid: int | None  # None: no daemon was running
    killed: bool = False


def stop_daemon(
    work_dir: str | os.PathLike,
    *,
    timeout: float = 600.0,
    kill: bool = False,
    on_signalled=None,
) -> StopOutcome:
    """SIGTERM the daemon of this work directory and wait up to ``timeout`` s for it to
    finish its current step; then SIGKILL it with its process group (its Dask workers) if
    ``kill``, else raise ServiceError. ``on_signalled(pid)`` is called after the SIGTERM."""
    pid = running_daemon(work_dir)
    if pid is None:
        return StopOutcome(None)
    os.kill(pid, signal.SIGTERM)
    if on_signalled is not None:
        on_signalled(pid)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not pid_alive(pid):
        return StopOutcome(pid)
    if not kill:
        raise ServiceError(f"daemon {pid} still runs after {timeout:.0f} s (use --kill)")
    # A detached daemon leads its own process group: its Dask workers go with it.
    if os.getpgid(pid) == pid:
        os.killpg(pid, signal.SIGKILL)
    else:
        os.kill(pid, signal.SIGKILL)
    return StopOutcome(pid, killed=True)
