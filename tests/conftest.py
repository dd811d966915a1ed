"""Shared fixtures. The store is always a real server over TCP: by default a fresh
``secantusd-py`` on a free port in a temporary folder (started by pestle's own embedded-server
code), or any MongoDB whose URI is in ``PESTLE_TEST_MONGODB_URI``."""

from __future__ import annotations

import os
import uuid

import pytest

from pestle.store import EmbeddedServer, Store
from pestle.store.signing import KEY_FILE_ENV

TEST_URI_ENV = "PESTLE_TEST_MONGODB_URI"


@pytest.fixture(scope="session", autouse=True)
def model_signing_key(tmp_path_factory: pytest.TempPathFactory):
    """The tests' own model-signing key (never the user's ~/.config one); set in the
    environment so that Dask workers and pestle subprocesses sign and verify with it."""
    before = os.environ.get(KEY_FILE_ENV)
    path = tmp_path_factory.mktemp("keys") / "model-signing.key"
    os.environ[KEY_FILE_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(KEY_FILE_ENV, None)
    else:
        os.environ[KEY_FILE_ENV] = before


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = os.environ.get(TEST_URI_ENV)
    if uri:
        yield uri
        return
    server = EmbeddedServer(tmp_path_factory.mktemp("mongo"))
    state = server.ensure_running()
    yield state.uri
    server.stop()


@pytest.fixture
def database_name() -> str:
    return f"pestle_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(mongo_uri: str, database_name: str) -> Store:
    store = Store(mongo_uri, database_name)
    yield store
    store.drop()
    store.close()


@pytest.fixture
def raw_db(mongo_uri: str, database_name: str):
    """The store's database through plain pymongo: for a test to look at (or tamper with)
    what is stored beneath the repositories."""
    import pymongo

    client = pymongo.MongoClient(mongo_uri, tz_aware=True)
    yield client[database_name]
    client.close()
