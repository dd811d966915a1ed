"""Campaign configuration: pydantic models loaded from YAML.

Every section forbids unknown keys. Plug-in sections (samplers, selector, labeller,
potential, trainer) name a registered implementation and give its params, validated against
that implementation's own ``Params`` model. Any error names the file, the field and the reason
before anything runs. Relative paths (``work_dir``, seed files, ``store.uri_file``, the TLS
files, and path-valued plugin params) are relative to the config file.

``config_schema()`` is the JSON Schema of a campaign file (``pestle config schema``);
``docs/config.md`` is generated from it (``pestle config docs``).
"""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema

from pestle.extras import MissingExtra, require
from pestle.labellers.convergence import ConvergenceOptions
from pestle.plugins import (
    PluginSpec,
    Registry,
    RegistryError,
    format_validation_error,
    old_names,
)


class ConfigError(ValueError):
    """A campaign file that cannot be run, with the file and field at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeedSpec(_Strict):
    """A seed: a structure file, a bulk crystal built with ``ase.build.bulk``, or a
    Materials Project query (material id ``mp-149``, chemical system ``Li-F`` or formula)."""

    name: str | None = Field(
        default=None, description="label in reports (default: file stem, element, MP formula)"
    )
    file: Path | None = Field(
        default=None, description="structure file (CIF, POSCAR, extxyz...), relative to the config"
    )
    mp: str | None = Field(
        default=None,
        description="Materials Project query: mp-149, a chemical system Li-F, a formula",
    )
    mp_limit: int = Field(default=1, ge=1, description="most stable structures to take")
    bulk: str | None = Field(default=None, description='ase.build.bulk name, e.g. "Si"')
    crystalstructure: str | None = Field(
        default=None, description='for bulk: e.g. "diamond", "rocksalt", "fcc"'
    )
    a: float | None = Field(default=None, gt=0, description="for bulk: lattice constant (Å)")
    cubic: bool = Field(default=True, description="for bulk: the conventional cubic cell")
    supercell: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        default=(1, 1, 1), description="repetitions of the seed along its cell vectors"
    )

    @model_validator(mode="after")
    def _one_source(self) -> SeedSpec:
        given = [k for k in ("file", "bulk", "mp") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'file', 'bulk' or 'mp' (got {given or 'none'})")
        return self


class StoreSpec(_Strict):
    """Where the store lives: a MongoDB, or (neither uri nor uri_file, nor PESTLE_MONGODB_URI
    set) pestle's embedded server with its data in work_dir/db."""

    uri: str | None = Field(default=None, description="mongodb://... (password masked in output)")
    uri_file: Path | None = Field(
        default=None, description="a file holding the URI, to keep passwords out of configs"
    )
    database: str = Field(default="pestle", description="database name in that MongoDB")
    outage_seconds: float = Field(
        default=120.0, ge=0, le=86_400,
        description="how long labelling waits for an unreachable store to come back (retrying "
        "with backoff) before the run stops",
    )  # fmt: skip

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, value: str | None) -> str | None:
        if value is not None:
            from pestle.store.uri import check_uri

            check_uri(value)
        return value

    @field_validator("database")
    @classmethod
    def _valid_database(cls, value: str) -> str:
        # MongoDB's rules for database names (on every platform it runs on).
        bad = sorted(set(value) & set('/\\. "$*<>:|?\0'))
        if not value or bad or len(value.encode()) > 63:
            raise ValueError(
                'a MongoDB database name: 1 to 63 bytes, none of / \\ . space " $ * < > : | ?'
            )
        return value


class JobqueueSpec(_Strict):
    """A batch-system cluster through dask-jobqueue: each batch job runs Dask workers."""

    system: Literal["slurm", "pbs"] = Field(description="the batch system")
    cores: int = Field(ge=1, description="cores per batch job")
    memory: str = Field(description='memory per batch job, e.g. "16GB"')
    walltime: str = Field(default="01:00:00", description="per batch job, HH:MM:SS")
    queue: str | None = Field(default=None, description="partition / queue")
    account: str | None = Field(default=None, description="project to charge")
    processes: int = Field(default=1, ge=1, description="worker processes per batch job")
    jobs: int = Field(default=1, ge=1, description="batch jobs to start")
    gpus_per_job: int = Field(
        default=0, ge=0, description="advertised to Dask as GPU resources (fine-tuning)"
    )
    job_extra_directives: list[str] = Field(
        default_factory=list, description="extra #SBATCH / #PBS lines"
    )
    job_script_prologue: list[str] = Field(
        default_factory=list, description="shell lines before the worker starts (module load...)"
    )
    local_directory: str | None = Field(default=None, description="workers' scratch folder")

    @model_validator(mode="after")
    def _gpus_not_shared(self) -> JobqueueSpec:
        # Every worker process of a job gets the same --resources; two processes would both
        # claim (and use) the same device.
        if self.gpus_per_job and self.processes != 1:
            raise ValueError("gpus_per_job needs processes: 1 (one worker owning the job's GPUs)")
        return self


class DaskSpec(_Strict):
    """Where labelling and fine-tuning run: a LocalCluster on this machine (default), an
    existing scheduler, or a batch system through dask-jobqueue."""

    scheduler_address: str | None = Field(
        default=None, description="an existing scheduler, tcp:// or tls://"
    )
    n_workers: int = Field(default=2, ge=1, description="LocalCluster worker processes")
    threads_per_worker: int = Field(default=1, ge=1, description="LocalCluster threads each")
    memory_limit: str = Field(default="auto", description="LocalCluster memory per worker")
    host: str = Field(
        default="127.0.0.1",
        description="interface the LocalCluster's scheduler, workers and dashboard listen on "
        "(127.0.0.1: reachable from this machine only)",
    )
    gpus: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        default="auto",
        description="GPUs the LocalCluster offers as Dask GPU resources, one worker each "
        "(its CUDA_VISIBLE_DEVICES): auto, every CUDA device torch sees; N, the first N; 0, "
        "none. Fine-tuning asks for a GPU worker when there is one. With scheduler_address "
        "or jobqueue the workers say what they have (--resources GPU=1, "
        "jobqueue.gpus_per_job)",
    )
    job_timeout_seconds: float | None = Field(
        default=None, gt=0, description="wall-clock limit of one labelling job (None: none)"
    )
    score_on: Literal["auto", "driver", "workers"] = Field(
        default="auto",
        description="where candidates are scored: auto uses the workers of a remote or GPU "
        "cluster and, on the local cluster, whichever measured faster on the first batches",
    )
    # TLS for a tls:// scheduler: CA, client certificate and key (PEM files).
    tls_ca_file: Path | None = Field(default=None, description="CA certificate (PEM)")
    tls_client_cert: Path | None = Field(default=None, description="client certificate (PEM)")
    tls_client_key: Path | None = Field(default=None, description="client key (PEM)")
    jobqueue: JobqueueSpec | None = Field(default=None, description="a Slurm or PBS cluster")

    @model_validator(mode="after")
    def _one_cluster(self) -> DaskSpec:
        if self.scheduler_address and self.jobqueue:
            raise ValueError("give scheduler_address or jobqueue, not both")
        if (self.scheduler_address or self.jobqueue) and self.gpus not in ("auto", 0):
            raise ValueError(
                "gpus applies to the local cluster; with scheduler_address the workers offer "
                "their GPUs (dask worker --resources GPU=1), with jobqueue set gpus_per_job"
            )
        tls = (self.tls_ca_file, self.tls_client_cert, self.tls_client_key)
        if (self.scheduler_address or "").startswith("tls://") and not all(tls):
            raise ValueError(
                "a tls:// scheduler_address needs tls_ca_file, tls_client_cert and tls_client_key"
            )
        return self


class SelectionSpec(_Strict):
    """Which candidates get a reference label: the selector picks per chemical system."""

    selector: PluginSpec = Field(
        default_factory=lambda: PluginSpec(name="topk"),
        description="topk, fps, direct or a plugin's (pestle plugins)",
    )
    per_system: int = Field(default=6, ge=1, description="labels to request per chemical system")
    rank_by_softening_up_to: int = Field(
        default=3,
        ge=0,
        description="with this many labels per system or fewer, or a linear-correction "
        "trainer, a selector whose score is not set ranks by the expected softening error "
        "instead of the largest force (a few labels must go where the model is most wrong)",
    )


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
    pressure: bool = Field(
        default=True,
        description="predict the main potential's stress when scoring, for the candidates' "
        "pressure in reports (about 1.6x the scoring time with CHGNet)",
    )
    softening_prior: float = Field(
        default=0.85,
        gt=0,
        le=2,
        description="softening scale assumed until a system/sampler has labels to fit its own",
    )
    softening_min_components: int = Field(
        default=30, ge=1, description="force components needed to fit a softening scale"
    )
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
    """Fine-tuning the potential on the campaign's training labels (a Dask task)."""

    enabled: bool = Field(default=True, description="fine-tune at the end of a run")
    trainer: PluginSpec = Field(
        default_factory=lambda: PluginSpec(name="chgnet"),
        description="chgnet, mace, matgl or a plugin's (pestle plugins)",
    )
    validation_fraction: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="share of each system's training labels kept out of the gradient steps "
        "to choose the best epoch (0: choose on the training loss); a sampler's last label "
        "stays in training while another can go",
    )
    stopping_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="share of each system's evaluation set (a stable random part) the "
        "fine-tune also chooses its epoch on; every figure that judges a model leaves those "
        "structures out (0: none)",
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
    """Which labels are held out of training, and the evaluation set models are judged on."""

    holdout_fraction: float = Field(
        default=0.34,
        ge=0,
        lt=1,
        description="share of each system's selected labels held out from training (0: "
        "none; the evaluation set judges the models)",
    )
    evaluation_set: EvaluationSetSpec = Field(
        default_factory=EvaluationSetSpec, description="the random evaluation set per system"
    )


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
    max_rounds: int | None = Field(default=None, ge=1, description="stop after this many rounds")
    round_interval_seconds: float = Field(
        default=0.0, ge=0, description="least time between the end of a round and the next"
    )
    retrain: RetrainSpec = Field(default_factory=RetrainSpec, description="when to retrain")
    stop: StopSpec = Field(default_factory=StopSpec, description="when a system is finished")
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


class EOSSpec(_Strict):
    """The equation-of-state check of every model pestle evaluates: an E-V scan of each seed
    (isotropic scaling) computed once by the labeller and stored, against the same scan by
    the model; bulk modulus and equilibrium volume with their intervals."""

    enabled: bool = Field(default=True, description="run the check after fine-tuning")
    volume_range: float = Field(
        default=0.08, gt=0, lt=0.5, description="volumes from (1 - r) V to (1 + r) V of the seed"
    )
    points: int = Field(default=7, ge=5, le=21, description="volumes in the scan")
    bulk_modulus_tolerance: float = Field(
        default=0.10,
        gt=0,
        lt=1,
        description="a model whose bulk-modulus ratio to the reference lies, with its whole "
        "interval, further than this from 1 fails the check (the daemon does not promote "
        "it when the model it would replace passed)",
    )


class LimitsSpec(_Strict):
    """Caps on what a campaign may ask for, checked before anything runs, so that a typo
    (a 40x40x40 supercell, a 10^6 A cell, a billion candidates) is a message, not a week of
    DFT. Raise them here when a campaign really needs more."""

    max_atoms: int = Field(
        default=2000, ge=1, description="atoms in a seed (after its supercell) or a candidate"
    )
    max_cell_length: float = Field(
        default=200.0, gt=0, description="length of a seed's cell vectors (Å)"
    )
    min_distance_fraction: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="atoms of a seed or candidate closer than this fraction of the sum of their "
        "covalent radii are a broken structure (overlapping atoms)",
    )
    max_count: int = Field(
        default=1_000_000,
        ge=1,
        description="any whole number in the config (counts, steps, repetitions) except "
        "random seeds",
    )


class CampaignConfig(_Strict):
    """A campaign: seeds, samplers, the potential that scores, selection, the labeller,
    fine-tuning, evaluation, and where the store and the workers are."""

    name: str = Field(description="campaign name, part of every run id (no spaces or slashes)")
    seed: int = Field(default=0, description="random seed of every sampler stream")
    work_dir: Path = Field(
        default=Path("pestle-work"),
        description="run folders, reports, the embedded store; relative to the config file",
    )
    seeds: list[SeedSpec] = Field(min_length=1, description="starting structures")
    samplers: list[PluginSpec] = Field(
        min_length=1, description="candidate generators, each run on every seed (pestle samplers)"
    )
    potential: PluginSpec = Field(
        default_factory=lambda: PluginSpec(name="chgnet"),
        description="the model that scores candidates and is fine-tuned",
    )
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="candidate scores")
    selection: SelectionSpec = Field(
        default_factory=SelectionSpec, description="which candidates are labelled"
    )
    labeller: PluginSpec = Field(
        default_factory=lambda: PluginSpec(name="gpaw"),
        description="reference calculations: gpaw, vasp, potential, emt or a plugin's",
    )
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec, description="fine-tuning")
    convergence: ConvergenceOptions = Field(
        default_factory=ConvergenceOptions,
        description="the gate that checks the labeller's settings are converged for each "
        "chemical system before its first labels",
    )
    eos: EOSSpec = Field(default_factory=EOSSpec, description="equation-of-state check")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="held-out labels"
    )
    store: StoreSpec = Field(default_factory=StoreSpec, description="the MongoDB store")
    dask: DaskSpec = Field(default_factory=DaskSpec, description="the Dask cluster")
    daemon: DaemonSpec = Field(default_factory=DaemonSpec, description="pestle daemon settings")
    limits: LimitsSpec = Field(
        default_factory=LimitsSpec, description="caps on sizes, checked before a run starts"
    )
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
    except (RegistryError, MissingExtra) as exc:
        errors.append(f"{where}.name: {exc}")
    except ValidationError as exc:
        errors.append(format_validation_error(exc, prefix=f"{where}.params"))


def _plugin_specs(config: CampaignConfig) -> list[tuple[Registry, PluginSpec, str]]:
    """Every plugin the config names: (its registry, its spec, where it sits in the config)."""
    from pestle.labellers import LABELLERS
    from pestle.potentials import POTENTIALS
    from pestle.samplers import SAMPLERS
    from pestle.selectors import SELECTORS
    from pestle.trainers import TRAINERS

    return [
        *((SAMPLERS, s, f"samplers.{i}") for i, s in enumerate(config.samplers)),
        (POTENTIALS, config.potential, "potential"),
        *(
            (POTENTIALS, s, f"scoring.committee.{i}")
            for i, s in enumerate(config.scoring.committee)
        ),
        (SELECTORS, config.selection.selector, "selection.selector"),
        (LABELLERS, config.labeller, "labeller"),
        (TRAINERS, config.finetune.trainer, "finetune.trainer"),
    ]


def validate_plugins(config: CampaignConfig) -> list[str]:
    errors: list[str] = []
    for i, seed in enumerate(config.seeds):
        if seed.mp is not None:
            try:
                require("mp", "a Materials Project seed")
            except MissingExtra as exc:
                errors.append(f"seeds.{i}.mp: {exc}")
    for registry, spec, where in _plugin_specs(config):
        _check_plugin(registry, spec, where, errors)
    return errors


def _is_path_field(annotation: Any) -> bool:
    return annotation is Path or any(_is_path_field(a) for a in typing.get_args(annotation))


def _resolve_plugin_paths(
    registry: Registry, spec: PluginSpec, base: Path, where: str
) -> list[str]:
    """Path-valued params of a plugin (a checkpoint, a model file or folder) given relative
    in the config are relative to the config file; they are stored as absolute strings.
    Every one of them is an input, so one that does not exist is an error (returned)."""
    params = registry.get(spec.name).Params
    fields, renamed = params.model_fields, old_names(params)
    missing = []
    for key, value in list(spec.params.items()):
        info = fields.get(renamed.get(key, key))  # an old spelling names the same field
        if info is None or not isinstance(value, str) or not _is_path_field(info.annotation):
            continue
        if value and not Path(value).expanduser().is_absolute():
            spec.params[key] = str((base / value).resolve())
        resolved = Path(spec.params[key]).expanduser()
        if value and not resolved.exists():
            missing.append(f"{where}.params.{key}: {resolved} does not exist")
    return missing


def _resolve_paths(config: CampaignConfig, base: Path) -> list[str]:
    def resolve(value: Path) -> Path:
        value = value.expanduser()
        return value if value.is_absolute() else (base / value).resolve()

    config.work_dir = resolve(config.work_dir)
    if config.store.uri_file is not None:
        config.store.uri_file = resolve(config.store.uri_file)
    for seed in config.seeds:
        if seed.file is not None:
            seed.file = resolve(seed.file)
    for field in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        value = getattr(config.dask, field)
        if value is not None:
            setattr(config.dask, field, resolve(value))
    missing: list[str] = []
    for registry, spec, where in _plugin_specs(config):
        missing += _resolve_plugin_paths(registry, spec, base, where)
    return missing


class _WithFactoryDefaults(GenerateJsonSchema):
    """JSON Schema that shows the defaults made by default factories too."""

    def get_default_value(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()
        return super().get_default_value(schema)


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a campaign file (plugin ``params`` are objects here; each plugin's
    own params are listed by ``pestle plugins``)."""
    schema = CampaignConfig.model_json_schema(schema_generator=_WithFactoryDefaults)
    schema["properties"].pop("source", None)
    schema["title"] = "pestle campaign"
    return schema


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (the
    plain loader keeps the last one silently: half of a config would be ignored)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base loader says so
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _walk(value: Any, where: str = ""):
    """(dotted field, value) of every leaf of parsed YAML."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}.{index}")
    else:
        yield where, value


def check_numbers(raw: dict[str, Any], limits: LimitsSpec) -> list[str]:
    """Numbers no field may hold: NaN and infinities (YAML's .nan, .inf), and whole numbers
    above ``limits.max_count`` (random seeds excepted)."""
    errors = []
    for where, value in _walk(raw):
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{where}: {value} is not a finite number")
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and abs(value) > limits.max_count
            and not where.rsplit(".", 1)[-1].endswith("seed")
        ):
            errors.append(
                f"{where}: {value} is above limits.max_count ({limits.max_count}); raise the "
                "limit if this is meant"
            )
    return errors


def check_selector_score(config: CampaignConfig) -> list[str]:
    """The selector ranks candidates by a stored score: one the scoring stage computes."""
    score = config.selection.selector.params.get("score")
    if score is None:
        return []
    known = (*SCORE_NAMES, "combined")
    if score not in known:
        return [f"selection.selector.params.score: unknown score {score!r} (known: "
                f"{', '.join(known)})"]  # fmt: skip
    if str(score).startswith("committee") and not config.scoring.committee:
        return [f"selection.selector.params.score: {score} needs scoring.committee"]
    return []


def load_config(path: str | os.PathLike) -> CampaignConfig:
    """Read and validate a campaign YAML file; raises ConfigError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    try:
        limits = LimitsSpec.model_validate(raw.get("limits") or {})
    except ValidationError:
        limits = LimitsSpec()  # its own errors are reported with the rest just below
    errors = check_numbers(raw, limits)
    try:
        config = CampaignConfig.model_validate(raw)
    except ValidationError as exc:
        errors.insert(0, format_validation_error(exc))
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(errors)) from None
    errors += check_selector_score(config) + validate_plugins(config)
    if errors:
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(errors))
    config.source = path.resolve()
    # Relative paths are relative to the config file, so a campaign folder can move as a
    # whole and every command finds the same work directory from anywhere.
    missing = _resolve_paths(config, config.source.parent)
    if missing:
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(missing))
    if config.work_dir.exists() and not config.work_dir.is_dir():
        raise ConfigError(f"{path}: work_dir: {config.work_dir} exists and is not a folder")
    for index, seed in enumerate(config.seeds):
        if seed.file is not None and not seed.file.is_file():
            raise ConfigError(f"{path}: seeds.{index}.file: {seed.file} does not exist")
    for field in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        value = getattr(config.dask, field)
        if value is not None and not value.is_file():
            raise ConfigError(f"{path}: dask.{field}: file {value} does not exist")
    return config
