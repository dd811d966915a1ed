"""Where the store lives: a configured MongoDB URI, or pestle's embedded local server."""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_URI = "PESTLE_MONGODB_URI"

_PASSWORD = re.compile(r"(?P<scheme>mongodb(?:\+srv)?://)(?P<user>[^:@/]+):(?P<password>[^@/]*)@")


def mask_uri(uri: str) -> str:
    """Hide the password of a MongoDB URI for printing and storing."""
    return _PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri)


def configured_uri(uri: str | None = None, uri_file: str | os.PathLike | None = None) -> str | None:
    """The URI the user asked for, in order: config ``store.uri``, ``store.uri_file``, the
    ``PESTLE_MONGODB_URI`` environment variable. ``None`` means: use the embedded server."""
    if uri:
        return uri
    if uri_file:
        path = Path(uri_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"store.uri_file: {path} does not exist")
        text = path.read_text().strip()
        if not text.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError(f"store.uri_file: {path} does not hold a mongodb:// URI")
        return text
    return os.environ.get(ENV_URI) or None


def embedded_uri(uri: str) -> str:
    """The embedded server's URI as pestle uses it: without retryable writes.

    secantusd-py keeps a record of every retryable write per session and consults it on each
    write, so past ~10⁴ writes an update costs ~5-10 ms of server time instead of ~0.5 ms
    (measured with pymongo, ``benchmarks/bench_engine_scale.py``). A retry buys nothing on a
    server on the same machine; a MongoDB given by URI keeps the user's settings."""
    if "retrywrites=" in uri.lower():
        return uri
    joint = "&" if "?" in uri else ("?" if uri.endswith("/") else "/?")
    return f"{uri}{joint}retryWrites=false"
