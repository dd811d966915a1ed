"""Signatures of stored checkpoints that the store alone cannot forge.

A checkpoint's sha256 in its model document only says the GridFS bytes are the ones the
document names; whoever can write to the store can write both. So every checkpoint pestle
stores also gets an HMAC-SHA256 of (model id, potential, sha256) under a key kept outside the
store: ``$PESTLE_MODEL_KEY_FILE`` when set, else ``$XDG_CONFIG_HOME/pestle/model-signing.key``
(``~/.config/pestle/...``), created on first use with mode 0600. Every process of the user
(the run, the daemon, Dask workers, ``pestle evaluate``) finds the same key; machines that
share a store share the key file (name it with ``PESTLE_MODEL_KEY_FILE``).

A family whose checkpoints need a full unpickle (MACE's ``.model``) loads a stored version only
when its signature verifies; ``pestle models trust ID`` signs one explicitly, and logs it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pestle.store.secrets import SecretFileError, create_private, read_private

KEY_FILE_ENV = "PESTLE_MODEL_KEY_FILE"
SCHEME = "hmac-sha256-v1"


def default_key_file() -> Path:
    named = os.environ.get(KEY_FILE_ENV)
    if named:
        return Path(named).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "pestle" / "model-signing.key"


@dataclass(frozen=True)
class ModelSigner:
    key: bytes
    path: Path

    @property
    def fingerprint(self) -> str:
        """Names the key (not the key): which key signed a checkpoint."""
        return hashlib.sha256(b"pestle-key-id\0" + self.key).hexdigest()[:16]

    def sign(self, model_id: str, potential: str | None, sha256: str) -> dict[str, str]:
        message = "\0".join((SCHEME, model_id, potential or "", sha256.lower())).encode()
        return {
            "scheme": SCHEME,
            "key": self.fingerprint,
            "hmac": hmac.new(self.key, message, hashlib.sha256).hexdigest(),
        }

    def verify(
        self, model_id: str, potential: str | None, sha256: str, signature: dict | None
    ) -> str | None:
        """None when ``signature`` is this key's over these values, else why not."""
        if not signature:
            return "it is not signed"
        if signature.get("scheme") != SCHEME:
            return f"its signature scheme {signature.get('scheme')!r} is not {SCHEME}"
        if signature.get("key") != self.fingerprint:
            return (
                f"it was signed with another key ({signature.get('key')}; this machine's key "
                f"{self.fingerprint} is {self.path})"
            )
        expected = self.sign(model_id, potential, sha256)["hmac"]
        if not hmac.compare_digest(expected, str(signature.get("hmac", ""))):
            return "its signature does not match: the document or checkpoint was changed"
        return None


def load_signer(path: str | os.PathLike | None = None, create: bool = False) -> ModelSigner | None:
    """The signing key at ``path`` (default: ``default_key_file()``); created when missing
    and ``create``, else None. Raises SecretFileError for a key others can read."""
    path = Path(path) if path is not None else default_key_file()
    if not path.exists():
        if not create:
            return None
        create_private(path, secrets.token_hex(32).encode())
    raw = read_private(path).strip()
    try:
        key = bytes.fromhex(raw.decode())
    except ValueError:
        raise SecretFileError(f"{path} does not hold a hexadecimal key") from None
    if len(key) < 16:
        raise SecretFileError(f"{path}: the key is shorter than 16 bytes")
    return ModelSigner(key, path)
