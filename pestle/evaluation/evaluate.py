"""One evaluation of potentials against reference labels: every figure pestle shows or
decides on, per group of structures, with structure-level intervals.

``evaluate(models, labelled)`` predicts once per model (one batched ``predict``), then for
every group value (all structures; each chemical system; each system and sampler) and every
model: softening scale, mean |1 - s| over the group's systems, force MAE and RMSE, energy
MAE per atom (absolute, and with each system's mean offset removed), stress MAE, and the
softening scale in bins of the reference force magnitude per atom; each figure with its
structure-level interval (``pestle.evaluation.intervals``) and the number of structures, and
the component t interval of the softening scale as a secondary field. Models other than the
baseline are also compared with it on the same structures (paired differences with their
intervals), which is what a promotion decides on.

The result is JSON-friendly through ``Evaluation.as_dict()``; arrays for plots stay in the
``Evaluation`` object (``arrays(level, key)``) and are never part of what is stored.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import units

from pestle.evaluation.intervals import (
    DEFAULT_MIN_STRUCTURES,
    Difference,
    Estimate,
    IntervalOptions,
    energy_mae_interval,
    mae_interval,
    paired_energy_mae,
    paired_error_ratio,
    paired_mae,
    paired_softening,
    rmse_interval,
    softening_distance_interval,
    softening_interval,
)
from pestle.structures import LabelledStructure, chemical_system

if TYPE_CHECKING:
    from pestle.potentials import Potential, Prediction

UNKNOWN = "unknown"
ALL = "all"
# Per-atom |F_ref| bin edges (eV/A): near-equilibrium to strongly displaced.
DEFAULT_FORCE_BINS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf)
DEFAULT_GROUPS: tuple[str | tuple[str, ...], ...] = (
    "chemical_system",
    ("chemical_system", "sampler"),
)
# Figures compared between a model and the baseline on the same structures.
PAIRED_METRICS = (
    "force_mae",
    "force_mae_ratio",
    "softening",
    "softening_distance",
    "energy_mae_per_atom_offset_removed",
    "stress_mae_gpa",
)


@dataclass(frozen=True)
class ForceBin:
    """Softening scale of the atoms whose reference force norm is in ``[low, high)``.
    Structures are still the independent unit (those with at least one atom in the bin)."""

    low: float
    high: float
    n_atoms: int
    softening: Estimate

    @property
    def label(self) -> str:
        high = "∞" if math.isinf(self.high) else f"{self.high:g}"
        return f"{self.low:g}–{high}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": None if math.isinf(self.high) else self.high,
            "n_atoms": self.n_atoms,
            "softening": self.softening.as_dict(),
        }


@dataclass(frozen=True)
class ModelMetrics:
    """One model's figures on one group of structures. Units: forces eV/A, energies
    eV/atom, stresses GPa. ``softening_distance``: mean over the group's chemical systems of
    |1 - s| of each system. ``energy_mae_per_atom`` compares absolute energies (meaningful
    only when model and labels share the zero of energy)."""

    n_structures: int
    n_force_components: int
    softening: Estimate
    softening_distance: Estimate
    force_mae: Estimate
    force_rmse: Estimate
    energy_mae_per_atom: Estimate
    energy_mae_per_atom_offset_removed: Estimate
    stress_mae_gpa: Estimate
    softening_by_force: tuple[ForceBin, ...] = ()

    ESTIMATES = (
        "softening",
        "softening_distance",
        "force_mae",
        "force_rmse",
        "energy_mae_per_atom",
        "energy_mae_per_atom_offset_removed",
        "stress_mae_gpa",
    )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_structures": self.n_structures,
            "n_force_components": self.n_force_components,
        }
        for name in self.ESTIMATES:
            out[name] = getattr(self, name).as_dict()
        out["softening_by_force"] = [b.as_dict() for b in self.softening_by_force]
        return out


@dataclass(frozen=True)
class GroupResult:
    """One group of structures: ``level`` (e.g. ``"chemical_system+sampler"``), ``key``
    (e.g. ``"Si/rattle"``), ``group`` ({"chemical_system": "Si", "sampler": "rattle"}),
    the figures of every model, and ``paired[model][metric]``: the model minus the baseline."""

    level: str
    key: str
    group: dict[str, str]
    n_structures: int
    models: dict[str, ModelMetrics]
    paired: dict[str, dict[str, Difference]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "key": self.key,
            "group": dict(self.group),
            "n_structures": self.n_structures,
            "models": {name: m.as_dict() for name, m in self.models.items()},
            "paired": {
                name: {metric: d.as_dict() for metric, d in per.items()}
                for name, per in self.paired.items()
            },
        }


@dataclass
class _Structures:
    """Reference data and every model's predictions, one entry per structure."""

    ids: list[str]
    systems: list[str]
    values: dict[str, list[str]]  # group key -> value per structure
    ref_forces: list[np.ndarray | None]
    ref_energy: np.ndarray
    n_atoms: np.ndarray
    ref_stress: list[np.ndarray | None]  # GPa, Voigt
    forces: dict[str, list[np.ndarray]]
    energy: dict[str, np.ndarray]
    stress: dict[str, list[np.ndarray | None]]  # GPa, Voigt

    def with_forces(self, members: Sequence[int]) -> list[int]:
        return [i for i in members if self.ref_forces[i] is not None]

    def with_energy(self, members: Sequence[int]) -> list[int]:
        return [i for i in members if np.isfinite(self.ref_energy[i])]

    def with_stress(self, members: Sequence[int], models: Sequence[str]) -> list[int]:
        """Structures with a reference stress and one from every model of ``models``."""
        return [
            i
            for i in members
            if self.ref_stress[i] is not None and all(self.stress[m][i] is not None for m in models)
        ]


@dataclass
class Evaluation:
    """Result of ``evaluate``: ``levels[level][key]`` is a ``GroupResult``; level ``"all"``
    has the single key ``"all"``."""

    models: list[str]
    baseline: str
    settings: dict[str, Any]
    levels: dict[str, dict[str, GroupResult]]
    _data: _Structures = field(repr=False)
    _members: dict[tuple[str, str], list[int]] = field(repr=False)

    @property
    def n_structures(self) -> int:
        return len(self._data.ids)

    def group(self, level: str = ALL, key: str = ALL) -> GroupResult:
        try:
            return self.levels[level][key]
        except KeyError:
            raise KeyError(f"no group {level} = {key!r}; levels: {list(self.levels)}") from None

    def metrics(self, model: str, level: str = ALL, key: str = ALL) -> ModelMetrics:
        return self.group(level, key).models[model]

    def paired(self, model: str, metric: str, level: str = ALL, key: str = ALL) -> Difference:
        """``model`` minus the baseline on ``metric`` (one of ``PAIRED_METRICS``)."""
        if model == self.baseline:
            raise ValueError(f"{model} is the baseline")
        return self.group(level, key).paired[model][metric]

    def regressions(
        self,
        model: str,
        metric: str = "force_mae",
        level: str = "chemical_system",
        tolerance: float = 0.0,
    ) -> dict[str, Difference]:
        """Group values where ``model`` is worse than the baseline with its whole interval
        (``Difference.worse(tolerance)``), e.g. chemical systems a candidate breaks."""
        return {
            key: result.paired[model][metric]
            for key, result in self.levels.get(level, {}).items()
            if result.paired[model][metric].worse(tolerance)
        }

    def as_dict(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-friendly (undefined numbers are None)."""
        return {
            "models": list(self.models),
            "baseline": self.baseline,
            "n_structures": self.n_structures,
            "settings": dict(self.settings),
            "levels": {
                level: {key: result.as_dict() for key, result in values.items()}
                for level, values in self.levels.items()
            },
        }

    def model_summary(self, model: str) -> dict[str, Any]:
        """One model's figures, ``{level: {key: metrics}}`` (what a model version keeps)."""
        return {
            "settings": dict(self.settings),
            "levels": {
                level: {key: result.models[model].as_dict() for key, result in values.items()}
                for level, values in self.levels.items()
            },
        }

    def forces_per_structure(
        self, model: str, level: str = ALL, key: str = ALL
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(model forces, reference forces), one (n_atoms, 3) array per structure of the
        group that has reference forces: the input of ``intervals.softening_interval``."""
        data = self._data
        members = data.with_forces(self._members[(level, key)])
        return [data.forces[model][i] for i in members], [data.ref_forces[i] for i in members]

    def structure_ids(self, level: str = ALL, key: str = ALL) -> list[str]:
        return [self._data.ids[i] for i in self._members[(level, key)]]

    def arrays(self, level: str = ALL, key: str = ALL) -> dict[str, Any]:
        """Arrays for plots of one group: ``reference_forces`` (components), per model
        ``forces`` (components), ``atom_force_norm`` (|F_ref| per atom), per model
        ``atom_force_error`` (|F_model - F_ref| per atom), ``reference_energy`` and per model
        ``energy`` (per atom, each system's mean removed from each, so parity is of relative
        energies; ``reference_energy_absolute`` and ``energy_absolute`` without),
        ``reference_stress`` and per model ``stress`` (GPa, structures with a stress from the
        reference and every model)."""
        data = self._data
        members = self._members[(level, key)]
        with_forces = data.with_forces(members)
        ref = [data.ref_forces[i] for i in with_forces]
        out: dict[str, Any] = {
            "reference_forces": _cat([f.ravel() for f in ref]),
            "atom_force_norm": _cat([np.linalg.norm(f, axis=1) for f in ref]),
            "forces": {},
            "atom_force_error": {},
            "energy": {},
            "stress": {},
        }
        for name in self.models:
            model = [data.forces[name][i] for i in with_forces]
            out["forces"][name] = _cat([f.ravel() for f in model])
            out["atom_force_error"][name] = _cat(
                [np.linalg.norm(m - r, axis=1) for m, r in zip(model, ref, strict=True)]
            )
        with_energy = data.with_energy(members)
        systems = [data.systems[i] for i in with_energy]
        counts = data.n_atoms[with_energy]
        out["reference_energy_absolute"] = data.ref_energy[with_energy] / counts
        out["reference_energy"] = _relative(out["reference_energy_absolute"], systems)
        out["energy_absolute"] = {}
        for name in self.models:
            out["energy_absolute"][name] = data.energy[name][with_energy] / counts
            out["energy"][name] = _relative(out["energy_absolute"][name], systems)
        with_stress = data.with_stress(members, self.models)
        out["reference_stress"] = _cat([data.ref_stress[i] for i in with_stress])
        for name in self.models:
            out["stress"][name] = _cat([data.stress[name][i] for i in with_stress])
        return out

    def table(self) -> str:
        from pestle.evaluation.compare import markdown_table

        return markdown_table(self)


def stored_softening(
    metrics: Mapping[str, Any], level: str = "chemical_system", model: str | None = None
) -> dict[str, Estimate]:
    """Softening scale per group from a stored evaluation, whatever its shape:
    ``Evaluation.as_dict()`` (give ``model``), ``Evaluation.model_summary(model)``, or the
    per-system shape of ``metrics.legacy_metrics`` / older records. Records made before
    structure-level intervals hold the component t interval in ``ci_low``/``ci_high``: it is
    returned as ``component_low``/``component_high`` and the structure-level interval is NaN
    (unknown), so a reader never shows it as structure-level."""
    if "levels" in metrics:
        values = metrics["levels"].get(level, {})
        out = {}
        for key, entry in values.items():
            figures = entry["models"][model] if "models" in entry and model else entry
            if "softening" in figures:
                out[key] = Estimate.from_dict(figures["softening"])
        return out
    out = {}
    for system, entry in metrics.items():
        if not isinstance(entry, Mapping) or "softening" not in entry:
            continue
        if "intervals" in entry and "softening" in entry["intervals"]:
            out[system] = Estimate.from_dict(entry["intervals"]["softening"])
            continue
        fit = entry["softening"]
        n_structures = int(entry.get("n_structures") or 0)
        nan = math.nan
        out[system] = Estimate(
            _float(fit.get("slope")), nan, nan, n_structures, int(fit.get("n") or 0),
            component_low=_float(fit.get("ci_low")), component_high=_float(fit.get("ci_high")),
        )  # fmt: skip
    return out


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _cat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0)


def _relative(per_atom: np.ndarray, systems: Sequence[str]) -> np.ndarray:
    out = np.array(per_atom, dtype=float)
    for system in set(systems):
        mask = np.array([s == system for s in systems])
        out[mask] -= out[mask].mean()
    return out


def _voigt_gpa(stress: Any) -> np.ndarray | None:
    if stress is None:
        return None
    s = np.asarray(stress, dtype=float)
    if s.shape == (3, 3):
        s = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    if s.shape != (6,):
        return None
    return s / units.GPa


def group_value(ls: LabelledStructure, key: str, samplers: Mapping[str, str] | None = None) -> str:
    """A structure's value of a group key: ``"chemical_system"`` (e.g. ``F-Li``),
    ``"sampler"`` (``samplers[structure_id]`` when given, else ``atoms.info["sampler"]``), or
    any other ``atoms.info`` key; ``"unknown"`` when absent."""
    if key == "chemical_system":
        return chemical_system(ls.atoms)
    if key == "sampler" and samplers is not None and ls.structure_id in samplers:
        return str(samplers[ls.structure_id])
    return str(ls.atoms.info.get(key, UNKNOWN))


def _collect(
    predictions: Mapping[str, Sequence[Prediction]],
    labelled: Sequence[LabelledStructure],
    keys: set[str],
    samplers: Mapping[str, str] | None,
) -> _Structures:
    ref_forces: list[np.ndarray | None] = []
    ref_energy, ref_stress, n_atoms = [], [], []
    for ls in labelled:
        if ls.atoms.calc is None:
            raise ValueError(f"structure {ls.structure_id} has no reference results")
        results = ls.atoms.calc.results
        forces = results.get("forces")
        if forces is not None:
            forces = np.asarray(forces, dtype=float).reshape(-1, 3)
            if forces.shape[0] != len(ls.atoms):
                raise ValueError(f"structure {ls.structure_id}: forces of {forces.shape[0]} "
                                 f"atoms for {len(ls.atoms)}")  # fmt: skip
        ref_forces.append(forces)
        energy = results.get("energy")
        ref_energy.append(math.nan if energy is None else float(energy))
        ref_stress.append(_voigt_gpa(results.get("stress")))
        n_atoms.append(len(ls.atoms))
    forces_by_model, energy_by_model, stress_by_model = {}, {}, {}
    for name, preds in predictions.items():
        if len(preds) != len(labelled):
            raise ValueError(f"{name}: {len(preds)} predictions for {len(labelled)} structures")
        forces_by_model[name] = [np.asarray(p.forces, dtype=float).reshape(-1, 3) for p in preds]
        energy_by_model[name] = np.array([float(p.energy) for p in preds])
        stress_by_model[name] = [_voigt_gpa(p.stress) for p in preds]
    return _Structures(
        ids=[ls.structure_id for ls in labelled],
        systems=[chemical_system(ls.atoms) for ls in labelled],
        values={key: [group_value(ls, key, samplers) for ls in labelled] for key in keys},
        ref_forces=ref_forces,
        ref_energy=np.array(ref_energy),
        n_atoms=np.array(n_atoms, dtype=float),
        ref_stress=ref_stress,
        forces=forces_by_model,
        energy=energy_by_model,
        stress=stress_by_model,
    )


def _bin_edges(norms: np.ndarray, force_bins: Sequence[float] | int) -> np.ndarray:
    if isinstance(force_bins, int):
        if force_bins < 1:
            raise ValueError(f"force_bins must be at least 1, got {force_bins}")
        if not norms.size:
            return np.array([0.0, math.inf])
        edges = np.quantile(norms, np.linspace(0, 1, force_bins + 1))
        edges[0], edges[-1] = 0.0, math.inf
        return np.unique(edges)
    edges = np.asarray(force_bins, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"force_bins must be increasing edges, got {list(force_bins)}")
    return edges


def _model_metrics(
    data: _Structures,
    name: str,
    members: list[int],
    edges: np.ndarray,
    options: IntervalOptions,
) -> ModelMetrics:
    with_forces = data.with_forces(members)
    ref = [data.ref_forces[i] for i in with_forces]
    model = [data.forces[name][i] for i in with_forces]
    systems = [data.systems[i] for i in with_forces]
    with_energy = data.with_energy(members)
    energy_args = (data.energy[name][with_energy], data.ref_energy[with_energy],
                   data.n_atoms[with_energy])  # fmt: skip
    energy_systems = [data.systems[i] for i in with_energy]
    with_stress = data.with_stress(members, [name])
    bins = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        picked_model, picked_ref, n_atoms = [], [], 0
        for m, r in zip(model, ref, strict=True):
            norm = np.linalg.norm(r, axis=1)
            mask = (norm >= low) & (norm < high)
            if mask.any():
                picked_model.append(m[mask])
                picked_ref.append(r[mask])
                n_atoms += int(mask.sum())
        if n_atoms:
            fit = softening_interval(picked_model, picked_ref, options=options)
            bins.append(ForceBin(float(low), float(high), n_atoms, fit))
    return ModelMetrics(
        n_structures=len(members),
        n_force_components=int(sum(r.size for r in ref)),
        softening=softening_interval(model, ref, options=options),
        softening_distance=softening_distance_interval(
            model, ref, strata=systems, options=options
        ),  # fmt: skip
        force_mae=mae_interval(model, ref, options=options),
        force_rmse=rmse_interval(model, ref, options=options),
        energy_mae_per_atom=energy_mae_interval(
            *energy_args, offset_removed=False, options=options
        ),
        energy_mae_per_atom_offset_removed=energy_mae_interval(
            *energy_args, offset_removed=True, strata=energy_systems, options=options
        ),
        stress_mae_gpa=mae_interval(
            [data.stress[name][i] for i in with_stress],
            [data.ref_stress[i] for i in with_stress],
            options=options,
        ),
        softening_by_force=tuple(bins),
    )


def _paired_metrics(
    data: _Structures, name: str, baseline: str, members: list[int], options: IntervalOptions
) -> dict[str, Difference]:
    with_forces = data.with_forces(members)
    ref = [data.ref_forces[i] for i in with_forces]
    cand = [data.forces[name][i] for i in with_forces]
    base = [data.forces[baseline][i] for i in with_forces]
    systems = [data.systems[i] for i in with_forces]
    with_energy = data.with_energy(members)
    with_stress = data.with_stress(members, [name, baseline])
    return {
        "force_mae": paired_mae(cand, base, ref, options=options),
        "force_mae_ratio": paired_error_ratio(cand, base, ref, options=options),
        "softening": paired_softening(cand, base, ref, options=options),
        "softening_distance": paired_softening(
            cand, base, ref, distance=True, strata=systems, options=options
        ),
        "energy_mae_per_atom_offset_removed": paired_energy_mae(
            data.energy[name][with_energy],
            data.energy[baseline][with_energy],
            data.ref_energy[with_energy],
            data.n_atoms[with_energy],
            strata=[data.systems[i] for i in with_energy],
            options=options,
        ),
        "stress_mae_gpa": paired_mae(
            [data.stress[name][i] for i in with_stress],
            [data.stress[baseline][i] for i in with_stress],
            [data.ref_stress[i] for i in with_stress],
            metric="stress_mae_gpa",
            options=options,
        ),
    }


def _levels(groups: Sequence[str | Sequence[str]]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for entry in groups:
        keys = (entry,) if isinstance(entry, str) else tuple(entry)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"a group is a key or a tuple of keys, not {entry!r}")
        if keys not in out:
            out.append(keys)
    return out


def evaluate(
    models: Mapping[str, Potential | None],
    labelled: Sequence[LabelledStructure],
    *,
    groups: Sequence[str | Sequence[str]] = DEFAULT_GROUPS,
    samplers: Mapping[str, str] | None = None,
    baseline: str | None = None,
    force_bins: Sequence[float] | int = DEFAULT_FORCE_BINS,
    min_structures: int = DEFAULT_MIN_STRUCTURES,
    confidence: float = 0.95,
    method: str = "cr2",
    n_bootstrap: int = 2000,
    seed: int = 0,
    stress: bool = True,
    predictions: Mapping[str, Sequence[Prediction]] | None = None,
) -> Evaluation:
    """Every model against the reference labels of ``labelled``, per group of structures.

    ``groups``: each entry a key or a tuple of keys, one level of groups each: the default
    gives each chemical system and each (system, sampler). Keys: ``"chemical_system"``,
    ``"sampler"`` (``samplers[structure_id]`` when given, else ``atoms.info["sampler"]``), or
    any ``atoms.info`` key. Level ``"all"`` (every structure) always comes first.
    ``baseline``: the model the others are compared with (default: the first).
    ``force_bins``: per-atom |F_ref| bin edges (eV/A), or a number of equal-count bins per
    group. ``min_structures``: fewer structures than this in a group or bin and its figures
    are marked not enough (``Estimate.enough``). ``confidence``, ``method`` (``"cr2"`` or
    ``"bootstrap"``), ``n_bootstrap``, ``seed``: the intervals (``IntervalOptions``).
    ``stress``: ask the models for stresses. ``predictions``: per model name, predictions
    made already (in the order of ``labelled``); the model is then not asked again.
    """
    if not models:
        raise ValueError("evaluate needs at least one model")
    if not labelled:
        raise ValueError("evaluate needs labelled structures")
    names = list(models)
    baseline = names[0] if baseline is None else baseline
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {names}")
    options = IntervalOptions(confidence=confidence, min_structures=min_structures,
                              method=method, n_bootstrap=n_bootstrap, seed=seed)  # fmt: skip
    given = dict(predictions or {})
    structures = [ls.atoms for ls in labelled]
    made: dict[str, Sequence[Prediction]] = {}
    for name, potential in models.items():
        if name in given:
            made[name] = given[name]
        elif potential is None:
            raise ValueError(f"{name}: neither a potential nor predictions")
        else:
            made[name] = potential.predict(structures, stress=stress)
    levels = _levels(groups)
    data = _collect(made, labelled, {k for keys in levels for k in keys}, samplers)

    splits: list[tuple[str, str, dict[str, str], list[int]]] = [
        (ALL, ALL, {}, list(range(len(labelled))))
    ]
    for keys in levels:
        members: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for index in range(len(labelled)):
            members[tuple(data.values[k][index] for k in keys)].append(index)
        for values in sorted(members):
            splits.append(("+".join(keys), "/".join(values), dict(zip(keys, values, strict=True)),
                           members[values]))  # fmt: skip

    result: dict[str, dict[str, GroupResult]] = {}
    member_map: dict[tuple[str, str], list[int]] = {}
    for level, key, group, members_of in splits:
        norms = _cat([np.linalg.norm(data.ref_forces[i], axis=1)
                      for i in data.with_forces(members_of)])  # fmt: skip
        edges = _bin_edges(norms, force_bins)
        per_model = {name: _model_metrics(data, name, members_of, edges, options) for name in names}
        paired = {
            name: _paired_metrics(data, name, baseline, members_of, options)
            for name in names
            if name != baseline
        }
        result.setdefault(level, {})[key] = GroupResult(
            level, key, group, len(members_of), per_model, paired
        )
        member_map[(level, key)] = members_of

    settings = {
        "confidence": confidence,
        "min_structures": min_structures,
        "method": method,
        "interval": "structure-level: CR2 cluster-robust, t with Bell-McCaffrey dof"
        if method == "cr2"
        else f"structure-level: percentile cluster bootstrap ({n_bootstrap}, seed {seed})",
        "force_bins": force_bins
        if isinstance(force_bins, int)
        else [None if math.isinf(e) else float(e) for e in force_bins],
        "groups": ["+".join(keys) for keys in levels],
    }
    return Evaluation(names, baseline, settings, result, data, member_map)
