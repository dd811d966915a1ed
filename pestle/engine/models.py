"""Model versions as potentials: a stored model id, or a pretrained name, to a Potential.

The registry (the store's ``models`` collection) keeps each version's checkpoint in GridFS
with its sha256; loading writes it out, verifies the checksum and hands the path and digest
to the family's Potential, which verifies it again before it deserialises anything.
"""

from __future__ import annotations

from pathlib import Path

from pestle.potentials import POTENTIALS, Potential
from pestle.store import Store, StoreError

# Which params of each Potential take a checkpoint path and its sha256.
CHECKPOINT_PARAMS = {
    "chgnet": ("checkpoint", "checkpoint_sha256"),
    "mace": ("model_path", "model_sha256"),
    "matgl": ("model_path", "model_sha256"),
}


def load_stored_model(store: Store, model_id: str, directory: str | Path) -> Potential:
    """The Potential of a stored model version, loaded from its verified checkpoint."""
    name, params = stored_model_spec(store, model_id, directory)
    return POTENTIALS.build(name, params)


def stored_model_spec(store: Store, model_id: str, directory: str | Path) -> tuple[str, dict]:
    """(registered potential name, its params) for a stored model version, with the verified
    checkpoint written under ``directory`` and named in the params with its digest."""
    doc = store.models.find_one({"_id": model_id}, {"checkpoint": 1, "potential": 1,
                                                     "potential_params": 1, "family": 1})  # fmt: skip
    if doc is None:
        raise StoreError(f"no model {model_id} in the store (see `pestle models`)")
    name = doc.get("potential", doc.get("family"))
    if name not in CHECKPOINT_PARAMS:
        raise StoreError(f"model {model_id}: no loader for potential {name!r}")
    path, _ = store.fetch_checkpoint(model_id, directory)
    path_key, sha_key = CHECKPOINT_PARAMS[name]
    if path.is_dir():  # matgl's folder: its Potential checks a digest over the files
        from pestle.potentials.matgl import folder_sha256

        digest = folder_sha256(path)
    else:
        from pestle.potentials.checkpoints import sha256_file

        digest = sha256_file(path)
    return name, {**doc.get("potential_params", {}), path_key: str(path), sha_key: digest}


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
