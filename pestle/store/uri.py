"""Where the store lives: a configured MongoDB URI, or pestle's embedded local server; and
masking of the credentials in URIs (and in anything else about to be printed or stored)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_URI = "PESTLE_MONGODB_URI"
MASK = "***"

_URI_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+")
# Keys whose values are secrets wherever they appear in a config or document.
_SECRET_KEY = re.compile(r"pass(word|wd|phrase)?$|secret|token|api_?key|credential|private_key",
                         re.IGNORECASE)  # fmt: skip


def mask_uri(uri: str) -> str:
    """Hide the password of a URI (``scheme://user:password@host...``) for printing and
    storing. Everything up to the last ``@`` is user information, so a password with an
    unescaped ``@`` or ``/`` is hidden whole too."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest:
        return uri
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:{MASK}@{host}" if colon else uri


def mask_text(text: str) -> str:
    """``text`` with the password of every URI in it masked."""
    return _URI_TOKEN.sub(lambda m: mask_uri(m.group()), text)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, strings) with credentials masked: URI passwords in
    any string, and the whole value of any key that names a secret (password, token, api
    key, ...). What a run stores of its config goes through this."""
    if isinstance(value, Mapping):
        return {
            k: (MASK if value[k] is not None and is_secret_key(str(k)) else redact(value[k]))
            for k in value
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return mask_text(value)
    return value


def check_uri(uri: str, where: str = "") -> str:
    """``uri`` if it is a MongoDB URI pymongo can use, else ValueError (its message masked).
    A ``mongodb://`` URI is parsed here, without any network; ``mongodb+srv://`` needs a DNS
    lookup, left to the connection."""
    prefix = f"{where}: " if where else ""
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError(f"{prefix}{mask_uri(uri)!r} is not a mongodb:// or mongodb+srv:// URI")
    if uri.startswith("mongodb://"):
        import warnings

        from pymongo import uri_parser
        from pymongo.errors import PyMongoError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown options: the driver warns again
                uri_parser.parse_uri(uri)
        except (PyMongoError, ValueError, TypeError) as exc:
            raise ValueError(f"{prefix}not a valid MongoDB URI: {mask_text(str(exc))}") from None
    return uri


def configured_uri(uri: str | None = None, uri_file: str | os.PathLike | None = None) -> str | None:
    """The URI the user asked for, in order: config ``store.uri``, ``store.uri_file``, the
    ``PESTLE_MONGODB_URI`` environment variable. ``None`` means: use the embedded server."""
    if uri:
        return uri
    if uri_file:
        path = Path(uri_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"store.uri_file: {path} does not exist")
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"store.uri_file: cannot read {path}: {exc}") from None
        if not text.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError(f"store.uri_file: {path} does not hold a mongodb:// URI")
        return check_uri(text, f"store.uri_file {path}")
    from_env = os.environ.get(ENV_URI)
    return check_uri(from_env, ENV_URI) if from_env else None


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
