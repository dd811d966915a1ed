"""Model versions as potentials: a stored model id, or a pretrained name, to a Potential.

The registry (the store's ``models`` collection) keeps each version's checkpoint in GridFS
with its sha256; loading writes it out, verifies the checksum and hands the path and digest
to the family's Potential, which verifies it again before it deserialises anything. Which
params take the path and digest is the Potential class's declaration (``checkpoint_params``).
"""

from __future__ import annotations

from pathlib import Path

from pestle.plugins import PluginSpec, RegistryError
from pestle.potentials import POTENTIALS, Potential, checkpoint_spec
from pestle.store import Store, StoreError


def load_stored_model(store: Store, model_id: str, directory: str | Path) -> Potential:
    """The Potential of a stored model version, loaded from its verified checkpoint."""
    return POTENTIALS.build_spec(stored_potential_spec(store, model_id, directory))


def stored_potential_spec(store: Store, model_id: str, directory: str | Path) -> PluginSpec:
    """The potential spec of a stored model version: its registered potential with the
    verified checkpoint written under ``directory`` named in the params with its digest."""
    doc = store.models.require(model_id)
    name = doc.potential or doc.family
    try:
        loads_checkpoints = POTENTIALS.get(name).checkpoint_params is not None
    except RegistryError as exc:
        raise StoreError(f"model {model_id}: no loader for potential {name!r}: {exc}") from None
    if not loads_checkpoints:
        raise StoreError(f"model {model_id}: potential {name!r} loads no checkpoints")
    path, _ = store.models.fetch_checkpoint(model_id, directory)
    return checkpoint_spec(name, doc.potential_params, path)


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
