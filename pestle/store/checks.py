"""The ``checks`` collection: what pestle checked before trusting labels or models, keyed so
it is done once: the convergence gate of a labeller's settings per chemical system
(``convergence:<system>:<lot hash>``) and the reference equation of state of a seed at a
level of theory (``eos:<structure id>:<lot hash>``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymongo.collection import Collection

from pestle.store.errors import utcnow


def convergence_key(system: str, lot_hash: str) -> str:
    return f"convergence:{system}:{lot_hash}"


class CheckRepository:
    def __init__(self, collection: Collection) -> None:
        self._c = collection

    def ensure_indexes(self) -> None:
        self._c.create_index("kind")

    def put(self, key: str, kind: str, record: Mapping[str, Any]) -> None:
        self._c.replace_one(
            {"_id": key}, {**dict(record), "kind": kind, "at": utcnow()}, upsert=True
        )

    def get(self, key: str) -> dict[str, Any] | None:
        return self._c.find_one({"_id": key})

    def find(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = {} if kind is None else {"kind": kind}
        return list(self._c.find(query).sort("_id", 1))

    def count(self) -> int:
        return self._c.count_documents({})
