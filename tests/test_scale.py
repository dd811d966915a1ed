"""What keeps the engine's own cost flat per item (issue 11), against a real store server:
every query a campaign and the command line issue is served by an index (``explain``), long
id lists are asked in slices, cheap labels run several to a task with the same guarantees,
scoring gives the same scores on the workers as in the driver, the embedded server is used
without retryable writes, and an existing store gets new indexes when it is opened.

Timings stay in ``benchmarks/bench_engine_scale.py``, never here."""

from __future__ import annotations

import json
import threading

import pymongo
import yaml
from ase.build import bulk
from typer.testing import CliRunner

from pestle.labellers import LABELLERS, level_of_theory_hash
from pestle.store import NewStructure, Store, batches, embedded_uri, resolve_uri

EMT = {"name": "emt", "params": {}}


def rattled(symbol: str, a: float, seed: int, crystal: str = "fcc"):
    atoms = bulk(symbol, crystal, a=a, cubic=True)
    atoms.rattle(0.08, seed=seed)
    return atoms


# -- the embedded server's mode -------------------------------------------------------------
def test_embedded_server_is_used_without_retryable_writes(tmp_path, monkeypatch) -> None:
    assert embedded_uri("mongodb://127.0.0.1:5/?directConnection=true") == (
        "mongodb://127.0.0.1:5/?directConnection=true&retryWrites=false"
    )
    assert embedded_uri("mongodb://h:5") == "mongodb://h:5/?retryWrites=false"
    kept = "mongodb://h:5/?retryWrites=true"
    assert embedded_uri(kept) == kept
    # A MongoDB given by URI keeps the user's settings.
    monkeypatch.setenv("PESTLE_MONGODB_URI", "mongodb://db.example:27017/?w=majority")
    assert resolve_uri(tmp_path) == "mongodb://db.example:27017/?w=majority"


def test_an_existing_store_gets_new_indexes_when_opened(mongo_uri, database_name, raw_db) -> None:
    from pestle.store.migrations import INDEXES_VERSION, SCHEMA_VERSION

    # A store written before the index version was recorded: schema current, no indexes.
    raw_db["meta"].insert_one({"_id": "schema", "version": SCHEMA_VERSION})
    raw_db["structures"].insert_one({"_id": "x", "kind": "seed"})
    store = Store(mongo_uri, database_name)
    try:
        assert "runs_1_kind_1_chemical_system_1" in raw_db["structures"].index_information()
        assert "lot_hash_1_chemical_system_1" in raw_db["labels"].index_information()
        assert raw_db["meta"].find_one({"_id": "schema"})["indexes"] == INDEXES_VERSION
        assert store.meta.schema_version() == SCHEMA_VERSION
    finally:
        store.drop()
        store.close()


# -- long id lists ----------------------------------------------------------------------------
def test_long_in_filters_are_asked_in_slices_with_the_same_answer(store: Store, raw_db) -> None:
    docs = [{"_id": f"s{i:04d}", "group": i % 7, "tags": ["a", "b"] if i % 2 else ["a"]}
            for i in range(300)]  # fmt: skip
    raw_db["structures"].insert_many(docs)
    ids = [f"s{i:04d}" for i in range(299, -1, -3)] + ["missing"]
    collection = raw_db["structures"]
    expected = sorted((d for d in docs if d["_id"] in ids), key=lambda d: d["_id"])
    assert list(batches.find(collection, {"_id": {"$in": ids}})) == expected
    # By another field, sorted by id; in an $and (flattened: no top-level operator is sent).
    query = {"$and": [{"group": {"$in": list(range(7)) * 10}}, {"_id": {"$in": ids}}]}
    assert batches.flatten(query) == {"group": {"$in": list(range(7)) * 10},
                                      "_id": {"$in": ids}}  # fmt: skip
    assert list(batches.find(collection, query)) == expected
    # An array field: a document matching two slices comes once.
    tags = ["a", *[f"t{i}" for i in range(40)], "b"]
    assert len(list(batches.find(collection, {"tags": {"$in": tags}}, sort=None))) == 300
    assert store.structures.ids({"_id": {"$in": ids}}) == [d["_id"] for d in expected]


# -- cheap labels several to a task ---------------------------------------------------------
def enqueue(store: Store, atoms_list) -> list[str]:
    lot_hash = level_of_theory_hash(LABELLERS.build("emt", {}))
    added = store.structures.add_many(
        [NewStructure(a, "candidate", {"sampler": "test"}) for a in atoms_list]
    )
    jobs = [(f"label-{sid}-{lot_hash}", {"structure_id": sid, "labeller": EMT,
                                         "lot_hash": lot_hash}) for sid, _ in added]  # fmt: skip
    store.jobs.enqueue_many(jobs, "label", max_attempts=2)
    return [job_id for job_id, _ in jobs]


def prepared(store: Store, job_ids: list[str]) -> list[tuple[str, dict | None]]:
    from pestle.dispatch.labelling import STRUCTURE_FIELDS

    jobs = store.jobs.to_dispatch(job_ids)
    raw = store.structures.raw_many([j.payload["structure_id"] for j in jobs.values()],
                                    STRUCTURE_FIELDS)  # fmt: skip
    return [(j, {"payload": jobs[j].payload, "attempts": jobs[j].attempts,
                 "structure": raw[jobs[j].payload["structure_id"]]}) for j in job_ids]  # fmt: skip


def test_racing_batches_compute_each_label_once(store: Store, mongo_uri, tmp_path, raw_db) -> None:
    from pestle.dispatch.labelling import run_label_batch

    cells = [rattled("Cu", 3.61, seed) for seed in range(6)] + [rattled("Si", 5.43, 0, "diamond")]
    job_ids = enqueue(store, cells)
    items = prepared(store, job_ids)
    results: list[list[dict]] = []

    def attempt() -> None:
        results.append(run_label_batch(mongo_uri, store.database, str(tmp_path), 60.0, items))

    threads = [threading.Thread(target=attempt) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each job was claimed by one batch; EMT labels Cu, and fails Si (no parameters) alone.
    for index, job_id in enumerate(job_ids):
        claimed = [r[index] for r in results if r[index]["claimed"]]
        assert len(claimed) == 1, (job_id, claimed)
        job = raw_db["jobs"].find_one({"_id": job_id})
        assert job["attempts"] == 1
        if index < 6:
            assert claimed[0]["state"] == job["state"] == "done"
            assert job["result"]["stored"] is True
        else:
            assert claimed[0]["state"] == job["state"] == "failed"
            assert "LabelError" in job["error"]
    assert raw_db["labels"].count_documents({}) == 6
    # Taken again after a crash (the lease lapsed): the stored label is not recomputed.
    raw_db["jobs"].update_one({"_id": job_ids[0]}, {"$set": {"state": "queued"}})
    again = run_label_batch(mongo_uri, store.database, str(tmp_path), 60.0,
                            prepared(store, job_ids[:2]))  # fmt: skip
    assert again[0]["state"] == "done" and again[1]["claimed"] is False
    job = raw_db["jobs"].find_one({"_id": job_ids[0]})
    assert job["attempts"] == 2 and job["result"] == {"label_id": job["result"]["label_id"],
                                                      "stored": False}  # fmt: skip
    assert raw_db["labels"].count_documents({}) == 6


def test_batch_size_follows_the_measured_label_time() -> None:
    from pestle.dispatch.labelling import MAX_BATCH, batch_size

    assert batch_size([]) == 1
    assert batch_size([30.0, 40.0]) == 1  # DFT: one job per task
    assert batch_size([0.005, 0.006, 0.007]) == MAX_BATCH
    assert batch_size([0.05, 0.05]) == 4


# -- scoring ----------------------------------------------------------------------------------
def test_scores_on_the_workers_equal_scores_in_the_driver(store: Store, mongo_uri) -> None:
    from pestle.config import DaskSpec
    from pestle.dispatch.cluster import make_client
    from pestle.dispatch.scoring import score_on_workers
    from pestle.potentials import POTENTIALS
    from pestle.scoring import score_batch

    cells = [rattled("Cu", 3.61, seed) for seed in range(40)]
    ids = sorted(sid for sid, _ in store.structures.add_many(
        [NewStructure(a, "candidate", {"sampler": "test"}) for a in cells]))  # fmt: skip
    chunks = [ids[:32], ids[32:]]
    committee = [{"name": "emt", "params": {}}]
    with make_client(DaskSpec(n_workers=2)) as client:
        scored = score_on_workers(client, mongo_uri, store.database, chunks, EMT, committee,
                                  "workers", False, per_task=1)  # fmt: skip
    assert scored == 40
    emt = POTENTIALS.build("emt", {})
    atoms = store.structures.atoms_many(ids)
    expected = {}
    for chunk in chunks:
        scores, _ = score_batch([atoms[i] for i in chunk], emt, [emt])
        expected.update(zip(chunk, scores, strict=True))
    docs = store.structures.docs_many(ids, ["scores"])
    assert {i: docs[i].scores["workers"] for i in ids} == expected


# -- every query served by an index ----------------------------------------------------------
class Commands(pymongo.monitoring.CommandListener):
    """The filters of every read and write sent while ``active``."""

    KINDS = {"find": ("filter",), "count": ("query",), "distinct": ("query",),
             "findAndModify": ("query",), "aggregate": (), "update": (), "delete": ()}  # fmt: skip

    def __init__(self) -> None:
        self.active = False
        self.seen: list[tuple[str, str, dict, dict | None]] = []  # (collection, kind, filter, sort)

    def started(self, event) -> None:
        if not self.active or event.command_name not in self.KINDS:
            return
        command = event.command
        collection = command[event.command_name]
        if event.command_name == "update":
            filters = [(u["q"], None) for u in command.get("updates", [])]
        elif event.command_name == "delete":
            filters = [(d["q"], None) for d in command.get("deletes", [])]
        elif event.command_name == "aggregate":
            first = (command.get("pipeline") or [{}])[0]
            filters = [(first.get("$match", {}), None)]
        elif event.command_name == "count":
            if "query" not in command:
                return  # estimated_document_count: no filter
            filters = [(command["query"], None)]
        else:
            field = self.KINDS[event.command_name][0]
            filters = [(command.get(field, {}), command.get("sort"))]
        for query, sort in filters:
            self.seen.append((collection, event.command_name, json.loads(json.dumps(
                query, default=str)), dict(sort) if sort else None))  # fmt: skip

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


def shape(value):
    """A filter with its values blanked: one explain per kind of query."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return ["list"]
    return type(value).__name__


def indexed(db, collection: str, query: dict, sort: dict | None) -> bool:
    """Whether the server answers ``query`` from an index: its explain shows an IXSCAN.
    secantusd-py's explain leaves out one path its executor takes (storage.py,
    ``_try_index_id_keys``): a filter without top-level operators is looked up by its first
    clause that an index serves alone, then matched in full; that clause is explained then.
    (mongod's explain reports such plans itself.) A write is explained as the find of its
    filter: the server picks its documents the same way."""
    command = {"find": collection, "filter": query, **({"sort": sort} if sort else {})}
    plan = json.dumps(db.command("explain", command)["queryPlanner"]["winningPlan"])
    if '"IXSCAN"' in plan or '"IDHACK"' in plan or '"EXPRESS' in plan:
        return True
    if query and not any(k.startswith("$") for k in query) and len(query) > 1:
        return any(indexed(db, collection, {field: clause}, None)
                   for field, clause in query.items())  # fmt: skip
    return False


# Queries that read a whole collection, and why.
WHOLE_COLLECTION = {
    # One document per run or round; which of them recorded a stage (reports).
    ("runs", "stages"),
    # A unique-prefix lookup of `pestle explain` (a whole id is a point lookup): the
    # embedded server answers no range or prefix of _id from its index.
    ("structures", "_id", "$regex"),
    # Labels by their elements (`--elements`): labels carry only the chemical system, and
    # no index answers a pattern inside it.
    ("labels", "chemical_system", "$regex"),
}


def exempt(collection: str, query: dict) -> bool:
    for rule in WHOLE_COLLECTION:
        if rule[0] != collection:
            continue
        for field, clause in query.items():
            if not field.startswith(rule[1]):
                continue
            if len(rule) == 2 or (isinstance(clause, dict) and rule[2] in clause):
                return True
    return False


def test_every_query_of_a_campaign_and_the_cli_is_served_by_an_index(
    tmp_path, mongo_uri, database_name
) -> None:
    from pestle.cli import app

    listener = Commands()
    pymongo.monitoring.register(listener)
    config = {
        "name": "indexed", "seed": 2, "work_dir": str(tmp_path / "work"),
        "seeds": [{"name": "Cu", "bulk": "Cu", "crystalstructure": "fcc", "a": 3.61},
                  {"name": "Ni", "bulk": "Ni", "crystalstructure": "fcc", "a": 3.52}],
        "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05, 0.1],
                                                   "per_amplitude": 10}}],
        "potential": {"name": "emt"}, "labeller": {"name": "emt"},
        "selection": {"per_system": 4},
        "evaluation": {"holdout_fraction": 0.25, "evaluation_set": {"per_system": 3}},
        "finetune": {"enabled": False}, "convergence": {"enabled": False},
        "eos": {"enabled": False}, "store": {"database": database_name},
        "dask": {"n_workers": 1},
    }  # fmt: skip
    path = tmp_path / "indexed.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    env = {"PESTLE_MONGODB_URI": mongo_uri, "COLUMNS": "200"}
    listener.active = True
    try:
        result = runner.invoke(app, ["run", str(path)], env=env)
        assert result.exit_code == 0, result.output
        with Store(mongo_uri, database_name) as store:
            sid = next(iter(store.structures.ids({"kind": "candidate"})))
            job = store.jobs.find(kind="label")[0]
            # What a worker asks of the store, in this process.
            from pestle.dispatch.labelling import run_label_job

            store.jobs.enqueue("label-extra", "label", {**job.payload, "structure_id": sid})
            run_label_job(mongo_uri, database_name, "label-extra", str(tmp_path / "jobs"))
        for args in (
            ["status", "-c", str(path)],
            ["jobs", "-c", str(path)],
            ["jobs", "-c", str(path), "show", job.id],
            ["models", "-c", str(path)],
            ["explain", "-c", str(path), sid],
            ["explain", "-c", str(path), sid[:10]],
            ["query", "-c", str(path), "--system", "Cu"],
            ["query", "-c", str(path), "--sampler", "rattle", "--formula", "Cu"],
            ["query", "-c", str(path), "--collection", "labels", "--force-min", "0.1"],
            ["query", "-c", str(path), "--collection", "labels", "--energy-max", "1.0"],
            ["query", "-c", str(path), "--elements", "Cu"],
            ["query", "-c", str(path), "--elements", "Cu,Ni", "--limit", "3"],
            ["query", "-c", str(path), "--collection", "labels", "--elements", "Ni"],
            ["export", "-c", str(path), "--system", "Cu", "-o", str(tmp_path / "out.xyz")],
        ):
            result = runner.invoke(app, args, env=env)
            assert result.exit_code == 0, (args, result.output)
    finally:
        listener.active = False
    client = pymongo.MongoClient(mongo_uri)
    db = client[database_name]
    unserved, checked = [], set()
    try:
        for collection, kind, query, sort in listener.seen:
            if collection in ("meta", "fs.files", "fs.chunks") or collection.startswith("system"):
                continue  # a handful of documents by _id (meta); GridFS's own indexes
            key = json.dumps([collection, shape(query), sort], sort_keys=True)
            if key in checked:
                continue
            checked.add(key)
            if exempt(collection, query) or (not query and kind == "find" and sort == {"_id": 1}):
                continue  # exempt; or a listing of every document, asked for (`pestle jobs`)
            if not indexed(db, collection, query, sort):
                unserved.append((collection, kind, query, sort))
    finally:
        client.drop_database(database_name)
        client.close()
    assert len(checked) > 30  # the listener saw the campaign's and the commands' queries
    assert not unserved, "\n".join(map(str, unserved))
