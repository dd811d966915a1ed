"""The model registry round-trips bit for bit: a model version stored in the store's GridFS
and loaded back (checksums verified, a safe load path) predicts exactly what the model
predicted before it was stored, for each family (CHGNet file, MACE pickle, matgl folder)."""

from __future__ import annotations

from pathlib import Path

import gridfs
import numpy as np
import pytest
import torch
from test_mace_matgl_potentials import (  # noqa: F401 - fixtures
    build_mace,
    build_matgl,
    mace_file,
    matgl_folder,
    structures,
)

from pestle.potentials import POTENTIALS
from pestle.potentials.checkpoints import sha256_file
from pestle.potentials.chgnet import save_checkpoint
from pestle.stages.models import load_stored_model, resolve_model
from pestle.store import Store, StoreError


def assert_identical(before, after) -> None:
    for a, b in zip(before, after, strict=True):
        assert a.energy == b.energy
        np.testing.assert_array_equal(a.forces, b.forces)
        if a.stress is not None:
            np.testing.assert_array_equal(a.stress, b.stress)


def stored(store: Store, model_id: str, checkpoint: Path, potential: str, params: dict) -> None:
    assert store.models.put(
        model_id,
        checkpoint,
        {"family": potential, "potential": potential, "potential_params": params},
    )
    assert not store.models.put(model_id, checkpoint, {})  # a version is written once


def test_chgnet_version_round_trips(store: Store, tmp_path: Path, raw_db) -> None:
    base = POTENTIALS.build("chgnet", {"device": "cpu"})
    model = base.load_model()
    with torch.no_grad():  # a "fine-tuned" model: weights that differ from the wheel's
        for parameter in model.parameters():
            parameter.add_(
                1e-3 * torch.randn_like(parameter, generator=torch.Generator().manual_seed(1))
            )
    path = save_checkpoint(model, tmp_path / "tuned.pt", {"note": "test"})
    atoms = structures()
    tuned = POTENTIALS.build("chgnet", {"checkpoint": str(path), "device": "cpu",
                                        "checkpoint_sha256": sha256_file(path)})  # fmt: skip
    before = tuned.predict(atoms)
    stored(store, "model-chgnet-test", path, "chgnet", {"device": "cpu"})
    loaded = load_stored_model(store, "model-chgnet-test", tmp_path / "fetched")
    assert_identical(before, loaded.predict(atoms))
    assert loaded.describe()["checkpoint_sha256"] == sha256_file(path)

    # A tampered GridFS file is refused before anything is deserialised.
    doc = raw_db["models"].find_one({"_id": "model-chgnet-test"})
    fs = gridfs.GridFS(raw_db)
    fs.delete(doc["checkpoint"]["gridfs"])
    fs.put(b"not a model", _id=doc["checkpoint"]["gridfs"])
    with pytest.raises(StoreError, match="fails its sha256 check"):
        load_stored_model(store, "model-chgnet-test", tmp_path / "again")


def test_mace_version_round_trips(store: Store, mace_file: Path, tmp_path: Path) -> None:  # noqa: F811
    atoms = structures()
    before = build_mace(mace_file, default_dtype="float64").predict(atoms)
    stored(
        store, "model-mace-test", mace_file, "mace", {"device": "cpu", "default_dtype": "float64"}
    )
    loaded = load_stored_model(store, "model-mace-test", tmp_path)
    assert_identical(before, loaded.predict(atoms))


def test_matgl_folder_round_trips(store: Store, matgl_folder: Path, tmp_path: Path, raw_db) -> None:  # noqa: F811
    atoms = structures()
    # matgl's float32 scatter sums are not run-to-run reproducible on two CPU threads (seen:
    # 6e-11 eV/A between two loads of one folder); one thread makes the compute exact, so any
    # difference left is the registry's.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = build_matgl(matgl_folder).predict(atoms)
        stored(store, "model-matgl-test", matgl_folder, "matgl", {"device": "cpu"})
        doc = raw_db["models"].find_one({"_id": "model-matgl-test"})
        assert doc["checkpoint"]["archive"] == "tar"
        loaded = load_stored_model(store, "model-matgl-test", tmp_path)
        assert_identical(before, loaded.predict(atoms))
    finally:
        torch.set_num_threads(threads)
    # The same files archive to the same bytes: the checksum names the content.
    assert store.models.put("model-matgl-again", matgl_folder, {"family": "matgl"})
    again = raw_db["models"].find_one({"_id": "model-matgl-again"})
    assert again["checkpoint"]["sha256"] == doc["checkpoint"]["sha256"]


def test_model_names_resolve(store: Store, tmp_path: Path) -> None:
    assert resolve_model("chgnet:0.2.0", store, tmp_path).describe()["model"] == "0.2.0"
    with pytest.raises(ValueError, match="neither a stored model id nor a potential"):
        resolve_model("nonsense", store, tmp_path)
    with pytest.raises(StoreError, match="no model model-missing"):
        resolve_model("model-missing", store, tmp_path)
