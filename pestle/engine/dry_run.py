"""``pestle run --dry-run``: what a run of a config would sample, score, select and label,
and how many DFT calculations that means, without writing anything to the store.

Seeds are built and every sampler is run in memory with the very random streams a run uses
(so the candidates are those a run would store), and each is validity-checked and
deduplicated as the sample stage does. Scoring is not done (it needs the potential on every
candidate), so which candidates the selector would pick is not known: the estimate per
chemical system is ``min(per_system, candidates)`` picks, less the candidates already
labelled at the labeller's level of theory (read from the store, if there is one), given as a
range when the picks may or may not include those. A run whose selection is already stored
(an interrupted run) gives the exact count instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ase import Atoms

from pestle.config import CampaignConfig
from pestle.store import Store
from pestle.structures import chemical_system, fingerprint, settings_hash


@dataclass
class PlannedCandidate:
    id: str  # the fingerprint: the structure's id once stored
    atoms: Atoms
    sampler: str
    chemical_system: str
    parent_name: str


@dataclass
class SystemPlan:
    candidates: int
    already_stored: int = 0
    already_labelled: int = 0
    picks: int = 0
    evaluation: int = 0  # evaluation-set structures to label (drawn at random)
    checks_min: int = 0  # convergence gate and equation of state
    checks_max: int = 0
    dft_min: int = 0
    dft_max: int = 0


@dataclass
class CampaignPlan:
    run_id: str
    campaign: str
    seeds: list[dict[str, str]]
    candidates: list[PlannedCandidate]
    samplers: dict[str, int]  # candidates per sampler (valid, before deduplication across)
    rejected: dict[str, int]  # per sampler, by the validity check
    systems: dict[str, SystemPlan]
    potential: str
    committee: list[str]
    weights: dict[str, float]
    selector: dict[str, Any]
    per_system: int
    labeller: str
    level_of_theory: dict[str, Any] | None
    finetune: str | None  # the trainer, None when disabled
    holdout_fraction: float
    store_exists: bool
    resumed_selection: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def dft_min(self) -> int:
        return sum(s.dft_min for s in self.systems.values())

    @property
    def dft_max(self) -> int:
        return sum(s.dft_max for s in self.systems.values())

    def summary(self) -> dict[str, Any]:
        """JSON-ready: everything but the structures."""
        return {
            "run_id": self.run_id,
            "campaign": self.campaign,
            "seeds": self.seeds,
            "candidates": len(self.candidates),
            "samplers": self.samplers,
            "rejected": self.rejected,
            "systems": {k: vars(v) for k, v in self.systems.items()},
            "dft_calculations": {"min": self.dft_min, "max": self.dft_max},
            "scoring": {"potential": self.potential, "committee": self.committee,
                        "weights": self.weights},
            "selection": {"selector": self.selector, "per_system": self.per_system},
            "labeller": {"name": self.labeller, "level_of_theory": self.level_of_theory},
            "finetune": {"trainer": self.finetune, "holdout_fraction": self.holdout_fraction},
            "store": {"exists": self.store_exists},
            "resumed_selection": self.resumed_selection,
            "notes": self.notes,
        }  # fmt: skip


def plan_seeds(config: CampaignConfig, store: Store | None = None) -> list:
    """The config's seeds as the seed stage builds them (Materials Project ones from the
    store when it has them), each crystal once."""
    from pestle.samplers import Seed
    from pestle.stages.seed import check_plugins_on, config_seeds

    seeds: list[Seed] = []
    structures = config_seeds(config, store)
    check_plugins_on(config, [s.atoms for s in structures])
    for structure in structures:
        sid = fingerprint(structure.atoms)
        if all(s.id != sid for s in seeds):
            seeds.append(Seed(structure.atoms, sid, structure.name, structure.source))
    return seeds


def plan_campaign(config: CampaignConfig, store: Store | None = None) -> CampaignPlan:
    """Plan a run of ``config`` in memory; ``store`` (read only, optional) tells what is
    already stored and labelled."""
    from pestle.labellers import LABELLERS
    from pestle.samplers import SAMPLERS
    from pestle.samplers.validity import check_within_limits
    from pestle.stages.context import run_id_for
    from pestle.stages.sample import sampler_stream
    from pestle.stages.select import effective_selector

    seeds = plan_seeds(config, store)
    candidates: dict[str, PlannedCandidate] = {}
    per_sampler: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    first_reason: dict[str, str] = {}
    for index, spec in enumerate(config.samplers):
        sampler = SAMPLERS.build(spec.name, spec.params)
        for seed in seeds:
            rng_seed = sampler_stream(config.seed, None, index, spec.name, seed.id)
            for candidate in sampler.sample(seed, rng_seed):
                reason = check_within_limits(candidate.atoms, config.limits)
                if reason is not None:
                    rejected[spec.name] += 1
                    first_reason.setdefault(spec.name, reason)
                    continue
                per_sampler[spec.name] += 1
                sid = fingerprint(candidate.atoms)
                candidates.setdefault(
                    sid,
                    PlannedCandidate(sid, candidate.atoms, candidate.sampler,
                                     chemical_system(candidate.atoms), seed.name),
                )  # fmt: skip
    notes = [
        "candidates are not scored (that needs the potential on each of them), so which "
        "ones are picked is not known: each system is assumed to use its whole budget "
        f"({config.selection.per_system} per system)",
        "a labelling job can still fail, or be refused by the validity check before dispatch",
    ]
    notes += [
        f"{rejected[name]} {name} candidates refused by the validity check, e.g. {reason}"
        for name, reason in first_reason.items()
    ]
    level_of_theory = None
    try:
        level_of_theory = LABELLERS.build(
            config.labeller.name, config.labeller.params
        ).level_of_theory()
    except Exception as exc:  # a labeller that needs its code installed to say
        notes.append(
            f"the level of theory of {config.labeller.name} is unknown here ({exc}): labels "
            "already stored are not subtracted"
        )
    ids = sorted(candidates)
    stored: set[str] = set()
    labelled: set[str] = set()
    if store is not None:
        stored = set(store.structures.ids({"_id": {"$in": ids}}))
        if level_of_theory is not None:
            labelled = store.labels.labelled_structures(ids, settings_hash(level_of_theory))
    else:
        notes.append("there is no store yet: nothing is stored or labelled")
    systems: dict[str, SystemPlan] = {}
    for candidate in candidates.values():
        plan = systems.setdefault(candidate.chemical_system, SystemPlan(0))
        plan.candidates += 1
        plan.already_stored += candidate.id in stored
        plan.already_labelled += candidate.id in labelled
    per_system = config.selection.per_system
    selector, ranking_note = effective_selector(config, per_system)
    if ranking_note:
        notes.append(ranking_note)
    gate = _gate_calculations(config, store, level_of_theory)
    for system, plan in systems.items():
        plan.picks = min(per_system, plan.candidates)
        plan.evaluation = min(config.evaluation.evaluation_set.per_system,
                              max(0, plan.candidates - plan.picks))  # fmt: skip
        seeds_here = sum(chemical_system(s.atoms) == system for s in seeds)
        eos = config.eos.points * seeds_here if config.eos.enabled else 0
        low, high = gate.get(system, (0, 0))
        plan.checks_min, plan.checks_max = low + eos, high + eos
        # Picks and the evaluation set come from the same candidates, labelled or not.
        wanted = plan.picks + plan.evaluation
        plan.dft_max = min(wanted, plan.candidates - plan.already_labelled) + plan.checks_max
        plan.dft_min = max(0, wanted - plan.already_labelled) + plan.checks_min
    run_id = run_id_for(config)
    recorded = store.runs.stage(run_id, "select") if store is not None else None
    resumed = bool(recorded and recorded.get("selected"))
    if resumed:
        picked = [s["id"] for s in recorded["selected"]]
        picked_systems = store.structures.chemical_systems(picked)
        for plan in systems.values():
            plan.picks = plan.dft_min = plan.dft_max = 0
        for sid in picked:
            plan = systems.setdefault(picked_systems.get(sid, "?"), SystemPlan(0))
            plan.picks += 1
            if sid not in labelled:
                plan.dft_min += 1
                plan.dft_max += 1
        notes[0] = f"run {run_id} already stored its selection: the count is exact"
    notes.append(
        "counted: the evaluation set (drawn at random, labelled first), the picks, the "
        "convergence gate's calculations (a range: raising a setting costs more) and the "
        "equation-of-state scans; already stored labels of the checks are not looked up"
    )
    return CampaignPlan(
        run_id=run_id,
        campaign=config.name,
        seeds=[{"name": s.name, "id": s.id, "chemical_system": chemical_system(s.atoms)}
               for s in seeds],
        candidates=list(candidates.values()),
        samplers=dict(per_sampler),
        rejected=dict(rejected),
        systems=dict(sorted(systems.items())),
        potential=config.potential.name,
        committee=[c.name for c in config.scoring.committee],
        weights=dict(config.scoring.weights),
        selector=selector.model_dump(),
        per_system=per_system,
        labeller=config.labeller.name,
        level_of_theory=level_of_theory,
        finetune=config.finetune.trainer.name if config.finetune.enabled else None,
        holdout_fraction=config.evaluation.holdout_fraction,
        store_exists=store is not None,
        resumed_selection=resumed,
        notes=notes,
    )  # fmt: skip


def _gate_calculations(
    config: CampaignConfig, store: Store | None, level_of_theory: dict[str, Any] | None
) -> dict[str, tuple[int, int]]:
    """Per chemical system, the fewest and most calculations the convergence gate makes:
    the representative structure and its undistorted cell at the configured settings and
    at one raised rung of each setting, or up to ``max_raises`` rungs when raising; none
    where a verdict is stored or the labeller declares nothing to converge."""
    from pestle.labellers import LABELLERS
    from pestle.store.checks import convergence_key

    options = config.convergence
    if not options.enabled:
        return {}
    try:
        labeller = LABELLERS.build(config.labeller.name, config.labeller.params)
        settings = labeller.convergence_settings()
    except Exception:  # a labeller that needs its code installed to say
        return {}
    if not settings:
        return {}
    per_rung = 2  # the distorted structure and its undistorted cell
    low = per_rung * (1 + len(settings))
    high = per_rung * (1 + len(settings) * (options.max_raises if options.auto_raise else 1))
    out = {}
    for seed in plan_seeds(config, store):
        system = chemical_system(seed.atoms)
        stored = (
            store is not None
            and level_of_theory is not None
            and store.checks.get(convergence_key(system, settings_hash(level_of_theory)))
        )
        out[system] = (0, 0) if stored else (low, high)
    return out
