"""Compare several potentials on the same reference labels, per chemical system and per
sampler kind: energy, force and stress errors, the softening scale with two intervals, parity
plots and a markdown table against the first ("parent") model.

Two intervals on the softening scale: ``softening_scale``'s t interval treats every force
component as independent, but the components of one structure are correlated (they sum to
zero and share one geometry), so it is too narrow. ``softening_bootstrap`` resamples whole
structures instead, the unit that is independent.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import units

from pestle.evaluation.metrics import (
    energy_mae_per_atom,
    energy_mae_per_atom_offset_removed,
    force_mae,
    force_rmse,
    softening_scale,
)
from pestle.structures import chemical_system
from pestle.trainers import LabelledStructure

if TYPE_CHECKING:
    from pestle.potentials import Potential, Prediction

UNKNOWN = "unknown"


def read_labelled_extxyz(path: str | Path) -> list[LabelledStructure]:
    """Every frame of an (ext)xyz file with its reference energy and forces (and stress
    when present) in ``atoms.calc``, as ASE's reader attaches them.

    Ids are ``<file name>#<frame>``. A frame without an energy or forces is an error naming
    the file and the frame, never silently skipped.
    """
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    frames = read(path, index=":")
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise ValueError(f"{path}: no frames")
    out = []
    for index, atoms in enumerate(frames):
        results = atoms.calc.results if atoms.calc is not None else {}
        missing = [key for key in ("energy", "forces") if results.get(key) is None]
        if missing:
            raise ValueError(
                f"{path}, frame {index} (0-based): no reference {' or '.join(missing)}; "
                "write them as the extxyz properties 'energy' and 'forces' (e.g. "
                "ase.io.write on atoms with a calculator)"
            )
        forces = np.asarray(results["forces"])
        if forces.shape != (len(atoms), 3):
            raise ValueError(
                f"{path}, frame {index}: forces have shape {forces.shape}, not ({len(atoms)}, 3)"
            )
        tag = f"{path.name}#{index}"
        out.append(LabelledStructure(atoms=atoms, structure_id=tag, label_id=tag))
    return out


def softening_bootstrap(
    model_forces_per_structure: Sequence[Any],
    reference_per_structure: Sequence[Any],
    n: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval (2.5 and 97.5 percentiles at 95 %) of the softening
    scale, resampling whole structures with replacement.

    The slope through the origin is ``sum(x.y) / sum(x.x)``; per structure only its two sums
    matter, so each replicate is a weighted sum of those. NaN when undefined (no structure
    or no non-zero reference force); with one structure the interval has zero width.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if len(model_forces_per_structure) != len(reference_per_structure):
        raise ValueError(
            f"{len(model_forces_per_structure)} model structures but "
            f"{len(reference_per_structure)} reference structures"
        )
    sxy, sxx = [], []
    for index, (model, reference) in enumerate(
        zip(model_forces_per_structure, reference_per_structure, strict=True)
    ):
        y = np.asarray(model, dtype=float).ravel()
        x = np.asarray(reference, dtype=float).ravel()
        if x.shape != y.shape:
            raise ValueError(
                f"structure {index}: model has {y.size} components, reference {x.size}"
            )
        sxy.append(float(x @ y))
        sxx.append(float(x @ x))
    if not sxx or sum(sxx) == 0.0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sxx), size=(n, len(sxx)))
    numerator, denominator = np.asarray(sxy)[picks].sum(1), np.asarray(sxx)[picks].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slopes = np.where(denominator > 0, numerator / denominator, np.nan)
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(slopes, [tail, 100 - tail])
    return float(low), float(high)


def _rmse(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(values**2))) if values.size else math.nan


def _mae(values: np.ndarray) -> float:
    return float(np.mean(np.abs(values))) if values.size else math.nan


def _group_value(ls: LabelledStructure, key: str, samplers: Mapping[str, str] | None) -> str:
    if key == "chemical_system":
        return chemical_system(ls.atoms)
    if key == "sampler":
        if samplers is not None and ls.structure_id in samplers:
            return str(samplers[ls.structure_id])
        return str(ls.atoms.info.get("sampler", UNKNOWN))
    return str(ls.atoms.info.get(key, UNKNOWN))


def _metrics(
    members: list[int],
    labelled: Sequence[LabelledStructure],
    predictions: list[Prediction],
    n_bootstrap: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Errors of one model on the structures ``members``; also the force arrays to plot."""
    ref_f, pred_f = [], []
    ref_e, pred_e, counts = [], [], []
    stress_error = []
    for i in members:
        results = labelled[i].atoms.calc.results if labelled[i].atoms.calc is not None else {}
        pred = predictions[i]
        if results.get("forces") is not None:
            ref_f.append(np.asarray(results["forces"], dtype=float).ravel())
            pred_f.append(np.asarray(pred.forces, dtype=float).ravel())
        if results.get("energy") is not None:
            ref_e.append(float(results["energy"]))
            pred_e.append(float(pred.energy))
            counts.append(len(labelled[i].atoms))
        ref_s = results.get("stress")
        if ref_s is not None and pred.stress is not None:
            ref_s = np.asarray(ref_s, dtype=float)
            if ref_s.shape == (3, 3):
                ref_s = ref_s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            stress_error.append((np.asarray(pred.stress, dtype=float) - ref_s) / units.GPa)
    reference = np.concatenate(ref_f) if ref_f else np.empty(0)
    predicted = np.concatenate(pred_f) if pred_f else np.empty(0)
    n_atoms = np.asarray(counts, dtype=float)
    per_atom = (np.asarray(pred_e) - np.asarray(ref_e)) / n_atoms if counts else np.empty(0)
    stress = np.concatenate(stress_error) if stress_error else np.empty(0)
    low, high = softening_bootstrap(pred_f, ref_f, n=n_bootstrap, seed=seed)
    out = {
        "n_structures": len(members),
        "n_force_components": int(reference.size),
        "energy_mae_per_atom": energy_mae_per_atom(pred_e, ref_e, n_atoms),
        "energy_rmse_per_atom": _rmse(per_atom),
        "energy_mae_per_atom_offset_removed": energy_mae_per_atom_offset_removed(
            pred_e, ref_e, n_atoms
        ),
        "energy_rmse_per_atom_offset_removed": _rmse(per_atom - per_atom.mean())
        if per_atom.size
        else math.nan,
        "force_mae": force_mae(predicted, reference),
        "force_rmse": force_rmse(predicted, reference),
        "stress_mae_gpa": _mae(stress),
        "stress_rmse_gpa": _rmse(stress),
        "softening": softening_scale(predicted, reference).as_dict(),
        "softening_bootstrap": {"low": low, "high": high, "n": n_bootstrap},
    }
    return out, {"reference": reference, "predicted": predicted}


def compare_models(
    models: Mapping[str, Potential],
    labelled: Sequence[LabelledStructure],
    groups: Sequence[str] = ("chemical_system", "sampler"),
    samplers: Mapping[str, str] | None = None,
    plot_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Errors and softening of every model in ``models``, overall and per group value.

    ``groups`` names how to split the structures: ``"chemical_system"`` (e.g. ``F-Li``),
    ``"sampler"`` (``samplers[structure_id]`` when given, else ``atoms.info["sampler"]``), or
    any other ``atoms.info`` key; a structure without one falls in ``"unknown"``. The first
    model is the parent the markdown table compares the others against. Units: energies
    eV/atom, forces eV/A, stresses GPa. With ``plot_dir``, one force parity plot per group
    value (all models on one plot) is written there.

    Returns ``{"models", "parent", "overall": {model: metrics}, "groups": {group: {value:
    {model: metrics}}}, "table": markdown, "plots": [paths]}``, JSON-friendly.
    """
    if not models:
        raise ValueError("compare_models needs at least one model")
    if not labelled:
        raise ValueError("compare_models needs labelled structures")
    for ls in labelled:
        if ls.atoms.calc is None:
            raise ValueError(f"structure {ls.structure_id} has no reference results")
    names = list(models)
    predictions = {
        name: model.predict([ls.atoms for ls in labelled]) for name, model in models.items()
    }

    splits: dict[str, dict[str, list[int]]] = {"all": {"all": list(range(len(labelled)))}}
    for key in groups:
        members: dict[str, list[int]] = defaultdict(list)
        for index, ls in enumerate(labelled):
            members[_group_value(ls, key, samplers)].append(index)
        splits[key] = dict(sorted(members.items()))

    plots: list[str] = []
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for key, values in splits.items():
        results[key] = {}
        for value, members in values.items():
            per_model, arrays = {}, {}
            for name in names:
                per_model[name], arrays[name] = _metrics(
                    members, labelled, predictions[name], n_bootstrap, seed
                )
            results[key][value] = per_model
            if plot_dir is not None and arrays[names[0]]["reference"].size:
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{key}-{value}")
                from pestle.evaluation.plots import parity_plot

                path = parity_plot(
                    arrays[names[0]]["reference"],
                    {name: arrays[name]["predicted"] for name in names},
                    Path(plot_dir) / f"parity-forces-{slug}.png",
                    title=f"forces, {value}" if key == "all" else f"forces, {key} = {value}",
                )
                plots.append(str(path))

    overall = results.pop("all")["all"]
    return {
        "models": names,
        "parent": names[0],
        "overall": overall,
        "groups": results,
        "table": markdown_table(names, overall, results),
        "plots": plots,
    }


def _number(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _signed(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}"


def markdown_table(
    names: Sequence[str],
    overall: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
) -> str:
    """One row per (group value, model), with the change against the parent (first) model."""
    parent = names[0]
    header = (
        "| group | model | structures | softening [t 95% CI] | bootstrap 95% CI | "
        f"Δ slope vs {parent} | force MAE (eV/Å) | Δ force MAE vs {parent} | force RMSE (eV/Å) | "
        "energy MAE, offset removed (meV/atom) | stress MAE (GPa) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    rows = [("all", overall)]
    for key, values in groups.items():
        rows += [(f"{key} = {value}", per_model) for value, per_model in values.items()]
    for label, per_model in rows:
        base = per_model[parent]
        for name in names:
            m = per_model[name]
            soft = m["softening"]
            boot = m["softening_bootstrap"]
            is_parent = name == parent
            lines.append(
                "| "
                + " | ".join(
                    [
                        label,
                        name,
                        str(m["n_structures"]),
                        f"{_number(soft['slope'], 3)} [{_number(soft['ci_low'], 3)}, "
                        f"{_number(soft['ci_high'], 3)}]",
                        f"[{_number(boot['low'], 3)}, {_number(boot['high'], 3)}]",
                        "—"
                        if is_parent
                        else _signed(soft["slope"] - base["softening"]["slope"], 3),
                        _number(m["force_mae"], 3),
                        "—" if is_parent else _signed(m["force_mae"] - base["force_mae"], 3),
                        _number(m["force_rmse"], 3),
                        _number(1000 * m["energy_mae_per_atom_offset_removed"], 1),
                        _number(m["stress_mae_gpa"], 2),
                    ]
                )
                + " |"
            )
    return "\n".join(lines) + "\n"
