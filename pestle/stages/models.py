"""Model versions as potentials: a stored model id, or a pretrained name, to a Potential.

The registry (the store's ``models`` collection) keeps each version's checkpoint in GridFS
with its sha256 and a signature (store/signing.py: an HMAC under a key outside the store).
Loading writes the checkpoint out, verifies the sha256 and the signature, and hands the path
to the family's Potential. Only a verified signature passes the digest on, and the digest is
what lets a family unpickle (chgnet's fallback, MACE's .model): an unsigned or badly signed
checkpoint loads only as tensors and plain data, or, for a family that always unpickles,
not at all. Which params take the path and digest is the Potential class's declaration
(``checkpoint_params``); params that waive verification (``trust_params``) are never taken
from the store.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pestle.plugins import PluginSpec, RegistryError
from pestle.potentials import POTENTIALS, Potential, checkpoint_spec
from pestle.store import Store, StoreError

log = logging.getLogger("pestle.models")


class UntrustedModelError(StoreError):
    """A stored checkpoint whose family would unpickle it, without a valid signature."""


def load_stored_model(store: Store, model_id: str, directory: str | Path) -> Potential:
    """The Potential of a stored model version, loaded from its verified checkpoint."""
    return POTENTIALS.build_spec(stored_potential_spec(store, model_id, directory))


def stored_potential_spec(store: Store, model_id: str, directory: str | Path) -> PluginSpec:
    """The potential spec of a stored model version: its registered potential with the
    verified checkpoint written under ``directory`` named in the params (with its digest
    when its signature verifies)."""
    doc = store.models.require(model_id)
    name = doc.potential or doc.family
    try:
        cls = POTENTIALS.get(name)
    except RegistryError as exc:
        raise StoreError(f"model {model_id}: no loader for potential {name!r}: {exc}") from None
    if cls.checkpoint_params is None:
        raise StoreError(f"model {model_id}: potential {name!r} loads no checkpoints")
    path, _, doc, problem = store.models.fetch_verified(model_id, directory)
    if (doc.potential or doc.family) != name:
        raise StoreError(f"model {model_id} changed while it was being loaded")
    params = {k: v for k, v in doc.potential_params.items() if k not in cls.trust_params}
    if problem is None:
        return checkpoint_spec(name, params, path)
    if cls.checkpoint_unpickles == "always":
        raise UntrustedModelError(
            f"model {model_id} is refused: loading a {name} checkpoint unpickles it (runs any "
            f"code it names), and {problem}; `pestle models trust {model_id}` signs it if you "
            "trust where it came from"
        )
    # Without the digest the family reads tensors and plain data only: nothing runs.
    level = logging.INFO if problem == "it is not signed" else logging.WARNING
    log.log(level, "model %s: %s; loading its %s checkpoint as tensors only", model_id,
            problem, name)  # fmt: skip
    path_key, _ = cls.checkpoint_params
    return PluginSpec(name=name, params={**params, path_key: str(path)})


def resolve_model(spec: str, store: Store | None, directory: str | Path) -> Potential:
    """``model-...`` (a stored version), or ``NAME`` / ``NAME:MODEL`` (a registered potential
    with its pretrained model, e.g. ``chgnet``, ``chgnet:0.2.0``)."""
    if spec.startswith("model-"):
        if store is None:
            raise StoreError(f"{spec} is a stored model: the store is needed to load it")
        return load_stored_model(store, spec, directory)
    name, _, model = spec.partition(":")
    if name not in POTENTIALS.names():
        known = ", ".join(POTENTIALS.names())
        raise ValueError(f"{spec!r} is neither a stored model id nor a potential ({known})")
    return POTENTIALS.build(name, {"model": model} if model else {})
