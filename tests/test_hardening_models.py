"""Issue 15, defect 1: no code runs from the model registry. Whoever can write to the store
can write a checkpoint and its matching sha256; pestle must not unpickle it. Each attack
below would create a marker file if its payload ran; the tests show it never does, and that
``pestle models trust`` is the explicit way to accept a checkpoint that needs unpickling."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import gridfs
import pytest
import torch
from ase.build import bulk
from ase.io import write
from test_mace_matgl_potentials import mace_file  # noqa: F401 - fixture
from typer.testing import CliRunner

from pestle.cli import app
from pestle.potentials.chgnet import save_checkpoint
from pestle.stages.models import UntrustedModelError, load_stored_model
from pestle.store import Store
from pestle.store.signing import load_signer


class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": {"state_dict": {}, "model_args": Payload(marker)}}, path)
    return path


def evil_matgl_folder(folder: Path, marker: Path) -> Path:
    """A matgl folder whose model.pt names subprocess.Popen as a constructor argument: matgl
    reads it with weights_only=True, then imports and calls what it names."""
    from matgl.apps.pes import Potential

    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({
        "@class": "Potential", "@module": "matgl.apps.pes",
        "@model_version": getattr(Potential, "__version__", 0), "metadata": {}, "kwargs": {},
    }))  # fmt: skip
    torch.save({"model": {"@module": "subprocess", "@class": "Popen", "@model_version": 0,
                          "init_args": {"args": ["touch", str(marker)]}}},
               folder / "model.pt")  # fmt: skip
    torch.save({}, folder / "state.pt")
    return folder


def plant(raw_db, model_id: str, checkpoint: Path, potential: str, **doc) -> None:
    """What an attacker with write access to the store does: the bytes in GridFS and a model
    document whose sha256 matches them (no key, so no valid signature)."""
    from pestle.store.models import folder_tar

    payload = folder_tar(checkpoint) if checkpoint.is_dir() else checkpoint.read_bytes()
    sha256 = hashlib.sha256(payload).hexdigest()
    file_id = gridfs.GridFS(raw_db).put(payload, filename=checkpoint.name, sha256=sha256)
    raw_db["models"].insert_one({
        "_id": model_id, "family": potential, "potential": potential,
        "potential_params": {"device": "cpu"},
        "checkpoint": {"gridfs": file_id, "filename": checkpoint.name,
                       "archive": "tar" if checkpoint.is_dir() else None,
                       "sha256": sha256, "bytes": len(payload)},
        **doc,
    })  # fmt: skip


def test_a_planted_chgnet_pickle_is_not_unpickled(store: Store, raw_db, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    plant(raw_db, "model-evil", evil_checkpoint(tmp_path / "evil.pt", marker), "chgnet")
    # Before: sha256 matched, so chgnet fell back to torch.load(weights_only=False).
    potential = load_stored_model(store, "model-evil", tmp_path / "fetched")
    with pytest.raises(ValueError, match="models trust"):
        potential.load_model()
    assert not marker.exists()


def test_a_planted_mace_pickle_is_refused_before_loading(
    store: Store, raw_db, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    plant(raw_db, "model-evil-mace", evil_checkpoint(tmp_path / "evil.model", marker), "mace",
          potential_params={"device": "cpu", "trust_model_file": True})  # fmt: skip
    with pytest.raises(UntrustedModelError, match="it is not signed.*pestle models trust"):
        load_stored_model(store, "model-evil-mace", tmp_path / "fetched").predict(
            [bulk("Cu", "fcc", a=3.6)]
        )
    assert not marker.exists()


def test_forged_and_replayed_signatures_are_refused(store: Store, raw_db, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    genuine = save_checkpoint_like(tmp_path)
    assert store.models.put("model-genuine", genuine, {"family": "mace", "potential": "mace"})
    signature = raw_db["models"].find_one({"_id": "model-genuine"})["checkpoint"]["signature"]
    assert signature["key"] == load_signer().fingerprint
    evil = evil_checkpoint(tmp_path / "evil.model", marker)
    plant(raw_db, "model-replayed", evil, "mace")
    raw_db["models"].update_one({"_id": "model-replayed"},
                                {"$set": {"checkpoint.signature": signature}})  # fmt: skip
    with pytest.raises(UntrustedModelError, match="does not match"):
        load_stored_model(store, "model-replayed", tmp_path / "a")
    plant(raw_db, "model-forged", evil, "mace")
    forged = {**signature, "hmac": hashlib.sha256(b"guess").hexdigest()}
    raw_db["models"].update_one({"_id": "model-forged"},
                                {"$set": {"checkpoint.signature": forged}})  # fmt: skip
    with pytest.raises(UntrustedModelError, match="does not match"):
        load_stored_model(store, "model-forged", tmp_path / "b")
    assert not marker.exists()


def save_checkpoint_like(tmp_path: Path) -> Path:
    path = tmp_path / "genuine.model"
    path.write_bytes(b"bytes pestle itself stored")
    return path


def test_a_matgl_folder_naming_foreign_classes_is_refused(
    store: Store, raw_db, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    plant(raw_db, "model-evil-matgl", evil_matgl_folder(tmp_path / "evil", marker), "matgl")
    potential = load_stored_model(store, "model-evil-matgl", tmp_path / "fetched")
    with pytest.raises(ValueError, match="subprocess.Popen, not a matgl model class"):
        potential.load_model()
    time.sleep(1)  # Popen would return before its command ran
    assert not marker.exists()


def evaluate_on_one_structure(model_id: str, store: Store, tmp_path: Path):
    """`pestle evaluate MODEL -d data.extxyz` on one EMT-labelled Cu cell, with a config
    naming the test's database (the store's URI in PESTLE_MONGODB_URI)."""
    data = tmp_path / "data.extxyz"
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = __import__("ase.calculators.emt", fromlist=["EMT"]).EMT()
    atoms.get_forces()
    write(data, [atoms])
    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: t\nseeds: [{{bulk: Cu}}]\nsamplers: [{{name: rattle}}]\n"
        f"store: {{database: {store.database}}}\n"
    )
    return CliRunner().invoke(app, ["evaluate", model_id, "-d", str(data), "-c", str(config)])


def test_evaluate_refuses_a_planted_model_with_a_message(
    store: Store, raw_db, tmp_path: Path, mongo_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    plant(raw_db, "model-evil-mace", evil_checkpoint(tmp_path / "evil.model", marker), "mace")
    monkeypatch.setenv("PESTLE_MONGODB_URI", mongo_uri)
    result = evaluate_on_one_structure("model-evil-mace", store, tmp_path)
    assert result.exit_code == 3, result.output
    assert "is refused" in result.output and "pestle models trust" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not marker.exists()


def test_models_trust_is_the_explicit_way_in(
    store: Store,
    raw_db,
    tmp_path: Path,
    mace_file: Path,  # noqa: F811
    mongo_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A benign MACE model stored without a signature (as before this change) is refused,
    then loads once `pestle models trust` has signed it; the trust is recorded."""
    plant(raw_db, "model-old", mace_file, "mace")
    with pytest.raises(UntrustedModelError):
        load_stored_model(store, "model-old", tmp_path / "a")
    monkeypatch.setenv("PESTLE_MONGODB_URI", mongo_uri)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: t\nseeds: [{{bulk: Cu}}]\nsamplers: [{{name: rattle}}]\n"
        f"store: {{database: {store.database}}}\n"
    )
    wrong = CliRunner().invoke(app, ["models", "trust", "model-old", "--sha256", "0" * 64,
                                     "-c", str(config)])  # fmt: skip
    assert wrong.exit_code == 3 and "not signed" in wrong.output
    done = CliRunner().invoke(app, ["models", "trust", "model-old", "--note", "from the old",
                                    "-c", str(config)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "now trusted" in done.output
    doc = raw_db["models"].find_one({"_id": "model-old"})
    assert doc["trusted"][0]["note"] == "from the old" and doc["trusted"][0]["by"]
    loaded = load_stored_model(store, "model-old", tmp_path / "b")
    assert loaded.predict([bulk("Si", "diamond", a=5.43)])[0].forces.shape == (2, 3)


def test_a_trained_chgnet_version_loads_as_tensors_without_its_signature(
    store: Store, raw_db, tmp_path: Path
) -> None:
    """pestle's own checkpoints are plain data: one stored before signatures still loads."""
    from pestle.potentials import POTENTIALS

    model = POTENTIALS.build("chgnet", {"device": "cpu"}).load_model()
    path = save_checkpoint(model, tmp_path / "tuned.pt", {"note": "test"})
    plant(raw_db, "model-plain", path, "chgnet")
    potential = load_stored_model(store, "model-plain", tmp_path / "fetched")
    assert "checkpoint_sha256" not in potential.params.model_fields_set
    assert len(potential.predict([bulk("Si", "diamond", a=5.43)])) == 1


def test_a_checkpoint_missing_a_chunk_is_a_message(
    store: Store, raw_db, tmp_path: Path, mongo_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GridFS chunk lost from the store (CorruptGridFile) ends `pestle evaluate` with a
    message naming the model, not a traceback; the model document stays."""
    checkpoint = tmp_path / "big.model"
    checkpoint.write_bytes(os.urandom(600_000))  # three GridFS chunks of 255 kB
    store.models.put("model-torn", checkpoint, {"family": "chgnet", "potential": "chgnet"})
    assert raw_db["fs.chunks"].delete_one({"n": 1}).deleted_count == 1
    monkeypatch.setenv("PESTLE_MONGODB_URI", mongo_uri)
    result = evaluate_on_one_structure("model-torn", store, tmp_path)
    assert result.exit_code == 3, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = " ".join(result.output.split())
    assert "checkpoint of model model-torn is missing or incomplete in the store" in text
    assert "Traceback" not in result.output
    assert raw_db["models"].count_documents({"_id": "model-torn"}) == 1
