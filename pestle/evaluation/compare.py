"""Compare several potentials on the same reference labels: ``pestle evaluate``'s layer over
``pestle.evaluation.evaluate.evaluate`` (the one evaluation path), its markdown table, and
reading labelled extxyz files.

Every interval shown is structure-level (``pestle.evaluation.intervals``: CR2 cluster-robust
with Bell-McCaffrey degrees of freedom); the component t interval, which treats every force
component as independent and is far too narrow, is a secondary column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pestle.evaluation.evaluate import (
    ALL,
    DEFAULT_FORCE_BINS,
    DEFAULT_GROUPS,
    UNKNOWN,
    Evaluation,
    evaluate,
)
from pestle.evaluation.intervals import (
    DEFAULT_MIN_STRUCTURES,
    IntervalOptions,
    format_difference,
    format_estimate,
    softening_interval,
)
from pestle.evaluation.metrics import legacy_metrics
from pestle.trainers import LabelledStructure

if TYPE_CHECKING:
    from pestle.potentials import Potential

__all__ = ["UNKNOWN", "compare_models", "markdown_table", "read_labelled_extxyz",
           "softening_bootstrap"]  # fmt: skip


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
    try:
        frames = read(path, index=":")
    except Exception as exc:  # ase raises many types for unreadable files
        reason = str(exc) or type(exc).__name__
        raise ValueError(f"{path}: not a readable structure file: {reason}") from None
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
    """Percentile cluster-bootstrap interval of the softening scale, resampling whole
    structures (``softening_interval(..., method="bootstrap")``). NaN when undefined, and
    with fewer than two structures. It under-covers at the 3-10 structures pestle has
    (73-89 % at nominal 95 %); the CR2 interval of ``softening_interval`` is the primary one.
    """
    options = IntervalOptions(confidence=confidence, min_structures=1, method="bootstrap",
                              n_bootstrap=n, seed=seed)  # fmt: skip
    fit = softening_interval(model_forces_per_structure, reference_per_structure, options=options)
    return fit.low, fit.high


def compare_models(
    models: Mapping[str, Potential],
    labelled: Sequence[LabelledStructure],
    groups: Sequence[str | Sequence[str]] = DEFAULT_GROUPS,
    samplers: Mapping[str, str] | None = None,
    plot_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_structures: int = DEFAULT_MIN_STRUCTURES,
    force_bins: Sequence[float] | int = DEFAULT_FORCE_BINS,
) -> dict[str, Any]:
    """Errors and softening of every model in ``models``, overall and per group value, from
    one ``evaluate``; the first model is the parent the others are compared with (paired
    differences). ``groups``: as ``evaluate`` (default: each chemical system, and each
    system and sampler). With ``plot_dir``, the plots of ``plots.evaluation_plots``.

    Returns ``{"models", "parent", "overall": {model: metrics}, "groups": {level: {key:
    {model: metrics}}}, "table": markdown, "plots": [paths], "evaluation": the full
    ``Evaluation.as_dict()``}``, JSON-friendly. ``metrics`` is ``metrics.legacy_metrics``
    (``softening.ci_low``/``ci_high`` are the structure-level interval) plus
    ``softening_bootstrap`` {low, high, n} (percentile cluster bootstrap, secondary).
    """
    if not models:
        raise ValueError("compare_models needs at least one model")
    if not labelled:
        raise ValueError("compare_models needs labelled structures")
    result = evaluate(models, labelled, groups=groups, samplers=samplers,
                      min_structures=min_structures, force_bins=force_bins,
                      n_bootstrap=n_bootstrap, seed=seed)  # fmt: skip
    names = list(models)

    def per_model(level: str, key: str) -> dict[str, Any]:
        out = {}
        for name in names:
            metrics = legacy_metrics(result.metrics(name, level, key))
            low, high = softening_bootstrap(
                *result.forces_per_structure(name, level, key), n=n_bootstrap, seed=seed
            )
            metrics["softening_bootstrap"] = {"low": low, "high": high, "n": n_bootstrap}
            out[name] = metrics
        return out

    plots: list[str] = []
    if plot_dir is not None:
        from pestle.evaluation.plots import evaluation_plots

        written = evaluation_plots(result, Path(plot_dir))
        plots = [str(path) for per in written.values() for path in per.values()]
    return {
        "models": names,
        "parent": names[0],
        "overall": per_model(ALL, ALL),
        "groups": {
            level: {key: per_model(level, key) for key in values}
            for level, values in result.levels.items()
            if level != ALL
        },
        "table": markdown_table(result),
        "plots": plots,
        "evaluation": result.as_dict(),
    }


def group_label(group: Mapping[str, str]) -> str:
    """``"all"``, ``"Si"``, ``"Si, sampler rattle"``, ``"sampler strain"``."""
    if not group:
        return ALL
    return ", ".join(v if k == "chemical_system" else f"{k} {v}" for k, v in group.items())


def _cells(texts: list[str]) -> list[str]:
    """Say "not enough structures" once per row: later cells that repeat it show a dash."""
    seen: set[str] = set()
    out = []
    for text in texts:
        if text.startswith("not enough structures"):
            out.append("—" if text in seen else text)
            seen.add(text)
        else:
            out.append(text)
    return out


def markdown_table(evaluation: Evaluation) -> str:
    """``pestle evaluate``'s tables: one row per (group, model) with every figure and its
    structure-level 95 % interval, the change against the baseline with its paired interval,
    and the component t interval of the softening scale as a secondary column; then the
    softening scale per chemical system in bins of the reference force per atom. Below the
    minimum number of structures a figure reads "not enough structures (n = ...)"."""
    names, base = evaluation.models, evaluation.baseline
    confidence = f"{100 * evaluation.settings['confidence']:g}%"
    header = (
        f"| group | model | structures | softening [{confidence} CI, structures] | "
        f"component t CI (too narrow) | Δ softening vs {base} | force MAE (eV/Å) | "
        f"Δ force MAE vs {base} | energy MAE, offset removed (meV/atom) | stress MAE (GPa) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for values in evaluation.levels.values():
        for result in values.values():
            for name in names:
                m = result.models[name]
                soft = m.softening
                component = (
                    f"[{soft.component_low:.3f}, {soft.component_high:.3f}]"
                    if soft.enough and math.isfinite(soft.component_low)
                    else "—"
                )
                paired = result.paired.get(name, {})
                cells = _cells(
                    [
                        format_estimate(soft, 3),
                        component,
                        format_difference(paired["softening"], 3) if paired else "—",
                        format_estimate(m.force_mae, 3),
                        format_difference(paired["force_mae"], 3) if paired else "—",
                        format_estimate(m.energy_mae_per_atom_offset_removed, 1, 1000.0),
                        format_estimate(m.stress_mae_gpa, 2),
                    ]
                )
                row = [group_label(result.group), name, str(result.n_structures), *cells]
                lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    bins = evaluation.levels.get("chemical_system")
    if bins:
        lines.append(
            "Softening scale by reference force per atom (|F_ref|, eV/Å); "
            "structure-level intervals.\n"
        )
        columns = ["system", "\\|F_ref\\| bin", "atoms", "structures", *names]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for key, result in bins.items():
            first = result.models[names[0]].softening_by_force
            for index, fbin in enumerate(first):
                texts = [
                    format_estimate(result.models[name].softening_by_force[index].softening, 3)
                    for name in names
                ]
                lines.append(
                    f"| {key} | {fbin.label} | {fbin.n_atoms} | "
                    f"{fbin.softening.n_structures} | " + " | ".join(texts) + " |"
                )
        lines.append("")
    return "\n".join(lines)
