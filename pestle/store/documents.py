"""The shape of every stored document, as pydantic models.

Repositories write documents built from these models and read documents back into them, so
a field's name and type are written down once. Models allow extra fields: a store written by
a newer pestle (or a user's own annotations) still reads; ``migrations`` bring older stores to
``SCHEMA_VERSION``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED = "queued", "running", "done", "failed"
# A queued label no longer worth computing (re-scored after a promotion); never claimed.
JOB_WITHDRAWN = "withdrawn"
JOB_TERMINAL = (JOB_DONE, JOB_FAILED, JOB_WITHDRAWN)
JOB_STATES = (JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED, JOB_WITHDRAWN)

# A label's part in fine-tuning, decided once: by the split policy (pestle.stages.split) for
# selected structures, or ``evaluation`` for a campaign's random evaluation set.
ROLE_TRAIN, ROLE_VALIDATION, ROLE_HOLDOUT = "train", "validation", "holdout"
ROLE_EVALUATION = "evaluation"
# The labels of pestle's own checks (convergence gate, equations of state): never trained on.
ROLE_CHECK = "check"
ROLES = (ROLE_TRAIN, ROLE_VALIDATION, ROLE_HOLDOUT, ROLE_EVALUATION, ROLE_CHECK)
UNTRAINABLE = (ROLE_EVALUATION, ROLE_CHECK)


class Document(BaseModel):
    """A stored document: ``id`` is MongoDB's ``_id``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str = Field(alias="_id")

    def to_mongo(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_unset=False)


class Provenance(BaseModel):
    """How a structure came to be: sampler, parent, seed, campaign and code versions."""

    model_config = ConfigDict(extra="allow")

    sampler: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    parent_id: str | None = None
    parent_name: str | None = None
    rng_seed: int | None = None
    campaign: str | None = None
    run_id: str | None = None
    source: dict[str, Any] = Field(default_factory=dict)
    code_versions: dict[str, str] = Field(default_factory=dict)


class Selection(BaseModel):
    """Why a run picked a candidate."""

    model_config = ConfigDict(extra="allow")

    rank: int
    reason: str
    scores: dict[str, float] = Field(default_factory=dict)


class StructureDoc(Document):
    kind: str = "candidate"  # seed | candidate
    name: str | None = None
    natoms: int = 0
    formula: str = ""
    chemical_system: str = ""
    elements: list[str] = Field(default_factory=list)
    geometry: dict[str, Any] = Field(default_factory=dict)  # numbers, cell, pbc
    positions: Any = None  # inline list or {"gridfs": id, "shape": [...]}
    provenance: Provenance = Field(default_factory=Provenance)
    runs: list[str] = Field(default_factory=list)
    # Keyed by the identity of what scored (see pestle.stages.context.RunContext.model_key).
    scores: dict[str, dict[str, float]] = Field(default_factory=dict)
    embeddings: dict[str, list[float]] = Field(default_factory=dict)
    selection: dict[str, Selection] = Field(default_factory=dict)  # run id -> why picked
    # Campaigns whose evaluation set holds this structure: never picked, never trained on.
    evaluation_for: list[str] = Field(default_factory=list)
    created_at: datetime | None = None


class LabelDoc(Document):
    # Defaults let a projection read only some fields; a stored label has them all.
    structure_id: str = ""
    labeller: str = ""
    level_of_theory: dict[str, Any] = Field(default_factory=dict)
    lot_hash: str = ""
    energy: float = float("nan")
    energy_per_atom: float = float("nan")
    forces: Any = None  # inline list or GridFS reference
    max_force: float = 0.0
    stress: list[float] | None = None
    natoms: int = 0
    chemical_system: str = ""
    formula: str = ""
    sampler: str | None = None
    job_id: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    code_versions: dict[str, str] = Field(default_factory=dict)
    created_at: datetime | None = None
    role: Literal["train", "validation", "holdout", "evaluation", "check"] | None = None
    split: dict[str, Any] | None = None  # the policy that decided the role, and when


class JobEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    at: datetime
    event: str
    worker: str | None = None
    error: str | None = None
    reason: str | None = None


class JobDoc(Document):
    kind: str = ""
    payload: dict[str, Any] = Field(default_factory=dict)
    state: str = JOB_QUEUED
    attempts: int = 0
    max_attempts: int = 3
    not_before: datetime | None = None
    run_id: str | None = None
    created_at: datetime | None = None
    history: list[JobEvent] = Field(default_factory=list)
    worker: str | None = None
    lease_expires: datetime | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    withdrawn_reason: str | None = None


class CheckpointInfo(BaseModel):
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    gridfs: Any
    filename: str
    archive: str | None = None  # "tar" for a folder
    sha256: str
    bytes: int
    # HMAC of (model id, potential, sha256) under a key outside the store (store/signing.py)
    signature: dict[str, str] | None = None


class TrainingRecord(BaseModel):
    """Which labels a model version trained on, chose its epoch on, and was held out from."""

    model_config = ConfigDict(extra="allow")

    label_ids: list[str] = Field(default_factory=list)
    validation_label_ids: list[str] = Field(default_factory=list)
    holdout_label_ids: list[str] = Field(default_factory=list)
    query: dict[str, Any] = Field(default_factory=dict)


class EvaluationRecord(BaseModel):
    """One evaluation of a model version on a set of labels (by a run, the daemon or
    ``pestle evaluate``): metrics per chemical system (and group), as computed."""

    model_config = ConfigDict(extra="allow")

    key: str  # stable for the same source and labels: re-evaluating replaces the record
    source: str  # run id, "daemon" or "cli"
    label_ids_hash: str
    n_labels: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    at: datetime | None = None


class Promotion(BaseModel):
    model_config = ConfigDict(extra="allow")

    at: datetime
    reason: str
    replaced: str | None = None


class ModelDoc(Document):
    family: str = "unknown"
    potential: str | None = None
    potential_params: dict[str, Any] = Field(default_factory=dict)
    trainer: dict[str, Any] = Field(default_factory=dict)
    parent: dict[str, Any] = Field(default_factory=dict)
    training: TrainingRecord = Field(default_factory=TrainingRecord)
    level_of_theory_hash: str | None = None
    level_of_theory: dict[str, Any] = Field(default_factory=dict)
    run_id: str | None = None
    campaign: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    device: str | None = None
    checkpoint: CheckpointInfo | None = None
    code_versions: dict[str, str] = Field(default_factory=dict)
    created_at: datetime | None = None
    promotions: list[Promotion] = Field(default_factory=list)
    evaluations: list[EvaluationRecord] = Field(default_factory=list)
    # ``pestle models trust``: who signed this checkpoint by hand, when, with which key
    trusted: list[dict[str, Any]] = Field(default_factory=list)


class RunDoc(Document):
    campaign: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    config_file: str | None = None
    config_hash: str | None = None
    store: str | None = None
    code_versions: dict[str, str] = Field(default_factory=dict)
    round: int | None = None
    scored_with_model: str | None = None
    state: str | None = None  # running | finished | interrupted
    stages: dict[str, Any] = Field(default_factory=dict)
    report: str | None = None
    error: str | None = None
    attempts: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    owner: dict[str, Any] | None = None  # the process running it: host, pid


class DecisionDoc(Document):
    """A decision of the daemon (retrain, promote or keep, finish a system, withdraw, error)
    with the figures and the reason it rests on."""

    kind: str = ""
    campaign: str | None = None
    reason: str = ""
    at: datetime | None = None


class CampaignState(Document):
    """The daemon's position in one campaign: next round, systems, finished systems."""

    round: int = 0
    systems: list[str] = Field(default_factory=list)
    finished: dict[str, Any] = Field(default_factory=dict)
    retrain: dict[str, Any] = Field(default_factory=dict)
    last_round: dict[str, Any] = Field(default_factory=dict)
    postponed_at_labels: int | None = None
    created_at: datetime | None = None
