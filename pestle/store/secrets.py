"""Files only their owner may read: the embedded server's credentials and the model-signing
key. Written atomically (a killed writer leaves the old file or none, never half a file) with
mode 0600 in folders of mode 0700; read only when nobody else can read or write them."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any


class SecretFileError(RuntimeError):
    """A secret file is unsafe (others may read it, someone else owns it) or unreadable."""


def private_dir(path: str | os.PathLike) -> Path:
    """``path`` as a folder only its owner can enter (created if missing, tightened if not)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) through a temporary file and a rename."""
    path = Path(path)
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def create_private(path: str | os.PathLike, data: bytes) -> bool:
    """Create ``path`` (mode 0600) holding ``data`` unless it exists; False if it did.
    Two processes racing: exactly one creates it, and the other reads what that one wrote."""
    path = Path(path)
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)  # atomic and fails if the name exists
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def read_private(path: str | os.PathLike) -> bytes:
    """The bytes of a secret file, refused when its owner is not us or others may access it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if info.st_uid != os.getuid():
            raise SecretFileError(f"{path} belongs to another user (uid {info.st_uid})")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise SecretFileError(
                f"{path} can be read by others (mode {stat.S_IMODE(info.st_mode):o}): "
                f"`chmod 600 {path}` if nobody else has seen it, else replace it"
            )
        return handle.read()


def read_private_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        value = json.loads(read_private(path))
    except ValueError:
        raise SecretFileError(f"{path} is not valid JSON") from None
    if not isinstance(value, dict):
        raise SecretFileError(f"{path} does not hold a JSON object")
    return value


def write_private_json(path: str | os.PathLike, value: dict[str, Any]) -> None:
    write_private(path, json.dumps(value, indent=1).encode())
