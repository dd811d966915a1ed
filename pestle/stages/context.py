"""What every stage of one pass shares: the config, the store, the run's identity and record,
the Dask client, and the plugins, each built once per pass (potential, committee, labeller
and its level-of-theory hash, selector, samplers)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pestle.config import CampaignConfig
from pestle.labellers import LABELLERS, Labeller
from pestle.plugins import PluginSpec
from pestle.potentials import POTENTIALS, Potential
from pestle.provenance import code_versions
from pestle.stages.seed import SeedStructure, seed_from_object
from pestle.store import Store, label_id, mask_uri
from pestle.store.uri import redact
from pestle.structures import fingerprint, settings_hash

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def stable_seed(*parts: object) -> int:
    """A 63-bit integer seed from any parts, the same in every process and Python version."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def config_fingerprint(config: CampaignConfig) -> str:
    """Hash of what determines the science of a run (not where it is stored or dispatched)."""
    content = config.model_dump(
        mode="json", exclude={"store", "dask", "daemon", "work_dir", "source", "limits"}
    )
    return settings_hash(content)


def run_id_for(config: CampaignConfig, extra_seed_ids: list[str] | None = None) -> str:
    digest = config_fingerprint(config)
    if extra_seed_ids:  # seeds given as Python objects are part of the run's science too
        digest = settings_hash({"config": digest, "seeds": sorted(extra_seed_ids)})
    return f"{config.name}-{digest[:10]}"


@dataclass
class Labelling:
    """The labeller of one chemical system, its spec (what a job carries to a worker), level
    of theory and that level's hash (which keys its labels)."""

    spec: PluginSpec
    labeller: Labeller
    level_of_theory: dict[str, Any]
    lot_hash: str


@dataclass
class Round:
    """A daemon round: its index (fresh random streams), the stored model that scores (the
    promoted one), the chemical systems still open and the labels per system it may ask for."""

    index: int
    model_id: str | None = None
    systems: set[str] | None = None
    per_system: int = 2


@dataclass
class RunContext:
    """One pass over stages. ``outputs`` holds what earlier stages of this pass produced;
    ``record``/``recorded`` keep each stage's outcome in the run document, which is what lets
    a killed pass resume (a stage may reuse what it recorded before)."""

    config: CampaignConfig
    store: Store
    store_uri: str
    client: Any = None
    progress: Progress = lambda stage, done, total: None  # noqa: E731
    seeds: list[Any] = field(default_factory=list)  # ase.Atoms / pymatgen Structure objects
    round: Round | None = None
    suffix: str | None = None  # e.g. "t1a2b3c4d" for a daemon retraining
    scoring_model: str | None = None  # a stored model that scores instead of the configured one
    outputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.extra_seeds: list[SeedStructure] = [seed_from_object(s) for s in self.seeds]
        run_id = run_id_for(self.config, [fingerprint(s.atoms) for s in self.extra_seeds])
        if self.round is not None:
            run_id = f"{run_id}-r{self.round.index:04d}"
        if self.suffix is not None:
            run_id = f"{run_id}-{self.suffix}"
        self.run_id = run_id
        self.run_dir = Path(self.config.work_dir).resolve() / "runs" / self.run_id
        self._stored: dict[str, Potential] = {}
        self._labellings: dict[str, Labelling] = {}

    # -- before anything is written ------------------------------------------------------
    @functools.cached_property
    def seed_structures(self) -> list[SeedStructure]:
        """The seeds of the config and those given as objects, built and checked once."""
        from pestle.stages.seed import config_seeds

        return config_seeds(self.config, self.store, self.extra_seeds)

    def preflight(self) -> None:
        """Check every input that can be checked before the run document is written: the
        seeds (files, crystals, Materials Project queries, sizes, overlapping atoms) and the
        plugins that can only be checked against them. A bad input is a ConfigError naming
        the file or field, and the store is left as it was."""
        from pestle.stages.seed import check_plugins_on

        check_plugins_on(self.config, [s.atoms for s in self.seed_structures])

    # -- the run document ---------------------------------------------------------------
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store.runs.start(
            self.run_id,
            {
                "campaign": self.config.name,
                # Credentials never go into the store (a URI's password, keys).
                "config": redact(self.config.model_dump(mode="json", exclude={"source"})),
                "config_file": str(self.config.source) if self.config.source else None,
                "config_hash": config_fingerprint(self.config),
                "store": mask_uri(self.store_uri),
                "code_versions": code_versions(),
                "round": None if self.round is None else self.round.index,
                "scored_with_model": None if self.round is None else self.round.model_id,
            },
        )

    def finish(self, state: str, **fields: Any) -> None:
        self.store.runs.update(self.run_id, {"state": state, **fields})

    def record(self, stage: str, outcome: dict[str, Any]) -> None:
        self.store.runs.record_stage(self.run_id, stage, outcome)

    def recorded(self, stage: str) -> dict[str, Any] | None:
        return self.store.runs.stage(self.run_id, stage)

    # -- plugins, built once ------------------------------------------------------------
    @property
    def per_system(self) -> int:
        return self.config.selection.per_system if self.round is None else self.round.per_system

    @functools.cached_property
    def base_potential(self) -> Potential:
        """The configured (pretrained) potential that fine-tuning starts from."""
        return POTENTIALS.build(self.config.potential.name, self.config.potential.params)

    @functools.cached_property
    def potential(self) -> Potential:
        """What scores candidates: the round's stored model (the promoted one), else the
        configured potential."""
        model_id = self.scoring_model or (self.round.model_id if self.round else None)
        return self.base_potential if model_id is None else self.stored_potential(model_id)

    def stored_potential(self, model_id: str) -> Potential:
        """A stored model version, loaded once per pass from its verified checkpoint."""
        if model_id not in self._stored:
            from pestle.stages.models import load_stored_model

            self._stored[model_id] = load_stored_model(
                self.store, model_id, self.run_dir / "models"
            )
        return self._stored[model_id]

    @functools.cached_property
    def committee(self) -> list[Potential]:
        return [POTENTIALS.build(s.name, s.params) for s in self.config.scoring.committee]

    @functools.cached_property
    def labeller(self) -> Labeller:
        """The configured labeller (each system labels with ``labelling(system)``)."""
        return LABELLERS.build(self.config.labeller.name, self.config.labeller.params)

    @functools.cached_property
    def level_of_theory(self) -> dict[str, Any]:
        return self.labeller.level_of_theory()

    @functools.cached_property
    def lot_hash(self) -> str:
        """The configured labeller's level-of-theory hash (the key of its gate records)."""
        return settings_hash(self.level_of_theory)

    def gate(self, system: str) -> dict[str, Any] | None:
        """The convergence gate's stored record for a system at the configured settings, if
        it was decided by the configured criteria (else None: the gate decides again)."""
        from pestle.store.checks import convergence_key

        if not self.config.convergence.enabled:
            return None
        record = self.store.checks.get(convergence_key(system, self.lot_hash))
        if record is None or record.get("criteria") != self.config.convergence.criteria():
            return None
        return record

    def labelling(self, system: str) -> Labelling:
        """How a chemical system is labelled: the configured labeller, or the settings the
        convergence gate raised for it (``convergence.auto_raise``)."""
        if system not in self._labellings:
            spec, labeller = self.config.labeller, self.labeller
            record = self.gate(system)
            raised = {
                name: value
                for name, value in ((record or {}).get("recommended") or {}).items()
                if (record or {}).get("passed")
                and value
                != next(s.value for s in labeller.convergence_settings() if s.name == name)
            }
            if raised:
                for name, value in raised.items():
                    labeller = labeller.with_setting(name, value)
                spec = PluginSpec(name=spec.name, params=labeller.params.model_dump(mode="json"))
            lot = labeller.level_of_theory()
            self._labellings[system] = Labelling(spec, labeller, lot, settings_hash(lot))
        return self._labellings[system]

    def blocked(self, system: str) -> str | None:
        """Why a system may not be labelled (its gate failed), or None."""
        record = self.gate(system)
        return None if record is None or record.get("passed", True) else record.get("message")

    def labels_filter(self, systems: Iterable[str]) -> dict[str, Any]:
        """A label filter: these systems, each at its own level of theory. One level of
        theory (the usual case) gives one indexed filter without ``$or``, which the embedded
        server would answer by a collection scan."""
        parts = [{"lot_hash": lot_hash, "chemical_system": {"$in": members}}
                 for lot_hash, members in self.systems_by_lot_hash(systems).items()]  # fmt: skip
        if not parts:
            return {"_id": {"$in": []}}
        return parts[0] if len(parts) == 1 else {"$or": parts}

    def systems_by_lot_hash(self, systems: Iterable[str]) -> dict[str, list[str]]:
        """These systems grouped by the level of theory each is labelled at."""
        out: dict[str, list[str]] = {}
        for system in sorted(set(systems)):
            out.setdefault(self.labelling(system).lot_hash, []).append(system)
        return out

    @functools.cached_property
    def model_key(self) -> str:
        """Identity of what scored the candidates: the potential, and the committee and
        descriptors when configured (scores are recomputed when any of them changes)."""
        scoring = self.config.scoring
        if not scoring.committee and not scoring.embeddings:
            return settings_hash(self.potential.describe())
        return settings_hash(
            {
                "potential": self.potential.describe(),
                "committee": [c.model_dump() for c in scoring.committee],
                "embeddings": scoring.embeddings,
            }
        )

    def label_job_id(self, structure_id: str, system: str) -> str:
        return f"label-{structure_id}-{self.labelling(system).lot_hash}"

    def label_id(self, structure_id: str, system: str) -> str:
        return label_id(structure_id, self.labelling(system).lot_hash)
