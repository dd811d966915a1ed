"""Which fine-tuning recipe fixes one system without breaking another: every recipe on the same
training labels of a multi-system campaign, judged per chemical system on its evaluation set
and per seed on its DFT equation of state.

Input: a campaign's stored labels (default: the five-systems campaign at
``/work/campaign/work``, database ``pestle``, opened read-only) or an extxyz file written by
``--export`` (or by hand: ``info`` keys ``role`` train / validation / evaluation / check /
seed, ``seed`` the seed's name, ``kind`` ``eos`` for the E-V scan). Per system it takes the
training labels (at most 5), the validation pick(s), the evaluation set, the DFT E-V scan of
each seed and the seed itself.

The recipes that choose their epoch per system choose it on the validation picks. The
evaluation set can also be split (``--stopping-fraction``, default 0 as in pestle's
``finetune.stopping_fraction``; a stable hash of the structure id): the *stopping* part then
joins the validation picks, and every figure below is on the *reporting* rest, for every
recipe alike, so no recipe is judged on structures it chose its epoch on. With a small
evaluation set (6 per system) a split leaves too few structures to judge on.

Per recipe and system: the evaluation-set force MAE change (paired, pooled over components:
ratio with its structure-level CR2 interval), the softening scale before and after (CR2
interval), and per seed the bulk modulus ratio B/B_DFT of a Birch-Murnaghan fit of the
model's energies on the DFT scan's structures (interval from both fits). The last line is
JSON with everything.

    GPAW_SETUP_PATH=/usr/share/gpaw-setups nice -n 15 python benchmarks/bench_recipes.py \\
        [--work-dir DIR --database NAME | --extxyz FILE] [--recipes a,b] [--epochs 100] \\
        [--out results.json]

``--resplit F`` splits the picks again with pestle's split policy at validation fraction F
(0: every pick trains). A recipe listed as ``name-seedN`` is ``name`` with another shuffling
seed; the choice judges a recipe on all its trainings. The last table has one row per recipe.

``--out`` keeps each finished recipe, and a rerun skips them (a full fine-tune takes tens of
minutes on a shared CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ase import Atoms

from pestle.evaluation.eos import compare_eos, labelled_scan, potential_scan, stress_consistency
from pestle.evaluation.evaluate import evaluate
from pestle.potentials import POTENTIALS, Potential, from_checkpoint
from pestle.stages.evaluation_set import stopping_split
from pestle.stages.split import SplitPolicy
from pestle.structures import LabelledStructure, chemical_system
from pestle.trainers import TRAINERS
from pestle.trainers.linear import DisagreeingScales

DEFAULT_WORK_DIR = "/work/campaign/work"
MAX_TRAIN_PER_SYSTEM = 5
TOLERANCE = 0.10  # |B/B_DFT - 1| the issue asks for

# name -> (trainer params, whether the recipe chooses its epoch on the stopping part too).
# Constants not given are the trainer's (full: Deng et al. 2025's 0.1/100/0.1, Adam 1e-3 ->
# 1e-5 cosine, every weight trained). Any recipe also runs as ``name-seedN``: the same with
# shuffling seed N (``recipe``).


def _full(**given: Any) -> dict[str, Any]:
    return {"mode": "full", **given}


def _custom(**given: Any) -> dict[str, Any]:
    """``full``'s constants as a custom recipe, so that one of them can be varied."""
    constants = {"energy_weight": 0.1, "force_weight": 100.0, "stress_weight": 0.1,
                 "learning_rate": 1e-3, "freeze": "none"}  # fmt: skip
    return {"mode": "custom", **constants, **given}


_WORST, _LAST = {"select_epoch": "worst_system"}, {"select_epoch": "last"}
_RELATIVE = {"relative_loss_above": 1.0}  # labels above 1 eV/Å RMS weighted (1 / RMS)^2


def _plab(**given: Any) -> dict[str, Any]:
    """Stress weight 1, the relative loss, the last epoch, and replay whose stresses take,
    per seed, the pressure error the seed's strained labels measure (a line in volumetric
    strain): replay no longer holds the pretrained modulus."""
    return _custom(**_LAST, stress_weight=1.0, replay_pressure_from_labels=True, **_RELATIVE,
                   **given)  # fmt: skip


RECIPES: dict[str, tuple[dict[str, Any], bool]] = {
    "linear-model": ({"mode": "linear_correction"}, False),
    "linear-system": ({"mode": "linear_correction", "linear_scope": "system"}, False),
    "linear-element": ({"mode": "linear_correction", "linear_scope": "element"}, False),
    # The epoch chosen per system on the validation pick(s) (the 3-label campaign).
    "full": (_full(), False),
    "full-stop": (_full(**_WORST), True),
    "full-replay": (_full(**_WORST, replay_weight=1.0), True),
    "full-l2sp": (_full(**_WORST, l2sp=1.0), True),
    "full-replay-l2sp": (_full(**_WORST, replay_weight=1.0, l2sp=1.0), True),
    "replay-stress1": (_custom(**_WORST, stress_weight=1.0, replay_weight=1.0), True),
    "replay-lr3e-4": (_custom(**_WORST, learning_rate=3e-4, replay_weight=1.0), True),
    "full-replay3": (_full(**_WORST, replay_weight=3.0), True),
    "readout": (_custom(**_WORST, freeze="all_but_readout"), True),
    # The last epoch of the cosine decay: every pick trains (``--resplit 0``).
    "full-last": (_full(**_LAST), False),
    "full-l2sp-last": (_full(**_LAST, l2sp=1.0), False),
    "readout-last": (_custom(**_LAST, freeze="all_but_readout"), False),
    "full-replay-last": (_full(**_LAST, replay_weight=1.0), False),
    "full-rel-last": (_full(**_LAST, **_RELATIVE), False),
    "full-replay-rel-last": (_full(**_LAST, replay_weight=1.0, **_RELATIVE), False),
    "replay-stress1-last": (_custom(**_LAST, stress_weight=1.0, replay_weight=1.0), False),
    "replay-stress3-last": (_custom(**_LAST, stress_weight=3.0, replay_weight=1.0), False),
    "replay-stress1-rel-last": (
        _custom(**_LAST, stress_weight=1.0, replay_weight=1.0, **_RELATIVE),
        False,
    ),
    "replay-stress10-rel-last": (
        _custom(**_LAST, stress_weight=10.0, replay_weight=1.0, **_RELATIVE),
        False,
    ),
    # The rattled cells' stresses (20-110 GPa, their atoms' repulsion) left out: the
    # strained cells' few GPa carry the bulk modulus.
    "replay-stress1-sf3-last": (
        _custom(**_LAST, stress_weight=1.0, replay_weight=1.0, stress_below_force=3.0),
        False,
    ),
    "replay-stress3-sf3-last": (
        _custom(**_LAST, stress_weight=3.0, replay_weight=1.0, stress_below_force=3.0),
        False,
    ),
    "replay-nostress-stress3-sf3-last": (
        _custom(
            **_LAST,
            stress_weight=3.0,
            replay_weight=1.0,
            replay_stress=False,
            stress_below_force=3.0,
        ),
        False,
    ),  # fmt: skip
    # Labels weighted relative to their force scale and replay weighed less: the labels
    # (not the pretrained model) move the bulk moduli, the big rattles stiffen less.
    "replay0.3-stress1-rel-last": (
        _custom(**_LAST, stress_weight=1.0, replay_weight=0.3, **_RELATIVE),
        False,
    ),
    "replay0.3-stress1-rel-plab-last": (_plab(replay_weight=0.3), False),
    "replay-stress1-rel-plab-last": (_plab(replay_weight=1.0), False),
    "replay4-stress1-rel-plab-last": (_plab(replay_weight=1.0, replay_per_structure=4), False),
    # The replayed copies spread over +-8 % of each seed's volume (the strained labels'
    # range), not +-3 %: the labels' pressure line then holds the isotropic P(V) across it.
    "replay0.3x5v8-stress1-rel-plab-last": (
        _plab(replay_weight=0.3, replay_per_structure=5, replay_volume_strain=0.08),
        False,
    ),
    "replayx5v8-stress1-rel-plab-last": (
        _plab(replay_weight=1.0, replay_per_structure=5, replay_volume_strain=0.08),
        False,
    ),
    "replay0.3x3v8-stress1-rel-plab-last": (
        _plab(replay_weight=0.3, replay_per_structure=3, replay_volume_strain=0.08),
        False,
    ),
    "replay-stress1-plab-last": (
        _custom(**_LAST, stress_weight=1.0, replay_weight=1.0, replay_pressure_from_labels=True),
        False,
    ),
    "replay0.5-stress1-last": (_custom(**_LAST, stress_weight=1.0, replay_weight=0.5), False),
    "replay0.5-stress1-rel-last": (
        _custom(**_LAST, stress_weight=1.0, replay_weight=0.5, **_RELATIVE),
        False,
    ),
    # One replayed copy per seed, at its own volume: no volume-scaled copies (whose
    # pretrained stresses pin the pretrained bulk modulus).
    "replay1-stress1-last": (
        _custom(**_LAST, stress_weight=1.0, replay_weight=1.0, replay_per_structure=1),
        False,
    ),
    # Replay without its stresses: the volume dependence left to the labels' stresses.
    "replay-nostress-stress1-last": (
        _custom(**_LAST, stress_weight=1.0, replay_weight=1.0, replay_stress=False),
        False,
    ),
    "replay-nostress-stress1-rel-last": (
        _custom(**_LAST, stress_weight=1.0, replay_weight=1.0, replay_stress=False, **_RELATIVE),
        False,
    ),
    "replay-nostress-stress10-rel-last": (
        _custom(
            **_LAST, stress_weight=10.0, replay_weight=1.0, replay_stress=False, **_RELATIVE
        ),  # fmt: skip
        False,
    ),
}


def recipe(name: str) -> tuple[dict[str, Any], bool]:
    """A recipe by name; ``name-seedN`` is ``name`` with shuffling seed N."""
    found = re.fullmatch(r"(.+)-seed(\d+)", name)
    if found and found.group(1) in RECIPES:
        params, uses_stopping = RECIPES[found.group(1)]
        return {**params, "seed": int(found.group(2))}, uses_stopping
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)} (and name-seedN)")
    return RECIPES[name]


FULL_LIKE = {"full", "custom"}


@dataclass
class Campaign:
    """A campaign's labels per chemical system, its seeds and their DFT E-V scans."""

    train: dict[str, list[LabelledStructure]] = field(default_factory=lambda: defaultdict(list))
    validation: dict[str, list[LabelledStructure]] = field(
        default_factory=lambda: defaultdict(list)
    )
    evaluation: dict[str, list[LabelledStructure]] = field(
        default_factory=lambda: defaultdict(list)
    )
    eos: dict[str, list[Atoms]] = field(default_factory=lambda: defaultdict(list))
    seeds: dict[str, Atoms] = field(default_factory=dict)
    source: str = ""

    @property
    def systems(self) -> list[str]:
        return sorted(self.train)

    def export(self, path: Path) -> None:
        from ase.io import write

        frames = []
        for role, sets in (("train", self.train), ("validation", self.validation),
                           ("evaluation", self.evaluation)):  # fmt: skip
            for labelled in sets.values():
                for ls in labelled:
                    atoms = ls.atoms.copy()
                    atoms.calc = ls.atoms.calc
                    atoms.info = {"role": role, "sid": ls.structure_id, "lid": ls.label_id,
                                  "sampler": ls.atoms.info.get("sampler", "")}  # fmt: skip
                    frames.append(atoms)
        for name, scan in self.eos.items():
            for k, atoms in enumerate(scan):
                copy = atoms.copy()
                copy.calc = atoms.calc
                copy.info = {"role": "check", "kind": "eos", "seed": name, "sid": f"{name}-eos{k}"}
                frames.append(copy)
        for name, atoms in self.seeds.items():
            copy = atoms.copy()
            copy.info = {"role": "seed", "seed": name, "sid": name}
            frames.append(copy)
        write(path, frames, format="extxyz")


def from_store(work_dir: str, database: str, run_id: str | None = None) -> Campaign:
    """The campaign's labels, read only (the store is opened only when its schema is this
    pestle's, so nothing migrates it): the picks one run split (``run_id``; by default the
    newest run that split its picks), with the evaluation set and the seeds' E-V scans."""
    from pestle.store import Store, resolve_uri

    uri = resolve_uri(work_dir, start=False)
    if not Store.exists(uri, database):
        raise SystemExit(f"no pestle store {database!r} at {work_dir}")
    with Store(uri, database) as store:
        if run_id is None:
            runs = store.runs.with_stage("split")
            if not runs:
                raise SystemExit(f"no run in {work_dir} has split its picks")
            run_id = runs[-1].id
        split = store.runs.stage(run_id, "split")
        if split is None:
            raise SystemExit(f"run {run_id} has not split its picks")
        picks = {i for part in split.values() for ids in part.values() for i in ids}
        source = f"store {work_dir} ({database}), picks of run {run_id}"
        return _read(store, Campaign(source=source), picks)


def _read(store: Any, campaign: Campaign, picks: set[str]) -> Campaign:
    seeds = {d.id: d for d in store.structures.find({"kind": "seed"})}
    for doc in seeds.values():
        campaign.seeds[doc.name or doc.id] = store.structures.atoms_of(doc)
    sets = {"train": campaign.train, "validation": campaign.validation,
            "evaluation": campaign.evaluation}  # fmt: skip
    # The run's picks (earlier runs' picks keep their role) and the evaluation set.
    stored_labels = [
        stored
        for stored in store.labels.labelled({"role": {"$in": list(sets)}})
        if stored.label.role == "evaluation" or stored.label.id in picks
    ]
    # Each system at one level of theory: its newest training label's (the gate may raise a
    # system's settings, and a raised system is labelled again at them; the old labels stay).
    newest: dict[str, Any] = {}
    seen: dict[str, set[str]] = defaultdict(set)
    for stored in stored_labels:
        label, system = stored.label, stored.chemical_system
        seen[system].add(label.lot_hash)
        if label.role == "train" and (
            system not in newest or _created(label) > _created(newest[system])
        ):
            newest[system] = label
    lots = {system: {label.lot_hash} for system, label in newest.items()}
    for system, hashes in sorted(seen.items()):
        if len(hashes) > 1 and system in newest:
            print(f"{system}: labels at {len(hashes)} levels of theory; read at its newest "
                  f"training label's ({_lot_words(newest[system].level_of_theory)})")  # fmt: skip
    for stored in stored_labels:
        if stored.label.lot_hash in lots.get(stored.chemical_system, ()):
            ls = stored.labelled()
            ls.atoms.info["sampler"] = stored.sampler
            sets[stored.label.role][stored.chemical_system].append(ls)
    for stored in store.labels.labelled({"role": "check"}):
        if stored.label.lot_hash not in lots.get(stored.chemical_system, ()):
            continue
        if stored.structure.kind == "seed":
            # The scan's middle point is the seed itself (the same structure, stored once).
            parent = seeds.get(stored.structure.id)
        elif stored.structure.kind == "eos":
            parent = seeds.get(stored.structure.provenance.parent_id or "")
        else:
            continue
        if parent is not None:
            campaign.eos[parent.name or parent.id].append(stored.atoms)
    return campaign


def _created(label: Any) -> float:
    return label.created_at.timestamp() if label.created_at else 0.0


def _lot_words(level_of_theory: dict[str, Any]) -> str:
    keys = ("ecut", "kpoint_density")
    return ", ".join(f"{k} {level_of_theory[k]:g}" for k in keys if k in level_of_theory) or "?"


def from_extxyz(path: str) -> Campaign:
    from ase.io import read

    campaign = Campaign(source=f"extxyz {path}")
    sets = {"train": campaign.train, "validation": campaign.validation,
            "evaluation": campaign.evaluation}  # fmt: skip
    for atoms in read(path, ":"):
        role = atoms.info.get("role")
        sid = str(atoms.info.get("sid"))
        if role in sets:
            ls = LabelledStructure(atoms, sid, str(atoms.info.get("lid", sid)))
            sets[role][chemical_system(atoms)].append(ls)
        elif role == "check" and atoms.info.get("kind") == "eos":
            campaign.eos[str(atoms.info["seed"])].append(atoms)
        elif role == "seed":
            atoms.calc = None
            campaign.seeds[str(atoms.info["seed"])] = atoms
    return campaign


def samplers(labelled: list[LabelledStructure]) -> str:
    counts = Counter(str(ls.atoms.info.get("sampler", "?")) for ls in labelled)
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def resplit(campaign: Campaign, validation_fraction: float, seed: int) -> None:
    """Training and validation picks again, as pestle's split policy decides them today."""
    policy = SplitPolicy(seed=seed, holdout_fraction=0.0, validation_fraction=validation_fraction)
    for system in campaign.systems:
        picks = {ls.label_id: ls for ls in campaign.train[system] + campaign.validation[system]}
        samplers = {i: str(ls.atoms.info.get("sampler", "")) for i, ls in picks.items()}
        roles = policy.assign({system: sorted(picks)}, {}, samplers)
        campaign.train[system] = [picks[i] for i in sorted(picks) if roles[i] == "train"]
        campaign.validation[system] = [picks[i] for i in sorted(picks) if roles[i] == "validation"]


# -- judging ---------------------------------------------------------------------------------


def loaded(trained: Any) -> Potential:
    return from_checkpoint(trained.potential, {**trained.potential_params, "device": "cpu"},
                           trained.checkpoint)  # fmt: skip


def eos_ratios(potential: Potential, campaign: Campaign) -> dict[str, dict[str, Any]]:
    out = {}
    for name, scan in sorted(campaign.eos.items()):
        reference = labelled_scan(scan)
        fit = potential_scan(potential, scan)
        comparison = compare_eos(fit, reference)
        out[name] = {
            "reference_stress_consistency": stress_consistency(scan, reference, TOLERANCE / 2),
            "status": comparison.status,
            "b0": fit.b0,
            "b0_dft": reference.b0,
            "ratio": comparison.b0_ratio,
            "low": comparison.b0_ratio_interval[0],
            "high": comparison.b0_ratio_interval[1],
            "message": comparison.message,
        }
    return out


def judge(
    name: str, potential: Potential, pretrained: Potential, reporting: list[LabelledStructure]
) -> dict[str, dict[str, Any]]:
    """Per system: paired force MAE change and softening before/after on ``reporting``."""
    ev = evaluate({"pretrained": pretrained, name: potential}, reporting,
                  groups=("chemical_system",), stress=False)  # fmt: skip
    out = {}
    for system in sorted(ev.levels["chemical_system"]):
        d = ev.paired(name, "force_mae", "chemical_system", system)
        r = ev.paired(name, "force_mae_ratio", "chemical_system", system)
        before = ev.metrics("pretrained", "chemical_system", system).softening
        after = ev.metrics(name, "chemical_system", system).softening
        out[system] = {
            "n_structures": d.n_structures,
            "force_mae_before": d.baseline,
            "force_mae_after": d.candidate,
            "mae_ratio": d.ratio,
            "mae_ratio_low": d.ratio_low,
            "mae_ratio_high": d.ratio_high,
            "worse": d.worse(),
            "improved": d.improved(),
            "per_structure_ratio": r.ratio,
            "per_structure_ratio_low": r.ratio_low,
            "per_structure_ratio_high": r.ratio_high,
            "softening_before": [before.value, before.low, before.high],
            "softening_after": [after.value, after.low, after.high],
        }
    return out


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Systems worse beyond their interval, systems not improved (point), seeds whose bulk
    modulus ratio lies outside 1 ± 10 % (point), and the geometric mean MAE ratio."""
    systems = result.get("systems") or {}
    eos = result.get("eos") or {}
    ratios = [v["mae_ratio"] for v in systems.values() if _finite(v["mae_ratio"])]
    return {
        "worse": sorted(s for s, v in systems.items() if v["worse"]),
        "not_improved": sorted(s for s, v in systems.items() if not v["mae_ratio"] < 1),
        "eos_outside": sorted(
            n
            for n, v in eos.items()
            if not (_finite(v["ratio"]) and abs(v["ratio"] - 1) <= TOLERANCE)
        ),
        "geometric_mean_mae_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios))
        if ratios
        else None,
        # How far the worst bulk modulus lies beyond the tolerance (0 when all are within;
        # infinite when a fit failed).
        "largest_eos_excess": max(
            (
                abs(v["ratio"] - 1) - TOLERANCE if _finite(v["ratio"]) else math.inf
                for v in eos.values()
            ),
            default=0.0,
        )
        if eos
        else 0.0,  # fmt: skip
    }


def recipe_verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each recipe's verdict over its trainings (``name`` and ``name-seedN``)."""
    trainings: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for name, result in results.items():
        if name != "pretrained" and "verdict" in result:
            trainings[re.sub(r"-seed\d+$", "", name)].append(result["verdict"])
    out = {}
    for recipe, verdicts in trainings.items():
        ratios = [v["geometric_mean_mae_ratio"] for v in verdicts
                  if _finite(v["geometric_mean_mae_ratio"])]  # fmt: skip
        out[recipe] = {
            key: sorted({item for v in verdicts for item in v[key]})
            for key in ("worse", "not_improved", "eos_outside")
        } | {
            "geometric_mean_mae_ratio": sum(ratios) / len(ratios) if ratios else None,
            "largest_eos_excess": max(
                (v.get("largest_eos_excess", 0.0) for v in verdicts), default=0.0
            ),  # fmt: skip
            "trainings": len(verdicts),
        }
    return out


def choose(results: dict[str, Any]) -> tuple[str | None, bool]:
    """The recipe to make the default: among those with no system worse beyond its interval
    and a better geometric mean, the largest improvement; recipes that also improve every
    system (point) and keep every bulk modulus within ±10 % go first; when none does, those
    that improve every system and keep the most bulk moduli within ±10 %, and of those the
    ones whose worst bulk modulus misses by least (a recipe that lowers the force error by
    breaking the equation of state is not the better one).
    Whether the choice meets all of that is the second value.

    A recipe trained with several seeds (``name-seedN``) is judged as one: a system is worse,
    or a bulk modulus outside, if it is so in any of its trainings, and its improvement is
    the mean of theirs (choosing the luckiest training would choose noise)."""
    eligible = {
        n: v
        for n, v in recipe_verdicts(results).items()
        if not v["worse"] and (v["geometric_mean_mae_ratio"] or 1) < 1
    }
    complete = {n: v for n, v in eligible.items()
                if not v["not_improved"] and not v["eos_outside"]}  # fmt: skip
    if complete:
        pool = complete
    else:
        improving = {n: v for n, v in eligible.items() if not v["not_improved"]} or eligible
        fewest = min((len(v["eos_outside"]) for v in improving.values()), default=0)
        pool = {n: v for n, v in improving.items() if len(v["eos_outside"]) == fewest}
        # Then the smallest miss: how far the worst bulk modulus of any training lies
        # beyond ±10 % (a count hides whether a seed is 0.89 or 0.75).
        least = min((v["largest_eos_excess"] for v in pool.values()), default=0.0)
        pool = {n: v for n, v in pool.items() if v["largest_eos_excess"] <= least + 1e-9}
    best = min(pool, key=lambda n: pool[n]["geometric_mean_mae_ratio"], default=None)
    return best, bool(complete)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# -- running ---------------------------------------------------------------------------------


def run_recipe(
    name: str,
    params: dict[str, Any],
    uses_stopping: bool,
    campaign: Campaign,
    stopping: dict[str, list[LabelledStructure]],
    args: argparse.Namespace,
) -> tuple[Any, dict[str, Any]]:
    train = [ls for s in campaign.systems for ls in campaign.train[s]]
    val = [ls for s in campaign.systems for ls in campaign.validation[s]]
    if uses_stopping:
        val += [ls for s in campaign.systems for ls in stopping.get(s, [])]
    params = dict(params)
    if params.get("mode") in FULL_LIKE:
        params.setdefault("epochs", args.epochs)
        if uses_stopping and args.patience:
            params.setdefault("patience", args.patience)
    trainer = TRAINERS.build("chgnet", params)
    seeds = list(campaign.seeds.values())
    started = time.time()
    trained = trainer.train(train, val, Path(args.workdir) / name, seeds=seeds)
    return trained, {
        "params": trainer.params.model_dump(mode="json"),
        "n_train": len(train),
        "n_val": len(val),
        "seconds": time.time() - started,
        "metrics": {
            k: v
            for k, v in trained.metrics.items()
            if k
            in (
                "best_epoch",
                "selection",
                "stopped",
                "linear_scale",
                "linear_scales",
                "system_scales",
                "replay",
                "atom_ref_shift_eV_per_atom",
            )
        },  # fmt: skip
        "epochs_run": len(trained.metrics.get("epochs") or []),
    }


def fmt_ratio(v: dict[str, Any]) -> str:
    return (
        f"{100 * (v['mae_ratio'] - 1):+.0f}% [{100 * (v['mae_ratio_low'] - 1):+.0f}, "
        f"{100 * (v['mae_ratio_high'] - 1):+.0f}]"
    )


def fmt_est(v: list[float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def table(results: dict[str, Any], campaign: Campaign) -> str:
    lines = [
        "| recipe | system | force MAE change [95% CI] | softening before | softening after "
        "| seed | B/B_DFT before | B/B_DFT after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pre_eos = results["pretrained"]["eos"]
    seed_of = {chemical_system(atoms): name for name, atoms in campaign.seeds.items()}
    for name, result in results.items():
        if name == "pretrained":
            continue
        if "refused" in result:
            lines.append(f"| {name} | all | refused: {result['refused']} | | | | | |")
            continue
        for system, v in result["systems"].items():
            seed = seed_of.get(system, "")
            before = pre_eos.get(seed, {}).get("ratio", math.nan)
            after = result["eos"].get(seed, {}).get("ratio", math.nan)
            lines.append(
                f"| {name} | {system} | {fmt_ratio(v)} | {fmt_est(v['softening_before'])} | "
                f"{fmt_est(v['softening_after'])} | {seed} | {before:.3f} | {after:.3f} |"
            )
    return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
    """One row per recipe: each seed's B/B_DFT per training (seeds of one recipe side by
    side), the systems not improved, and the geometric-mean MAE ratio per training."""
    verdicts = recipe_verdicts(results)
    seeds = sorted({seed for r in results.values() for seed in (r.get("eos") or {})})
    lines = [
        "| recipe | " + " | ".join(f"{s} B/B_DFT" for s in seeds)
        + " | seeds outside ±10 % | systems not improved | geometric-mean MAE ratio |",
        "|---" * (len(seeds) + 4) + "|",
    ]  # fmt: skip
    pre = results.get("pretrained", {}).get("eos", {})
    lines.append("| pretrained | " + " | ".join(f"{pre[s]['ratio']:.2f}" if s in pre else ""
                                                 for s in seeds) + " | | | 1 |")  # fmt: skip
    for recipe, verdict_of in verdicts.items():
        names = sorted((n for n in results if re.sub(r"-seed\d+$", "", n) == recipe),
                       key=lambda n: int(n.rsplit("-seed", 1)[1]) if "-seed" in n else 0)  # fmt: skip
        cells = [" / ".join(f"{results[n]['eos'][s]['ratio']:.2f}" for n in names
                            if s in results[n].get("eos", {})) for s in seeds]  # fmt: skip
        geo = " / ".join(f"{results[n]['verdict']['geometric_mean_mae_ratio']:.3f}"
                         for n in names)  # fmt: skip
        lines.append(
            f"| {recipe} | " + " | ".join(cells)
            + f" | {', '.join(verdict_of['eos_outside']) or 'none'}"
            + f" | {', '.join(verdict_of['not_improved']) or 'none'} | {geo} |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=DEFAULT_WORK_DIR)
    parser.add_argument("--database", default="pestle")
    parser.add_argument(
        "--run", help="the run whose picks train (default: the newest run that split its picks)"
    )
    parser.add_argument("--extxyz", help="read the campaign from this file instead")
    parser.add_argument("--export", help="write the campaign's labels to this extxyz and stop")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=0,
                        help="recipes that stop per system: stop after this many epochs "
                             "without a better one (0: run every epoch)")  # fmt: skip
    parser.add_argument("--stopping-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--resplit", type=float, metavar="VALIDATION_FRACTION",
                        help="split the picks (training and validation labels) again with "
                             "pestle's split policy at this validation fraction and --seed "
                             "(which keeps each sampler's last label training)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/pestle-bench-recipes")
    parser.add_argument("--out", help="JSON of finished recipes (a rerun skips them)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    campaign = (
        from_extxyz(args.extxyz)
        if args.extxyz
        else from_store(args.work_dir, args.database, args.run)
    )
    if args.export:
        campaign.export(Path(args.export))
        print(f"wrote {args.export}")
        return 0
    if args.resplit is not None:
        resplit(campaign, args.resplit, args.seed)
    for system in campaign.systems:
        n = len(campaign.train[system])
        if n > MAX_TRAIN_PER_SYSTEM:
            raise SystemExit(f"{system}: {n} training labels, above {MAX_TRAIN_PER_SYSTEM}")
    split = stopping_split(
        {s: [ls.structure_id for ls in campaign.evaluation[s]] for s in campaign.systems},
        args.stopping_fraction,
        args.seed,
    )
    stop_ids = {i for ids in split.values() for i in ids}
    stopping = {
        s: [ls for ls in campaign.evaluation[s] if ls.structure_id in stop_ids]
        for s in campaign.systems
    }
    reporting = [
        ls
        for s in campaign.systems
        for ls in campaign.evaluation[s]
        if ls.structure_id not in stop_ids
    ]
    print(f"campaign: {campaign.source}")
    for s in campaign.systems:
        print(
            f"  {s}: {len(campaign.train[s])} train ({samplers(campaign.train[s])}), "
            f"{len(campaign.validation[s])} validation ({samplers(campaign.validation[s])}), "
            f"{len(stopping[s])} evaluation for stopping, "
            f"{sum(ls.structure_id not in stop_ids for ls in campaign.evaluation[s])} for "
            f"reporting; seeds' E-V scans: "
            + ", ".join(
                f"{n} ({len(v)})"
                for n, v in campaign.eos.items()
                if chemical_system(campaign.seeds[n]) == s
            )  # fmt: skip
        )

    out = Path(args.out) if args.out else None
    results: dict[str, Any] = json.loads(out.read_text()) if out and out.is_file() else {}
    pretrained = POTENTIALS.build("chgnet", {"device": "cpu"})
    if "pretrained" not in results:
        results["pretrained"] = {"eos": eos_ratios(pretrained, campaign)}
    for name, entry in sorted(results["pretrained"]["eos"].items()):
        consistency = entry.get("reference_stress_consistency") or {}
        print(f"  {name} DFT scan: {consistency.get('message', '')}")
    for name in [r for r in args.recipes.split(",") if r]:
        if name in results:
            print(f"{name}: kept from {out}")
            continue
        params, uses_stopping = recipe(name)
        print(f"{name}: training ...", flush=True)
        try:
            trained, info = run_recipe(name, params, uses_stopping, campaign, stopping, args)
        except DisagreeingScales as exc:
            results[name] = {"refused": str(exc)}
        else:
            potential = loaded(trained)
            results[name] = {
                **info,
                "systems": judge(name, potential, pretrained, reporting),
                "eos": eos_ratios(potential, campaign),
            }
            results[name]["verdict"] = verdict(results[name])
            print(f"{name}: {results[name]['verdict']} ({info['seconds']:.0f} s)", flush=True)
        if out:
            out.write_text(json.dumps(results, indent=1, default=str))

    print()
    print(table(results, campaign))
    print()
    print(summary_table(results))
    best, meets_all = choose(results)
    print()
    for n, r in results.items():
        if n != "pretrained" and "verdict" in r:
            print(f"{n}: {r['verdict']}")
    for n, v in recipe_verdicts(results).items():
        print(f"recipe {n} over {v['trainings']} training(s): {v}")
    print(f"no system worse and the largest improvement: {best}"
          + (" (also: every system improved, every bulk modulus within ±10 %)" if meets_all
             else " (NOT every system improved with every bulk modulus within ±10 %)" if best
             else ""))  # fmt: skip
    print(json.dumps({"source": campaign.source, "stopping": split, "results": results,
                      "best": best, "meets_all": meets_all}, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
