"""The store against a real server over TCP."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from ase.build import bulk

from pestle.store import JOB_DONE, JOB_FAILED, JOB_QUEUED, Store, StoreError, mask_uri
from pestle.store.store import INLINE_ARRAY_LIMIT
from pestle.structures import fingerprint


def rattled_si(seed: int = 0, repeat: int = 1):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_schema_version_and_indexes(store: Store) -> None:
    assert store.meta.find_one({"_id": "schema"})["version"] == 1
    assert "chemical_system_1" in store.structures.index_information()


def test_structures_deduplicate_and_keep_first_provenance(store: Store) -> None:
    atoms = rattled_si()
    sid, new = store.add_structure(
        atoms, kind="candidate", provenance={"sampler": "rattle"}, run_id="a"
    )
    assert new
    permuted = atoms[::-1]  # same structure, other atom order
    sid2, new2 = store.add_structure(
        permuted, kind="candidate", provenance={"sampler": "strain"}, run_id="b"
    )
    assert sid2 == sid and not new2
    doc = store.structures.find_one({"_id": sid})
    assert doc["provenance"]["sampler"] == "rattle"
    assert sorted(doc["runs"]) == ["a", "b"]
    assert store.structures.count_documents({}) == 1
    back = store.get_atoms(sid)
    assert fingerprint(back) == sid
    np.testing.assert_allclose(back.positions, atoms.positions)


def test_label_written_once(store: Store) -> None:
    atoms = rattled_si()
    sid, _ = store.add_structure(atoms, kind="candidate", provenance={"sampler": "rattle"})
    forces = np.random.default_rng(0).normal(size=(len(atoms), 3))
    kwargs = dict(
        labeller="emt",
        level_of_theory={"code": "emt"},
        lot_hash="abc",
        energy=-1.0,
        forces=forces,
        stress=np.zeros(6),
    )
    assert store.put_label(sid, **kwargs)
    assert not store.put_label(sid, **kwargs)
    assert store.labels.count_documents({}) == 1
    [(labelled, structure, label)] = list(store.labelled_atoms())
    np.testing.assert_allclose(labelled.get_forces(), forces)
    assert labelled.get_potential_energy() == -1.0
    with pytest.raises(StoreError, match="forces have shape"):
        store.put_label(sid, **{**kwargs, "lot_hash": "other", "forces": forces[:2]})


def test_big_arrays_go_to_gridfs(store: Store) -> None:
    atoms = rattled_si(repeat=11)  # 10648 atoms: positions and forces exceed the inline limit
    assert len(atoms) * 3 > INLINE_ARRAY_LIMIT
    sid, _ = store.add_structure(atoms, kind="candidate", provenance={})
    doc = store.structures.find_one({"_id": sid})
    assert "gridfs" in doc["positions"]
    forces = np.ones((len(atoms), 3))
    store.put_label(
        sid, labeller="x", level_of_theory={}, lot_hash="h", energy=0.0, forces=forces, stress=None
    )
    label = store.labels.find_one()
    assert "gridfs" in label["forces"]
    np.testing.assert_allclose(store.get_atoms(sid).positions, atoms.positions)


def test_job_lifecycle_with_retries(store: Store) -> None:
    assert store.enqueue_job("j1", "label", {"x": 1}, max_attempts=2)
    assert not store.enqueue_job("j1", "label", {"x": 2})
    job = store.claim_job("j1", "w1", lease_seconds=60)
    assert job["attempts"] == 1 and job["payload"] == {"x": 1}
    assert store.claim_job("j1", "w2", lease_seconds=60) is None  # leased
    assert store.fail_job("j1", "w1", "boom", backoff_seconds=0) == JOB_QUEUED
    job = store.claim_job("j1", "w2", lease_seconds=60)
    assert job["attempts"] == 2
    assert store.fail_job("j1", "w2", "boom again", backoff_seconds=0) == JOB_FAILED
    assert store.claim_job("j1", "w3", lease_seconds=60) is None
    assert store.requeue_failed() == 1
    job = store.claim_job("j1", "w3", lease_seconds=60)
    assert store.finish_job("j1", "w3", {"label_id": "L"})
    assert store.jobs.find_one({"_id": "j1"})["state"] == JOB_DONE


def test_expired_lease_is_reclaimed_and_old_worker_cannot_finish(store: Store) -> None:
    store.enqueue_job("j2", "label", {})
    assert store.claim_job("j2", "dead", lease_seconds=-1)  # already expired
    taken = store.claim_job("j2", "alive", lease_seconds=60)
    assert taken["worker"] == "alive"
    assert not store.finish_job("j2", "dead", {})
    assert not store.renew_lease("j2", "dead", 60)
    assert store.finish_job("j2", "alive", {})


def test_concurrent_claims_give_one_winner(store: Store, mongo_uri: str) -> None:
    for i in range(20):
        store.enqueue_job(f"c{i}", "label", {})
    won: dict[str, list[str]] = {"a": [], "b": []}

    def claim_all(worker: str) -> None:
        other = Store(mongo_uri, store.db.name)
        for i in range(20):
            if other.claim_job(f"c{i}", worker, 60):
                won[worker].append(f"c{i}")
        other.close()

    threads = [threading.Thread(target=claim_all, args=(w,)) for w in won]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won["a"] + won["b"]) == sorted(f"c{i}" for i in range(20))
    assert not set(won["a"]) & set(won["b"])


def test_model_checkpoint_roundtrip_and_checksum(store: Store, tmp_path) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights" * 1000)
    assert store.put_model("m1", ckpt, {"family": "chgnet"})
    assert not store.put_model("m1", ckpt, {"family": "chgnet"})
    path, sha = store.fetch_checkpoint("m1", tmp_path / "out")
    assert path.read_bytes() == ckpt.read_bytes()
    # Corrupt the stored file: loading must refuse it.
    doc = store.models.find_one({"_id": "m1"})
    store.fs.delete(doc["checkpoint"]["gridfs"])
    new_id = store.fs.put(b"tampered", filename="model.pt")
    store.models.update_one({"_id": "m1"}, {"$set": {"checkpoint.gridfs": new_id}})
    with pytest.raises(StoreError, match="sha256"):
        store.fetch_checkpoint("m1", tmp_path / "out2")


def test_mask_uri_hides_password() -> None:
    assert (
        mask_uri("mongodb://alice:s3cret@db.example:27017/x")
        == "mongodb://alice:***@db.example:27017/x"
    )
    assert (
        mask_uri("mongodb://127.0.0.1:1/?directConnection=true")
        == "mongodb://127.0.0.1:1/?directConnection=true"
    )
