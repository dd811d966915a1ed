"""The store against a real server over TCP."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from ase.build import bulk

from pestle.store import JOB_DONE, JOB_FAILED, JOB_QUEUED, Store, StoreError, mask_uri
from pestle.store.arrays import INLINE_ARRAY_LIMIT
from pestle.structures import fingerprint


def rattled_si(seed: int = 0, repeat: int = 1):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_schema_version_and_indexes(store: Store, raw_db) -> None:
    from pestle.store.migrations import SCHEMA_VERSION

    assert store.meta.schema_version() == SCHEMA_VERSION == 2
    assert "chemical_system_1" in raw_db["structures"].index_information()
    assert "role_1" in raw_db["labels"].index_information()


def test_structures_deduplicate_and_keep_first_provenance(store: Store) -> None:
    atoms = rattled_si()
    sid, new = store.structures.add(
        atoms, kind="candidate", provenance={"sampler": "rattle"}, run_id="a"
    )
    assert new
    permuted = atoms[::-1]  # same structure, other atom order
    sid2, new2 = store.structures.add(
        permuted, kind="candidate", provenance={"sampler": "strain"}, run_id="b"
    )
    assert sid2 == sid and not new2
    doc = store.structures.get(sid)
    assert doc.provenance.sampler == "rattle"
    assert sorted(doc.runs) == ["a", "b"]
    assert store.structures.count() == 1
    back = store.structures.atoms(sid)
    assert fingerprint(back) == sid
    np.testing.assert_allclose(back.positions, atoms.positions)


def test_label_written_once(store: Store) -> None:
    atoms = rattled_si()
    sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": "rattle"})
    forces = np.random.default_rng(0).normal(size=(len(atoms), 3))
    kwargs = dict(
        labeller="emt",
        level_of_theory={"code": "emt"},
        lot_hash="abc",
        energy=-1.0,
        forces=forces,
        stress=np.zeros(6),
    )
    assert store.labels.put(sid, **kwargs)
    assert not store.labels.put(sid, **kwargs)
    assert store.labels.count() == 1
    [stored] = list(store.labels.labelled())
    np.testing.assert_allclose(stored.atoms.get_forces(), forces)
    assert stored.atoms.get_potential_energy() == -1.0
    assert stored.atoms.info["structure_id"] == sid == stored.structure_id
    # A role decided before the label existed is written with it; an unknown one is refused.
    other = store.structures.add(rattled_si(seed=5), kind="candidate", provenance={})[0]
    assert store.labels.put(other, **{**kwargs, "role": "evaluation"})
    assert store.labels.roles([f"{other}-abc"]) == {f"{other}-abc": "evaluation"}
    with pytest.raises(ValueError, match="unknown label role"):
        store.labels.put(other, **{**kwargs, "lot_hash": "x", "role": "bogus"})
    with pytest.raises(StoreError, match="forces have shape"):
        store.labels.put(sid, **{**kwargs, "lot_hash": "other", "forces": forces[:2]})


def test_big_arrays_go_to_gridfs(store: Store, raw_db) -> None:
    atoms = rattled_si(repeat=11)  # 10648 atoms: positions and forces exceed the inline limit
    assert len(atoms) * 3 > INLINE_ARRAY_LIMIT
    sid, _ = store.structures.add(atoms, kind="candidate", provenance={})
    assert "gridfs" in raw_db["structures"].find_one({"_id": sid})["positions"]
    forces = np.ones((len(atoms), 3))
    store.labels.put(
        sid, labeller="x", level_of_theory={}, lot_hash="h", energy=0.0, forces=forces, stress=None
    )
    assert "gridfs" in raw_db["labels"].find_one()["forces"]
    np.testing.assert_allclose(store.structures.atoms(sid).positions, atoms.positions)
    [stored] = list(store.labels.labelled())
    np.testing.assert_allclose(stored.atoms.get_forces(), forces)


def test_job_lifecycle_with_retries(store: Store) -> None:
    assert store.jobs.enqueue("j1", "label", {"x": 1}, max_attempts=2)
    assert not store.jobs.enqueue("j1", "label", {"x": 2})
    job = store.jobs.claim("j1", "w1", lease_seconds=60)
    assert job.attempts == 1 and job.payload == {"x": 1}
    assert store.jobs.claim("j1", "w2", lease_seconds=60) is None  # leased
    assert store.jobs.fail("j1", "w1", "boom", backoff_seconds=0) == JOB_QUEUED
    job = store.jobs.claim("j1", "w2", lease_seconds=60)
    assert job.attempts == 2
    assert store.jobs.fail("j1", "w2", "boom again", backoff_seconds=0) == JOB_FAILED
    assert store.jobs.claim("j1", "w3", lease_seconds=60) is None
    assert store.jobs.requeue_failed() == 1
    job = store.jobs.claim("j1", "w3", lease_seconds=60)
    assert store.jobs.finish("j1", "w3", {"label_id": "L"})
    assert store.jobs.state("j1") == JOB_DONE


def test_expired_lease_is_reclaimed_and_old_worker_cannot_finish(store: Store) -> None:
    store.jobs.enqueue("j2", "label", {})
    assert store.jobs.claim("j2", "dead", lease_seconds=-1)  # already expired
    taken = store.jobs.claim("j2", "alive", lease_seconds=60)
    assert taken.worker == "alive"
    assert not store.jobs.finish("j2", "dead", {})
    assert not store.jobs.renew_lease("j2", "dead", 60)
    assert store.jobs.finish("j2", "alive", {})


def test_concurrent_claims_give_one_winner(store: Store, mongo_uri: str) -> None:
    for i in range(20):
        store.jobs.enqueue(f"c{i}", "label", {})
    won: dict[str, list[str]] = {"a": [], "b": []}

    def claim_all(worker: str) -> None:
        other = Store(mongo_uri, store.database)
        for i in range(20):
            if other.jobs.claim(f"c{i}", worker, 60):
                won[worker].append(f"c{i}")
        other.close()

    threads = [threading.Thread(target=claim_all, args=(w,)) for w in won]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won["a"] + won["b"]) == sorted(f"c{i}" for i in range(20))
    assert not set(won["a"]) & set(won["b"])


def test_model_checkpoint_roundtrip_and_checksum(store: Store, raw_db, tmp_path) -> None:
    import gridfs

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights" * 1000)
    assert store.models.put("m1", ckpt, {"family": "chgnet"})
    assert not store.models.put("m1", ckpt, {"family": "chgnet"})
    path, sha = store.models.fetch_checkpoint("m1", tmp_path / "out")
    assert path.read_bytes() == ckpt.read_bytes()
    # Corrupt the stored file: loading must refuse it.
    fs = gridfs.GridFS(raw_db)
    fs.delete(store.models.get("m1").checkpoint.gridfs)
    new_id = fs.put(b"tampered", filename="model.pt")
    raw_db["models"].update_one({"_id": "m1"}, {"$set": {"checkpoint.gridfs": new_id}})
    with pytest.raises(StoreError, match="sha256"):
        store.models.fetch_checkpoint("m1", tmp_path / "out2")


def test_mask_uri_hides_password() -> None:
    assert (
        mask_uri("mongodb://alice:s3cret@db.example:27017/x")
        == "mongodb://alice:***@db.example:27017/x"
    )
    assert (
        mask_uri("mongodb://127.0.0.1:1/?directConnection=true")
        == "mongodb://127.0.0.1:1/?directConnection=true"
    )


def test_a_version_1_store_is_migrated(mongo_uri: str, raw_db, database_name: str) -> None:
    """Version 1 kept a model's evaluations as ``evaluation.<key>`` and flat
    ``evaluation_cli-<hash>`` fields; opening the store moves them into one list."""
    raw_db["meta"].insert_one({"_id": "schema", "version": 1})
    metrics = {"F-Li": {"softening": {"slope": 0.9}, "force_mae": 0.1}}
    raw_db["models"].insert_one(
        {"_id": "model-old", "family": "chgnet", "evaluation": {"quick-abc": metrics},
         "evaluation_cli-0123456789": {"force_mae": 0.2}}
    )  # fmt: skip
    store = Store(mongo_uri, database_name)
    try:
        assert store.meta.schema_version() == 2
        doc = store.models.get("model-old")
        assert [(e.source, e.metrics) for e in doc.evaluations] == [
            ("quick-abc", metrics),
            ("cli", {"force_mae": 0.2}),
        ]
        raw = raw_db["models"].find_one({"_id": "model-old"})
        assert "evaluation" not in raw and "evaluation_cli-0123456789" not in raw
        # One place for evaluations from now on: the same source on the same labels replaces.
        store.models.record_evaluation("model-old", "cli", ["b", "a"], {"force_mae": 0.3})
        store.models.record_evaluation("model-old", "cli", ["a", "b"], {"force_mae": 0.25})
        assert [e.metrics for e in store.models.get("model-old").evaluations][-1] == {
            "force_mae": 0.25
        }
        assert len(store.models.get("model-old").evaluations) == 3
    finally:
        store.close()


def test_a_newer_store_is_refused(mongo_uri: str, raw_db, database_name: str) -> None:
    raw_db["meta"].insert_one({"_id": "schema", "version": 99})
    with pytest.raises(StoreError, match="newer than this pestle"):
        Store(mongo_uri, database_name)
