"""Where a command finds a campaign's files and store: the work directory and the store
settings of a config, or a bare work directory (``--work-dir``, ``$PESTLE_WORK_DIR``,
``./pestle-work``) whose embedded server holds the store.

Only what writes a campaign (``pestle run``, the daemon, ``pestle db start``) creates a store;
everything else opens an existing one (``open_store()``) and raises ``NoStoreError``, naming
the place it looked and how to start one, when there is none: a mistyped work directory or
database is an error, never a fresh empty store."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pestle.config import CampaignConfig, StoreSpec
from pestle.store import EmbeddedServer, Store, StoreError, mask_uri, resolve_uri

DEFAULT_WORK_DIR = "pestle-work"
WORK_DIR_ENV = "PESTLE_WORK_DIR"


class NoStoreError(StoreError):
    """There is no store where a command that only reads (or edits) one looked."""


@dataclass
class Workspace:
    work_dir: Path
    store_spec: StoreSpec = field(default_factory=StoreSpec)

    @classmethod
    def of(cls, config: CampaignConfig) -> Workspace:
        return cls(Path(config.work_dir), config.store)

    @classmethod
    def at(cls, work_dir: str | os.PathLike | None = None) -> Workspace:
        """``work_dir``, else ``$PESTLE_WORK_DIR``, else ``./pestle-work``."""
        return cls(Path(work_dir or os.environ.get(WORK_DIR_ENV, DEFAULT_WORK_DIR)))

    @property
    def embedded(self) -> bool:
        """Whether the store is pestle's embedded server (no URI configured anywhere)."""
        from pestle.store.uri import ENV_URI

        spec = self.store_spec
        return not (spec.uri or spec.uri_file or os.environ.get(ENV_URI))

    @property
    def server(self) -> EmbeddedServer:
        return EmbeddedServer(self.work_dir)

    def has_store(self) -> bool:
        """Whether there is a store to open: the embedded server's data folder exists, or
        the configured database holds a pestle schema. Starts and creates nothing."""
        if self.embedded:
            return self.server.data_dir.is_dir()
        return Store.exists(self.uri(start=False), self.store_spec.database)

    def uri(self, start: bool = True) -> str:
        """The store's URI (the embedded server is started if ``start`` and needed)."""
        spec = self.store_spec
        return resolve_uri(self.work_dir, spec.uri, spec.uri_file, start=start)

    def open_store(self, create: bool = False) -> Store:
        """The store; unless ``create``, only an existing one (its embedded server is
        started if it is stopped), else ``NoStoreError``."""
        if create:
            return Store(self.uri(start=True), self.store_spec.database)
        database = self.store_spec.database
        if self.embedded:
            if not self.server.data_dir.is_dir():
                where = self.work_dir.resolve()
                raise NoStoreError(
                    f"no pestle store in {where} (it has no db/ folder): start one with "
                    f"`pestle db start -w {where}` or `pestle run CONFIG`, or point to the "
                    "right one with --work-dir / --config"
                )
            return Store(self.uri(start=True), database)
        uri = self.uri(start=False)
        if not Store.exists(uri, database):
            raise NoStoreError(
                f"database {database!r} at {mask_uri(uri)} holds no pestle store: "
                "`pestle run CONFIG` creates it; check store.database and --config"
            )
        return Store(uri, database)
