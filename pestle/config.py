"""Campaign configuration: pydantic models loaded from YAML.

Every section forbids unknown keys. Plug-in sections (samplers, selector, labeller,
potential, trainer) name a registered implementation and give its params, validated against
that implementation's own ``Params`` model. Any error names the file, the field and the reason
before anything runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pestle.plugins import PluginSpec, Registry, RegistryError, format_validation_error


class ConfigError(ValueError):
    """A campaign file that cannot be run, with the file and field at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeedSpec(_Strict):
    """A seed: a structure file, a bulk crystal built with ``ase.build.bulk``, or a
    Materials Project query (material id ``mp-149``, chemical system ``Li-F`` or formula)."""

    name: str | None = None
    file: Path | None = None
    mp: str | None = None
    mp_limit: int = Field(default=1, ge=1, description="most stable structures to take")
    bulk: str | None = None  # e.g. "Si"
    crystalstructure: str | None = None  # e.g. "diamond", "rocksalt"
    a: float | None = Field(default=None, gt=0)
    cubic: bool = True
    supercell: tuple[int, int, int] = (1, 1, 1)

    @model_validator(mode="after")
    def _one_source(self) -> SeedSpec:
        given = [k for k in ("file", "bulk", "mp") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'file', 'bulk' or 'mp' (got {given or 'none'})")
        return self


class StoreSpec(_Strict):
    uri: str | None = None  # mongodb://... ; None = embedded local server
    uri_file: Path | None = None  # a file holding the URI (keeps passwords out of configs)
    database: str = "pestle"


class JobqueueSpec(_Strict):
    """A batch-system cluster through dask-jobqueue: each batch job runs Dask workers."""

    system: Literal["slurm", "pbs"]
    cores: int = Field(ge=1, description="cores per batch job")
    memory: str = Field(description='memory per batch job, e.g. "16GB"')
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    processes: int = Field(default=1, ge=1, description="worker processes per batch job")
    jobs: int = Field(default=1, ge=1, description="batch jobs to start")
    gpus_per_job: int = Field(
        default=0, ge=0, description="advertised to Dask as GPU resources (fine-tuning)"
    )
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(
        default_factory=list, description="shell lines before the worker starts (module load...)"
    )
    local_directory: str | None = None

    @model_validator(mode="after")
    def _gpus_not_shared(self) -> JobqueueSpec:
        # Every worker process of a job gets the same --resources; two processes would both
        # claim (and use) the same device.
        if self.gpus_per_job and self.processes != 1:
            raise ValueError("gpus_per_job needs processes: 1 (one worker owning the job's GPUs)")
        return self


class DaskSpec(_Strict):
    scheduler_address: str | None = None
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    memory_limit: str = "auto"
    job_timeout_seconds: float | None = Field(
        default=None, gt=0, description="wall-clock limit of one labelling job (None: none)"
    )
    # TLS for a tls:// scheduler: CA, client certificate and key (PEM files).
    tls_ca_file: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    jobqueue: JobqueueSpec | None = None

    @model_validator(mode="after")
    def _one_cluster(self) -> DaskSpec:
        if self.scheduler_address and self.jobqueue:
            raise ValueError("give scheduler_address or jobqueue, not both")
        tls = (self.tls_ca_file, self.tls_client_cert, self.tls_client_key)
        if (self.scheduler_address or "").startswith("tls://") and not all(tls):
            raise ValueError(
                "a tls:// scheduler_address needs tls_ca_file, tls_client_cert and tls_client_key"
            )
        return self


class SelectionSpec(_Strict):
    selector: PluginSpec = Field(default_factory=lambda: PluginSpec(name="topk"))
    per_system: int = Field(default=6, ge=1, description="labels to request per chemical system")


SCORE_NAMES = (
    "max_force",
    "mean_force",
    "energy_per_atom",
    "expected_softening_error",
    "committee_force",
    "committee_force_mean",
    "committee_energy",
)


class ScoringSpec(_Strict):
    """How candidates are scored before selection (see pestle/scoring)."""

    committee: list[PluginSpec] = Field(
        default_factory=list,
        description="potentials that, with the main one, form the committee",
    )
    embeddings: bool = Field(
        default=False, description="store the main potential's descriptors (fps, direct)"
    )
    softening_prior: float = Field(default=0.85, gt=0, le=2)
    softening_min_components: int = Field(default=30, ge=1)
    weights: dict[str, float] = Field(
        default_factory=lambda: {"max_force": 1.0},
        description="rank-normalised weighted sum, stored as the score 'combined'",
    )

    @model_validator(mode="after")
    def _known_scores(self) -> ScoringSpec:
        unknown = sorted(set(self.weights) - set(SCORE_NAMES))
        if unknown:
            raise ValueError(
                f"unknown scores {unknown} in weights (known: {', '.join(SCORE_NAMES)})"
            )
        if any(name.startswith("committee") for name in self.weights) and not self.committee:
            raise ValueError("committee scores need at least one potential in scoring.committee")
        return self


class FinetuneSpec(_Strict):
    enabled: bool = True
    trainer: PluginSpec = Field(default_factory=lambda: PluginSpec(name="chgnet"))
    validation_fraction: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="share of each system's training labels kept out of the gradient steps "
        "to choose the best epoch (0: choose on the training loss)",
    )


class EvaluationSetSpec(_Strict):
    """Per chemical system, structures drawn at random (stratified by sampler and amplitude)
    from all its valid candidates: labelled once, never trained on, the set every softening
    figure, decision and report is measured on."""

    per_system: int = Field(
        default=8, ge=0, description="structures per chemical system (0: no evaluation set)"
    )
    min_structures: int = Field(
        default=5,
        ge=1,
        description="below this many, figures and decisions say 'not enough evaluation "
        "structures (n = ...)' instead of a number",
    )


class EvaluationSpec(_Strict):
    holdout_fraction: float = Field(
        default=0.34,
        gt=0,
        lt=1,
        description="share of each system's selected labels held out from training",
    )
    evaluation_set: EvaluationSetSpec = Field(default_factory=EvaluationSetSpec)


class RetrainSpec(_Strict):
    """When the daemon retrains, and when it promotes what it trained."""

    every_n_labels: int | None = Field(
        default=None, ge=1, description="retrain once this many new labels are stored"
    )
    cron: str | None = Field(
        default=None, description="cron times, e.g. '0 3 * * *' (03:00 UTC daily)"
    )
    min_train_labels: int = Field(default=2, ge=1, description="never train on fewer labels")
    rule: Literal["force_mae", "softening"] = Field(
        default="force_mae",
        description="promote when held-out force MAE drops (force_mae) or the softening "
        "scale moves towards 1 (softening), against the promoted model on the same labels",
    )
    min_improvement: float = Field(
        default=0.0, ge=0, lt=1, description="relative improvement the rule demands"
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            from croniter import croniter

            if not croniter.is_valid(value):
                raise ValueError(f"{value!r} is not a cron expression (minute hour dom month dow)")
        return value


class StopSpec(_Strict):
    """A chemical system is finished when both hold for the promoted model, measured on the
    campaign's evaluation set (never trained on)."""

    softening_band: tuple[float, float] = Field(
        default=(0.95, 1.05),
        description="the softening scale's structure-level 95% interval lies inside [low, high]",
    )
    committee_force_below: float | None = Field(
        default=None, gt=0, description="mean committee force spread (eV/A) of a round's picks"
    )
    min_structures: int = Field(
        default=5,
        ge=2,
        validation_alias=AliasChoices("min_structures", "min_labels"),
        description="evaluation-set structures a system needs before it can stop "
        "(min_labels, its former name, is still read)",
    )

    @model_validator(mode="after")
    def _ordered_band(self) -> StopSpec:
        low, high = self.softening_band
        if not 0 < low <= 1 <= high:
            raise ValueError("softening_band must be [low, high] with 0 < low <= 1 <= high")
        return self


class DaemonSpec(_Strict):
    """How ``pestle daemon`` runs this campaign: rounds, budgets, retraining, stopping."""

    per_round: int = Field(default=2, ge=1, description="labels per chemical system per round")
    max_rounds: int | None = Field(default=None, ge=1)
    round_interval_seconds: float = Field(
        default=0.0, ge=0, description="least time between the end of a round and the next"
    )
    retrain: RetrainSpec = Field(default_factory=RetrainSpec)
    stop: StopSpec = Field(default_factory=StopSpec)
    withdraw_below: float | None = Field(
        default=None,
        gt=0,
        description="after a promotion, withdraw queued labels whose expected softening "
        "error (eV/A) under the new model falls below this",
    )
    md_with_promoted_model: bool = Field(
        default=False,
        description="samplers that drive dynamics or relaxations with a potential (md, "
        "migration, Boltzmann rattle) use the promoted model once there is one: new "
        "candidates are the structures the current model reaches",
    )


class CampaignConfig(_Strict):
    name: str
    seed: int = 0
    work_dir: Path = Path("pestle-work")
    seeds: list[SeedSpec] = Field(min_length=1)
    samplers: list[PluginSpec] = Field(min_length=1)
    potential: PluginSpec = Field(default_factory=lambda: PluginSpec(name="chgnet"))
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    labeller: PluginSpec = Field(default_factory=lambda: PluginSpec(name="gpaw"))
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    dask: DaskSpec = Field(default_factory=DaskSpec)
    daemon: DaemonSpec = Field(default_factory=DaemonSpec)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ "):
            raise ValueError("must be non-empty, without spaces or slashes")
        return value


def _check_plugin(registry: Registry, spec: PluginSpec, where: str, errors: list[str]) -> None:
    try:
        registry.validate_params(spec.name, spec.params)
    except RegistryError as exc:
        errors.append(f"{where}.name: {exc}")
    except ValidationError as exc:
        errors.append(format_validation_error(exc, prefix=f"{where}.params"))


def validate_plugins(config: CampaignConfig) -> list[str]:
    from pestle.labellers import LABELLERS
    from pestle.potentials import POTENTIALS
    from pestle.samplers import SAMPLERS
    from pestle.selectors import SELECTORS
    from pestle.trainers import TRAINERS

    errors: list[str] = []
    for i, spec in enumerate(config.samplers):
        _check_plugin(SAMPLERS, spec, f"samplers.{i}", errors)
    _check_plugin(POTENTIALS, config.potential, "potential", errors)
    for i, spec in enumerate(config.scoring.committee):
        _check_plugin(POTENTIALS, spec, f"scoring.committee.{i}", errors)
    _check_plugin(SELECTORS, config.selection.selector, "selection.selector", errors)
    _check_plugin(LABELLERS, config.labeller, "labeller", errors)
    _check_plugin(TRAINERS, config.finetune.trainer, "finetune.trainer", errors)
    return errors


def load_config(path: str | os.PathLike) -> CampaignConfig:
    """Read and validate a campaign YAML file; raises ConfigError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    try:
        config = CampaignConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid config\n{format_validation_error(exc)}") from None
    errors = validate_plugins(config)
    if errors:
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(errors))
    config.source = path.resolve()
    # Seed files are relative to the config file, so a campaign folder can move as a whole.
    for seed in config.seeds:
        if seed.file is not None and not seed.file.is_absolute():
            seed.file = (path.parent / seed.file).resolve()
        if seed.file is not None and not seed.file.is_file():
            raise ConfigError(f"{path}: seeds: file {seed.file} does not exist")
    for field in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        value = getattr(config.dask, field)
        if value is not None:
            value = value if value.is_absolute() else (path.parent / value).resolve()
            if not value.is_file():
                raise ConfigError(f"{path}: dask.{field}: file {value} does not exist")
            setattr(config.dask, field, value)
    return config
