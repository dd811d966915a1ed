"""The ``meta`` collection: the schema version, the daemon's lease on the store, and the
daemon's position in each campaign."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from pestle.store.documents import CampaignState
from pestle.store.errors import StoreError, as_utc, utcnow
from pestle.store.server import pid_alive

SCHEMA = "schema"
DAEMON_LEASE = "daemon-lease"
CAMPAIGN_PREFIX = "daemon:"


class MetaRepository:
    def __init__(self, collection: Collection) -> None:
        self._c = collection

    # -- schema -------------------------------------------------------------------------
    def schema_version(self) -> int | None:
        return self.schema_state()[0]

    def schema_state(self) -> tuple[int | None, int]:
        """(schema version or None for a new store, version of the indexes created)."""
        doc = self._c.find_one({"_id": SCHEMA})
        if doc is None:
            return None, 0
        return int(doc.get("version", 0)), int(doc.get("indexes", 0))

    def set_indexes_version(self, version: int) -> None:
        self._c.update_one({"_id": SCHEMA}, {"$set": {"indexes": version}}, upsert=True)

    def set_schema_version(self, version: int) -> None:
        self._c.update_one(
            {"_id": SCHEMA}, {"$set": {"version": version, "updated_at": utcnow()}}, upsert=True
        )

    # -- the daemon's lease -------------------------------------------------------------
    def acquire_daemon_lease(
        self, owner: str, lease_seconds: float, info: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Take the store's single daemon lease, or raise StoreError naming its holder.

        The lease is free when absent, expired, held by ``owner``, or held by a process on
        this host that no longer exists (a SIGKILLed daemon needs no wait for its lease)."""
        now = utcnow()
        held = self._c.find_one({"_id": DAEMON_LEASE})
        if held is not None and held.get("owner") != owner:
            expires = as_utc(held.get("expires_at"))
            dead = held.get("host") == socket.gethostname() and not pid_alive(
                int(held.get("pid", 0))
            )
            if expires is not None and expires > now and not dead:
                raise StoreError(
                    f"another pestle daemon holds this store: pid {held.get('pid')} on "
                    f"{held.get('host')} (lease until {expires:%Y-%m-%d %H:%M:%S} UTC)"
                )
        fields = {**dict(info), "owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                  "expires_at": now + timedelta(seconds=lease_seconds), "heartbeat_at": now}  # fmt: skip
        match: dict[str, Any] = {"_id": DAEMON_LEASE}
        if held is not None:
            # Compare-and-swap on what we read: two daemons starting at once cannot both win.
            match["owner"] = held.get("owner")
            match["heartbeat_at"] = held.get("heartbeat_at")
        try:
            result = self._c.update_one(
                match, {"$set": {**fields, "acquired_at": now}}, upsert=held is None
            )
        except DuplicateKeyError:
            result = None
        if result is None or (result.matched_count == 0 and result.upserted_id is None):
            raise StoreError("another pestle daemon took this store's lease at the same moment")
        return self._c.find_one({"_id": DAEMON_LEASE})

    def renew_daemon_lease(self, owner: str, lease_seconds: float) -> bool:
        now = utcnow()
        result = self._c.update_one(
            {"_id": DAEMON_LEASE, "owner": owner},
            {"$set": {"expires_at": now + timedelta(seconds=lease_seconds), "heartbeat_at": now}},
        )
        return result.matched_count == 1

    def release_daemon_lease(self, owner: str) -> None:
        self._c.delete_one({"_id": DAEMON_LEASE, "owner": owner})

    def daemon_lease(self) -> dict[str, Any] | None:
        return self._c.find_one({"_id": DAEMON_LEASE})

    # -- the daemon's position per campaign ---------------------------------------------
    def campaign_state(self, campaign: str) -> CampaignState:
        doc = self._c.find_one({"_id": CAMPAIGN_PREFIX + campaign})
        return CampaignState.model_validate(doc or {"_id": CAMPAIGN_PREFIX + campaign})

    def save_campaign_state(self, campaign: str, fields: Mapping[str, Any]) -> None:
        self._c.update_one({"_id": CAMPAIGN_PREFIX + campaign}, {"$set": dict(fields)}, upsert=True)

    def campaign_states(self) -> dict[str, CampaignState]:
        return {
            doc["_id"].removeprefix(CAMPAIGN_PREFIX): CampaignState.model_validate(doc)
            for doc in self._c.find({"_id": {"$regex": f"^{CAMPAIGN_PREFIX}"}}).sort("_id", 1)
        }
