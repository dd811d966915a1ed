"""Checkpoint integrity shared by every potential family and its trainer: a file's sha256,
a digest over the files of a saved model folder, the pydantic validator for a recorded
sha256, and the error raised when a file is not the one its digest names."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


class ChecksumError(ValueError):
    """A checkpoint file is not the one its recorded sha256 names."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(folder: str | Path, names: Iterable[str]) -> str:
    """One digest for a model saved as several files: sha256 over each named file's name and
    sha256, in the order given (so the digest does not depend on directory listing order)."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name} {sha256_file(Path(folder) / name)}\n".encode())
    return digest.hexdigest()


def check_sha256(value: str | None) -> str | None:
    """A pydantic field validator for a checkpoint's sha256: 64 hexadecimal characters
    (normalised to lower case), or None."""
    if value is None:
        return None
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("a sha256 must be 64 hexadecimal characters")
    return value
