"""What the run report and the store report share: the heading's facts, the softening and
error tables of a stored evaluation (with structure-level intervals, or "not enough
structures"), learning curves, dataset distributions, reference-calculation cost, softening
against the number of labels, and the convergence and equation-of-state checks.

Everything is read from stored documents (and the PNG files the evaluate stage wrote); the
reports never recompute a figure.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pestle.evaluation.intervals import (
    Difference,
    Estimate,
    format_difference,
    format_estimate,
)
from pestle.reports import figures
from pestle.reports.document import Details, Figure, Figures, Items, Section, Table, Text
from pestle.reports.figures import seconds_text
from pestle.structures import pressure_gpa

if TYPE_CHECKING:
    from pestle.store import Store

LEVELS = {
    "chemical_system": "chemical system",
    "chemical_system+sampler": "chemical system and sampler",
}
SETS = {
    "evaluation_set": "evaluation set",
    "holdout": "held-out picks",
}


def utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def when(moment: datetime | None) -> str:
    moment = utc(moment)
    return "" if moment is None else f"{moment:%Y-%m-%d %H:%M} UTC"


def short_model(model_id: str | None) -> str:
    """``model-0123456789abcdef`` -> ``model-01234567``."""
    if not model_id:
        return ""
    return model_id[:14] if model_id.startswith("model-") else model_id


def slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# -- placing figures beside the report ---------------------------------------------------------


@dataclass
class Place:
    """Where a report lives (``root``) and where its own figures go (``figures``); files
    from elsewhere (the evaluate stage's PNGs of another run) are copied under ``figures``."""

    root: Path
    figures: Path
    copied: dict[Path, str] = field(default_factory=dict)

    MARKER = ".pestle-report-figures"

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.figures = Path(self.figures).resolve()
        self.figures.mkdir(parents=True, exist_ok=True)
        # A folder a report made before: its old figures go (a report written again must
        # not leave stale ones beside it); a folder it did not make is left alone.
        marker = self.figures / self.MARKER
        if marker.exists():
            for old in self.figures.glob("*.png"):
                old.unlink()
        elif not any(self.figures.iterdir()):
            marker.touch()

    def path(self, name: str) -> Path:
        """A path for a new figure."""
        return self.figures / name

    def src(self, path: Path, copy_as: str | None = None) -> str | None:
        """The figure's ``src`` relative to the report, copying it under ``figures`` when it
        lies outside the report's folder; None when the file does not exist."""
        path = Path(path).resolve()
        if not path.is_file():
            return None
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            pass
        if path not in self.copied:
            target = self.figures / (copy_as or path.name)
            shutil.copyfile(path, target)
            self.copied[path] = target.relative_to(self.root).as_posix()
        return self.copied[path]

    def figure(self, path: Path, caption: str, wide: bool = False, copy_as: str | None = None):
        src = self.src(path, copy_as)
        if src is None:
            return None
        return Figure(src, caption, wide=wide)


# -- the heading -----------------------------------------------------------------------------


def describe_level_of_theory(lot: Mapping[str, Any]) -> str:
    """``gpaw 24.1.0: xc PBE, ecut 650, kpoint_density 1.5, ...`` (scalars only)."""
    if not lot:
        return "unknown"
    code = lot.get("code", "?")
    version = lot.get("version")
    settings = [
        f"{k} {v}"
        for k, v in lot.items()
        if k not in ("code", "version") and isinstance(v, (str, int, float, bool)) and v is not None
    ]
    head = f"{code} {version}" if version else str(code)
    return head + (": " + ", ".join(settings) if settings else "")


def describe_versions(versions: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded"


def describe_model(description: Mapping[str, Any]) -> str:
    """A potential's ``describe()``: family and model/version, without checkpoint paths."""
    if not description:
        return "unknown"
    parts = [str(description.get("family", "?"))]
    for key in ("model", "version"):
        if description.get(key):
            parts.append(str(description[key]))
    return " ".join(parts)


# -- softening and error tables of a stored evaluation ----------------------------------------


def _estimate(figures_of: Mapping[str, Any], metric: str) -> Estimate | None:
    value = figures_of.get(metric)
    return Estimate.from_dict(value) if isinstance(value, Mapping) else None


def _difference(group: Mapping[str, Any], model: str, metric: str) -> Difference | None:
    value = (group.get("paired") or {}).get(model, {}).get(metric)
    return Difference.from_dict(value) if isinstance(value, Mapping) else None


def shown(estimate: Estimate | None, digits: int = 3, scale: float = 1.0) -> str:
    return "–" if estimate is None else format_estimate(estimate, digits, scale)


def verdict(difference: Difference | None, better: str, worse: str) -> str:
    """What a paired difference (candidate - baseline, lower is better) shows, in words."""
    if difference is None:
        return ""
    if not difference.enough:
        return f"not enough structures (n = {difference.n_structures})"
    if difference.improved():
        return better
    if difference.worse():
        return worse
    return "no change shown (the interval includes 0)"


def paired_change(d: Difference | None, unit: str = "") -> str:
    """``-0.052 [-0.190, +0.080] eV/Å (-43%)``: the paired difference with its interval, and
    the relative change of the point values (its interval is not shown: a ratio's interval
    from a difference of small figures is not worth reading)."""
    if d is None:
        return "–"
    text = format_difference(d)
    if not d.enough or not math.isfinite(d.value):
        return text
    if unit:
        text += f" {unit}"
    if math.isfinite(d.ratio):
        text += f" ({100 * (d.ratio - 1):+.0f}%)"
    return text


@dataclass
class StoredEvaluation:
    """One stored evaluation (``Evaluation.as_dict()``) with its models' display names."""

    data: Mapping[str, Any]
    names: Mapping[str, str]

    @property
    def models(self) -> list[str]:
        return list(self.data.get("models", []))

    @property
    def baseline(self) -> str:
        return str(self.data.get("baseline", self.models[0] if self.models else ""))

    @property
    def others(self) -> list[str]:
        return [m for m in self.models if m != self.baseline]

    @property
    def settings(self) -> Mapping[str, Any]:
        return self.data.get("settings", {})

    @property
    def min_structures(self) -> int:
        return int(self.settings.get("min_structures", 5))

    def name(self, model: str) -> str:
        return self.names.get(model, model)

    def level(self, level: str) -> Mapping[str, Any]:
        return (self.data.get("levels") or {}).get(level, {})

    def softening_points(self, level: str) -> dict[str, dict[str, Estimate]]:
        """``{group key: {model display name: softening Estimate}}`` for a points plot."""
        return {
            key.replace("/", " / "): {
                self.name(m): Estimate.from_dict(group["models"][m]["softening"])
                for m in self.models
                if m in group.get("models", {})
            }
            for key, group in self.level(level).items()
        }

    def softening_table(self, level: str) -> Table:
        header = [LEVELS.get(level, level), "structures"]
        header += [f"{self.name(m)}" for m in self.models]
        for m in self.others:
            header += [
                f"{self.name(m)} − {self.name(self.baseline)} (paired)",
                "towards 1? (paired |1 − s|)",
            ]
        rows = []
        for key, group in self.level(level).items():
            row: list[Any] = [key.replace("/", " / "), group.get("n_structures")]
            row += [shown(_estimate(group["models"][m], "softening")) for m in self.models]
            for m in self.others:
                row.append(_text_difference(_difference(group, m, "softening")))
                row.append(verdict(_difference(group, m, "softening_distance"),
                                   "closer to 1", "further from 1"))  # fmt: skip
            rows.append(row)
        return Table(header, rows, caption="softening scale [95% structure-level interval]")

    def force_table(self, level: str = "chemical_system") -> Table:
        header = [LEVELS.get(level, level), "structures"]
        header += [f"{self.name(m)}" for m in self.models]
        for m in self.others:
            header += [f"{self.name(m)} − {self.name(self.baseline)} (paired)", "verdict"]
        rows = []
        for key, group in self.level(level).items():
            row: list[Any] = [key.replace("/", " / "), group.get("n_structures")]
            row += [shown(_estimate(group["models"][m], "force_mae")) for m in self.models]
            for m in self.others:
                d = _difference(group, m, "force_mae")
                row.append(paired_change(d))
                row.append(verdict(d, "lower", "higher"))
            rows.append(row)
        return Table(header, rows, caption="force MAE (eV/Å) [95% structure-level interval]; "
                     "paired change on the same structures, eV/Å (relative change)")  # fmt: skip

    def error_table(self, level: str = "chemical_system") -> Table:
        header = [LEVELS.get(level, level), "model", "force RMSE (eV/Å)",
                  "energy MAE, offset removed (meV/atom)", "stress MAE (GPa)",
                  "softening: component t interval (too narrow; for comparison)"]  # fmt: skip
        rows = []
        for key, group in self.level(level).items():
            for m in self.models:
                f = group["models"][m]
                softening = _estimate(f, "softening")
                component = ""
                if softening is not None and math.isfinite(softening.component_low):
                    component = f"[{softening.component_low:.3f}, {softening.component_high:.3f}]"
                rows.append([
                    key.replace("/", " / "), self.name(m), shown(_estimate(f, "force_rmse")),
                    shown(_estimate(f, "energy_mae_per_atom_offset_removed"), 1, 1000.0),
                    shown(_estimate(f, "stress_mae_gpa"), 2), component,
                ])  # fmt: skip
        return Table(header, rows)

    def too_few(self, level: str) -> list[str]:
        """Groups of ``level`` whose figures are marked not enough: ``"Cu (n = 3)"``."""
        out = []
        for key, group in self.level(level).items():
            n = int(group.get("n_structures") or 0)
            if n < self.min_structures:
                out.append(f"{key.replace('/', ' / ')} (n = {n})")
        return out

    def statements(self) -> list[str]:
        """One plain sentence per chemical system: before and after, and what the paired
        differences show (or that the structures are too few)."""
        out = []
        for key, group in self.level("chemical_system").items():
            n = int(group.get("n_structures") or 0)
            if n < self.min_structures:
                out.append(f"{key}: not enough structures (n = {n}; at least "
                           f"{self.min_structures} needed) to give a softening scale or an "
                           "error with an interval.")  # fmt: skip
                continue
            base = group["models"][self.baseline]
            text = (f"{key} (n = {n}): softening scale {self.name(self.baseline)} "
                    f"{shown(_estimate(base, 'softening'))}")  # fmt: skip
            for m in self.others:
                text += f" → {self.name(m)} {shown(_estimate(group['models'][m], 'softening'))}"
                towards = verdict(_difference(group, m, "softening_distance"),
                                  "closer to 1 (the paired interval of |1 − s| lies below 0)",
                                  "further from 1 (the paired interval of |1 − s| lies above 0)")  # fmt: skip
                if towards.startswith("no change"):
                    towards = (
                        "no change towards 1 shown (the paired interval of |1 − s| includes 0)"
                    )
                force = _difference(group, m, "force_mae")
                text += (f": {towards}. Force MAE changed by {paired_change(force, 'eV/Å')} on "
                         f"the same structures: {verdict(force, 'lower beyond its interval', 'higher beyond its interval')}")  # fmt: skip
            out.append(text + ".")
        return out


def _text_difference(d: Difference | None) -> str:
    return "–" if d is None else format_difference(d)


def evaluation_summary(
    which: str,
    entry: Mapping[str, Any],
    names: Mapping[str, str],
    place: Place,
    *,
    primary: bool,
    prefix: str = "",
) -> list[Any]:
    """Blocks for one set of labels (``evaluation_set`` or ``holdout``) of an evaluate
    stage: where the data are too few, plain statements (``primary``), softening per system
    and per system and sampler as points with error bars (drawn from the stored figures),
    and the tables."""
    stored = entry.get("evaluation")
    if not stored:
        return [Text(entry.get("note") or f"No {SETS.get(which, which)} labels.", "note")]
    ev = StoredEvaluation(stored, names)
    blocks: list[Any] = []
    few = {level: ev.too_few(level) for level in LEVELS}
    if few["chemical_system"] or few["chemical_system+sampler"]:
        lines = []
        if few["chemical_system"]:
            lines.append("per chemical system: " + ", ".join(few["chemical_system"]))
        if few["chemical_system+sampler"]:
            lines.append("per system and sampler: " + ", ".join(few["chemical_system+sampler"]))
        blocks.append(Text(
            f"Too few structures for an interval (at least {ev.min_structures} needed), so "
            "no number is given for: " + "; ".join(lines) + ". The plots show these as hollow "
            "points without an interval.", "warning",
        ))  # fmt: skip
    if primary:
        blocks.append(Items(ev.statements()))
    # Drawn here from the stored figures (not the stage's summary PNGs, whose legend sits
    # inside the axes and can hide a point): the legend goes below.
    grid = []
    for level, title in LEVELS.items():
        if not ev.level(level):
            continue
        if level != "chemical_system" and len(ev.level(level)) <= len(ev.level("chemical_system")):
            continue  # one sampler per system: the same points as per system
        path = figures.versions_plot(
            ev.softening_points(level), place.path(f"{prefix}softening-{which}-{slug(level)}.png"),
            f"softening scale per {title}, {SETS.get(which, which)}", xlabel=title)  # fmt: skip
        fig = place.figure(path, f"Softening scale per {title}, {SETS.get(which, which)}: each "
                           "model a point with its 95% structure-level interval; 1 = no "
                           "softening; hollow = too few structures (no interval).", wide=True)  # fmt: skip
        if fig is not None:
            grid.append(fig)
    if grid:
        blocks.append(Figures(grid))
    blocks.append(ev.softening_table("chemical_system"))
    blocks.append(ev.force_table("chemical_system"))
    per_sampler = ev.level("chemical_system+sampler")
    if (len(per_sampler) > len(ev.level("chemical_system"))
            and len(few["chemical_system+sampler"]) < len(per_sampler)):  # fmt: skip
        blocks.append(ev.softening_table("chemical_system+sampler"))
    blocks.append(Details("Force RMSE, energy and stress errors, and the component t interval",
                          [ev.error_table("chemical_system"),
                           Text(f"Intervals: {ev.settings.get('interval', 'structure-level')}, "
                                f"{ev.settings.get('confidence', 0.95):.0%}. The component t "
                                "interval treats every force component as independent and is "
                                "too narrow; it is shown only for comparison.")]))  # fmt: skip
    return blocks


PLOT_CAPTIONS = {
    "forces": "force components, model against reference; dashed: each model's fit through the "
              "origin (its slope is the softening scale).",
    "energy": "energy per atom, each side's mean removed (model and reference differ in their "
              "zero of energy).",
    "stress": "stress, Voigt components (GPa).",
    "force_error": "per-atom force error against the reference force magnitude; large points: "
                   "mean per bin.",
    "softening_by_force": "softening scale in bins of the reference force per atom (95% "
                          "structure-level interval; hollow: too few structures).",
}  # fmt: skip


def per_system_plots(
    which: str,
    entry: Mapping[str, Any],
    place: Place,
    plots_root: Path,
    prefix: str = "",
    level: int = 3,
) -> list[Section]:
    """Per chemical system, the evaluate stage's force, energy and stress parity, force
    error against reference force and softening by force bin (PNGs under ``plots_root``)."""
    out = []
    for system, kinds in (entry.get("plots") or {}).items():
        if system == "summary":
            continue
        shown_figures = []
        for kind, caption in PLOT_CAPTIONS.items():
            if kind in kinds:
                fig = place.figure(plots_root / kinds[kind], f"{system}: {caption}",
                                   wide=kind == "softening_by_force",
                                   copy_as=f"{prefix}{Path(kinds[kind]).name}")  # fmt: skip
                if fig is not None:
                    shown_figures.append(fig)
        section = Section(f"{system} ({SETS.get(which, which)})", level=level)
        if shown_figures:
            section.add(Figures(shown_figures))
        else:
            section.add(Text(f"The plot files of {system} are no longer in {plots_root}.", "note"))
        out.append(section)
    return out


# -- learning curves -------------------------------------------------------------------------


def learning_curves_blocks(models: Sequence[Any], place: Place, name: str) -> list[Any]:
    """Learning curves of stored model versions (``ModelDoc``), one row each, with what
    chose the epoch kept and a warning when it was the last one (still improving)."""
    curves, notes = [], []
    for model in models:
        metrics = model.metrics or {}
        label = short_model(model.id)
        c = figures.curves_from_metrics(label, metrics)
        if c.empty:
            mode = metrics.get("mode", "")
            if mode == "linear_correction":
                scale = metrics.get("scale", metrics.get("linear_scale"))
                notes.append(f"{label}: closed-form linear correction (no epochs)"
                             + (f", scale {scale:.4f}" if isinstance(scale, (int, float)) else "") + ".")  # fmt: skip
            else:
                notes.append(f"{label}: no per-epoch history recorded.")
            continue
        curves.append(c)
        last = c.epochs[-1]
        text = (f"{label}: {len(c.epochs)} epochs on {metrics.get('n_train', '?')} training "
                f"structures, {metrics.get('n_val', '?')} for validation"
                f"{' (none: the training set stood in)' if c.validation_is_training else ''}; "
                f"epoch kept {c.best_epoch if c.best_epoch is not None else 'none (base model)'}"
                f" ({c.selection or 'criterion not recorded'}).")  # fmt: skip
        if c.best_epoch is not None and c.best_epoch == last and len(c.epochs) > 1:
            text += " The kept epoch is the last: the validation figure was still improving, so more epochs may help."
        if metrics.get("stopped"):
            text += f" Training stopped early: {metrics['stopped']}."
        notes.append(text)
    blocks: list[Any] = [Items(notes)] if notes else []
    if curves:
        path = figures.learning_curves_plot(curves, place.path(f"{name}.png"))
        blocks.append(place.figure(path, "Learning curves: training and validation loss and "
                                   "force MAE per epoch; dotted line and star: the epoch kept.",
                                   wide=True))  # fmt: skip
    return [b for b in blocks if b is not None]


# -- dataset distributions -----------------------------------------------------------------------


@dataclass
class LabelValues:
    """The reference labels' values of one set of structures in one chemical system."""

    energy_per_atom: list[float] = field(default_factory=list)
    max_force: list[float] = field(default_factory=list)
    pressure: list[float] = field(default_factory=list)

    def add(self, label: Any) -> None:
        self.energy_per_atom.append(label.energy_per_atom)
        self.max_force.append(label.max_force)
        if label.stress is not None and len(label.stress) >= 3:
            self.pressure.append(pressure_gpa(label.stress))


@dataclass
class Predicted:
    energy_per_atom: list[float] = field(default_factory=list)
    max_force: list[float] = field(default_factory=list)
    pressure: list[float] = field(default_factory=list)

    def add(self, scores: Mapping[str, float]) -> None:
        for name in ("max_force", "energy_per_atom", "pressure"):
            if name in scores:
                getattr(self, name).append(scores[name])


def _relative(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    finite = [v for v in reference if v is not None and math.isfinite(v)]
    if not finite:
        return []
    mean = float(np.mean(finite))
    return [v - mean for v in values if v is not None and math.isfinite(v)]


def distribution_blocks(
    predicted: Mapping[str, Mapping[str, Predicted]],
    labelled: Mapping[str, Mapping[str, LabelValues]],
    scorer: str,
    reference: str,
    place: Place,
    name: str,
) -> list[Any]:
    """One strip-plot figure per chemical system: energy per atom, largest force on an atom
    and pressure of the candidates against the picks and the evaluation set.

    ``predicted[system][set]``: the scoring model's predictions (sets "candidates",
    "evaluation set", "picks"); ``labelled[system][set]``: reference labels ("evaluation
    set", "picks"). Candidates have only predictions (pressure among them);
    picks and the evaluation set have reference labels."""
    colours = {"candidates": "0.55", "evaluation set": "C0", "picks": "C1"}
    out = []
    for system in sorted(set(predicted) | set(labelled)):
        pred = predicted.get(system, {})
        lab = labelled.get(system, {})
        # Energies: each method relative to its own mean over a random set of candidates (all
        # candidates for predictions, the evaluation set for reference labels).
        pred_zero = pred.get("candidates", Predicted()).energy_per_atom
        ref_zero = (lab.get("evaluation set") or lab.get("picks") or LabelValues()).energy_per_atom
        rows: list[tuple[str, str, Any, bool]] = []  # label, set, values, predicted?
        for which in ("candidates", "evaluation set", "picks"):
            if which in pred:
                n = len(pred[which].max_force)
                rows.append((f"{which} (n = {n})\npredicted by {scorer}", which, pred[which], True))
        for which in ("evaluation set", "picks"):
            if which in lab:
                n = len(lab[which].max_force)
                rows.append((f"{which} (n = {n})\n{reference}", which, lab[which], False))
        if not rows:
            continue
        panels = [
            figures.Panel("largest force on an atom", "max |F| per atom (eV/Å)",
                          [figures.Strip(r[0], list(r[2].max_force), colours[r[1]]) for r in rows]),
            figures.Panel("energy per atom", "relative to its method's mean (eV/atom)",
                          [figures.Strip(r[0], _relative(r[2].energy_per_atom,
                                                         pred_zero if r[3] else ref_zero),
                                         colours[r[1]]) for r in rows]),
            figures.Panel("pressure", "−trace(σ)/3 (GPa)",
                          [figures.Strip(r[0], list(r[2].pressure), colours[r[1]],
                                         missing="no stress predicted when scoring (scored "
                                         "before pestle stored it)" if r[3]
                                         else "no stress in the labels") for r in rows]),
        ]  # fmt: skip
        path = figures.distributions_plot(f"{system}: candidates, picks and evaluation set",
                                          panels, place.path(f"{name}-{slug(system)}.png"))  # fmt: skip
        out.append(place.figure(path, (
            f"{system}: each structure a point, the median a black bar. Rows 'predicted by "
            f"{scorer}' are the scoring model's values (all a candidate has); rows "
            f"'{reference}' are reference labels. Energies are relative to the mean of the "
            "same method over a random set (predictions: all candidates; reference: the "
            "evaluation set), because the two methods' zeros of energy differ."
        ), wide=True))  # fmt: skip
    return [Figures([f for f in out if f is not None])] if out else []


# -- reference-calculation cost ------------------------------------------------------------------


def cost_blocks(labels: Iterable[Any], place: Place, name: str) -> list[Any]:
    """Wall time per label per chemical system (from each label's ``extra``), with a table of
    counts, atoms, median and total time."""
    seconds: dict[str, list[float]] = defaultdict(list)
    atoms: dict[str, list[int]] = defaultdict(list)
    codes: dict[str, set[str]] = defaultdict(set)
    cores: dict[str, list[float]] = defaultdict(list)
    for label in labels:
        extra = label.extra or {}
        wall = extra.get("wall_seconds")
        if not isinstance(wall, (int, float)):
            continue
        seconds[label.chemical_system].append(float(wall))
        atoms[label.chemical_system].append(label.natoms)
        codes[label.chemical_system].add(str(label.level_of_theory.get("code", label.labeller)))
        n_cores = extra.get("cpus") or extra.get("mpi_ranks")
        if isinstance(n_cores, (int, float)):
            cores[label.chemical_system].append(float(wall) * float(n_cores))
    if not seconds:
        return [Text("No label records its wall time (extra.wall_seconds).", "note")]
    path = figures.cost_plot(seconds, place.path(f"{name}.png"), "wall time")
    rows = []
    for system in sorted(seconds):
        values = np.array(seconds[system])
        core_hours = f"{sum(cores[system]) / 3600:.2f}" if cores.get(system) else "not recorded"
        rows.append([system, ", ".join(sorted(codes[system])), len(values),
                     f"{int(np.median(atoms[system]))}", seconds_text(float(np.median(values))),
                     f"{seconds_text(float(values.min()))} – {seconds_text(float(values.max()))}",
                     seconds_text(float(values.sum())), core_hours])  # fmt: skip
    table = Table(["system", "code", "labels", "atoms (median)", "median wall time", "range",
                   "total wall time", "core-hours"], rows)  # fmt: skip
    figure = place.figure(path, "Wall time of each reference calculation (the labeller's call, "
                          "as the worker measured it), per chemical system; log scale.")  # fmt: skip
    return [b for b in (figure, table) if b is not None]


# -- softening against the number of labels ------------------------------------------------------


def softening_vs_labels(
    store: Store, campaign: str | None = None
) -> dict[str, list[figures.LabelPoint]]:
    """Every model version's evaluation-set softening scale per chemical system against the
    number of that system's labels it trained on (the pretrained model at 0), from the
    evaluate stages of the runs (campaign runs and daemon retrainings). A model measured more
    than once keeps its latest measurement."""
    latest: dict[tuple[str, str], tuple[datetime, figures.LabelPoint]] = {}
    counts_cache: dict[str, dict[str, int]] = {}
    promoted = {p["model_id"] for p in store.models.promoted_all()}

    def trained_per_system(model_id: str) -> dict[str, int]:
        if model_id not in counts_cache:
            model = store.models.get(model_id)
            ids = model.training.label_ids if model else []
            per: dict[str, int] = defaultdict(int)
            for system in store.labels.systems_of(ids).values():
                per[system] += 1
            counts_cache[model_id] = dict(per)
        return counts_cache[model_id]

    # (Filtered here: RunRepository.with_stage's campaign filter is on run_id, a jobs field.)
    for run in store.runs.with_stage("evaluate"):
        if campaign is not None and run.campaign != campaign:
            continue
        evaluate = run.stages["evaluate"]
        stored = (evaluate.get("evaluation_set") or {}).get("evaluation")
        if not stored:
            continue
        model_id = (run.stages.get("finetune") or {}).get("model_id")
        labels = evaluate.get("labels") or {}
        at = utc(run.started_at) or datetime.min.replace(tzinfo=timezone.utc)
        for name in stored.get("models", []):
            if name in ("fine-tuned", "candidate"):
                mid = model_id
            elif name == "incumbent" and str(labels.get(name, "")).startswith("model-"):
                mid = labels[name]
            else:
                mid = None  # the pretrained model
            for system, group in (stored.get("levels") or {}).get("chemical_system", {}).items():
                estimate = Estimate.from_dict(group["models"][name]["softening"])
                if mid is None:
                    point = figures.LabelPoint(0, estimate, "pretrained", "pretrained")
                else:
                    kind = "promoted" if mid in promoted else "fine-tuned"
                    point = figures.LabelPoint(trained_per_system(mid).get(system, 0), estimate,
                                               short_model(mid), kind)  # fmt: skip
                key = (point.model, system)
                if key not in latest or latest[key][0] <= at:
                    latest[key] = (at, point)
    out: dict[str, list[figures.LabelPoint]] = defaultdict(list)
    for (_, system), (_, point) in sorted(latest.items(), key=lambda kv: kv[1][1].n_labels):
        out[system].append(point)
    return dict(out)


def softening_vs_labels_blocks(
    points: Mapping[str, Sequence[figures.LabelPoint]], place: Place, name: str
) -> list[Any]:
    if not points:
        return [Text("No model version has been evaluated on an evaluation set yet.", "note")]
    path = figures.softening_vs_labels_plot(points, place.path(f"{name}.png"))
    rows = [[system, p.model, p.kind, p.n_labels, format_estimate(p.estimate)]
            for system, per in sorted(points.items()) for p in per]  # fmt: skip
    return [
        place.figure(path, "Softening scale on the evaluation set (95% structure-level interval) "
                     "of each model version against the number of labels of that system it "
                     "trained on; the pretrained model at 0; hollow: too few structures.",
                     wide=True),
        Details("The numbers", [Table(["system", "model", "kind", "labels trained on",
                                       "softening scale [95% CI]"], rows)]),
    ]  # fmt: skip


# -- convergence and equation of state (when the stages recorded them) ------------------------


def _is_estimate(value: Any) -> bool:
    return isinstance(value, Mapping) and "value" in value and ("low" in value or "high" in value)


def _format_value(value: Any) -> str:
    if _is_estimate(value):
        return format_estimate(Estimate.from_dict(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, default=str)
    return str(value)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, text) of every leaf; an estimate-shaped dict is one leaf."""
    if isinstance(value, Mapping) and not _is_estimate(value):
        out = []
        for key, inner in value.items():
            out += _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, _format_value(value))]


def convergence_blocks(stage: Mapping[str, Any]) -> list[Any]:
    """The label convergence gate per chemical system: its verdict, the settings it labels
    at, and its message (what failed, the element most likely at fault, what to raise)."""
    systems = {k: v for k, v in stage.items() if isinstance(v, Mapping)}
    if not systems:
        return [Text(f"Gate skipped: {stage['skipped']}.")] if stage.get("skipped") else []
    blocked = [s for s, v in systems.items() if v.get("passed") is False]
    blocks: list[Any] = []
    if blocked:
        blocks.append(Text("Not labelled, the labeller's settings are not converged for "
                           + ", ".join(sorted(blocked)) + ": see the messages below.",
                           "warning"))  # fmt: skip
    rows = []
    for system, entry in sorted(systems.items()):
        verdict = {True: "passed", False: "FAILED"}.get(entry.get("passed"), "?")
        status = entry.get("status") or ""
        settings = ", ".join(f"{k.rpartition('.')[2]} {v:g}"
                             for k, v in (entry.get("recommended_fields") or {}).items())  # fmt: skip
        unconverged = ", ".join(entry.get("unconverged_quantities") or []) or ""
        rows.append([system, f"{verdict} ({status})" if status else verdict,
                     settings or "as configured", unconverged, entry.get("message", "")])  # fmt: skip
    blocks.append(Table(["system", "gate", "raised settings", "not converged", "message"], rows))
    return blocks


def _find_estimate(entry: Any, word: str) -> Estimate | None:
    """The first estimate-shaped value under ``entry`` whose key contains ``word``."""
    if not isinstance(entry, Mapping):
        return None
    for key, value in entry.items():
        if word in str(key).lower() and _is_estimate(value):
            return Estimate.from_dict(value)
        if word in str(key).lower() and isinstance(value, (int, float)):
            return Estimate(float(value), math.nan, math.nan, 1, 1, min_structures=1)
    return None


def eos_blocks(stage: Mapping[str, Any], place: Place, name: str) -> list[Any]:
    """Equation-of-state checks per seed (the eos stage's record): each model's bulk modulus
    and equilibrium volume against the labeller's scan, with intervals, and the verdict
    against the tolerance; the bulk-modulus ratios as points with error bars."""
    seeds = stage.get("seeds", stage)
    seeds = {k: v for k, v in seeds.items() if isinstance(v, Mapping)}
    if not seeds:
        return [Text(f"Equation of state skipped: {stage['skipped']}.")] if stage.get(
            "skipped") else []  # fmt: skip
    tolerance = stage.get("tolerance")
    rows, ratios = [], {}
    for seed, entry in sorted(seeds.items()):
        if entry.get("skipped"):
            rows.append([seed, "", "", "", "", f"skipped: {entry['skipped']}"])
            continue
        reference = entry.get("reference") or {}
        consistency = reference.get("stress_consistency") or {}
        note = consistency.get("message", "") if consistency.get("consistent") is False else ""
        rows.append([seed, "reference scan (labeller)",
                     format_estimate(reference.get("bulk_modulus_gpa") or {}, 1), "1", "",
                     "; ".join(m for m in (reference.get("message") or reference.get("status", ""),
                                           note) if m)])  # fmt: skip
        for model, figures_of in (entry.get("models") or {}).items():
            ratio = figures_of.get("b0_ratio") or {}
            low, high = figures_of.get("v0_difference_interval") or (None, None)
            volume = (f"{figures_of['v0_difference_percent']:+.2f} [{low:+.2f}, {high:+.2f}]"
                      if figures_of.get("status") == "ok" else "")  # fmt: skip
            rows.append([seed, model, format_estimate(figures_of.get("bulk_modulus_gpa") or {}, 1),
                         format_estimate(ratio, 3), volume,
                         (entry.get("verdicts") or {}).get(model, figures_of.get("message", ""))])  # fmt: skip
            if ratio.get("value") is not None:
                ratios.setdefault(seed, {})[model] = (
                    ratio["value"],
                    ratio["low"] if ratio.get("low") is not None else math.nan,
                    ratio["high"] if ratio.get("high") is not None else math.nan,
                )
    blocks: list[Any] = []
    if ratios:
        path = figures.ratio_points_plot(ratios, place.path(f"{name}.png"),
                                         "bulk modulus: model / reference scan",
                                         "B(model) / B(reference), 95% CI")  # fmt: skip
        band = f" The check passes inside 1 ± {tolerance:g}." if tolerance else ""
        blocks.append(place.figure(path, "Bulk modulus of each model from its equation of state "
                                   "over the labeller's, per seed; 1 = the reference." + band))  # fmt: skip
    blocks.append(Table(["seed", "model", "B0 (GPa) [95% CI]", "B / B(reference) [95% CI]",
                         "V0 change (%) [95% CI]", "verdict"], rows))  # fmt: skip
    return blocks
