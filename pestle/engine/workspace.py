"""Where a command finds a campaign's files and store: the work directory and the store
settings of a config, or a bare work directory (``--work-dir``, ``$PESTLE_WORK_DIR``,
``./pestle-work``) whose embedded server holds the store."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pestle.config import CampaignConfig, StoreSpec
from pestle.store import EmbeddedServer, Store, resolve_uri

DEFAULT_WORK_DIR = "pestle-work"
WORK_DIR_ENV = "PESTLE_WORK_DIR"


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

    def uri(self, start: bool = True) -> str:
        """The store's URI (the embedded server is started if ``start`` and needed)."""
        spec = self.store_spec
        return resolve_uri(self.work_dir, spec.uri, spec.uri_file, start=start)

    def open_store(self, start: bool = True) -> Store:
        return Store(self.uri(start=start), self.store_spec.database)
