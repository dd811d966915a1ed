"""Convergence gate for labels: are a labeller's numbers converged in its numerical settings
(plane-wave cutoff, k-point density) for one chemical system, before any label of that system
is trusted?

One small representative off-equilibrium structure (a modest rattle plus a small strain, so
forces and stress are both non-trivial) is labelled at the configured settings and at the next
rung of each setting's ladder, one setting at a time (cutoff first, then k-points at the cutoff
found). Energies, forces and stresses are compared against tolerances. In auto-raise mode a
failing setting climbs its ladder until two neighbouring rungs agree, up to a cap; the lower
of the two is recommended.

The energy compared is, when a reference structure is given (``representative`` makes one:
the same cell undistorted), the energy of the distorted structure relative to it, per atom.
That is the energy a potential is trained on: a finite cutoff lowers every atom of an element
by nearly the same amount (fluorine's setup leaves ~0.2 eV/atom beyond 600 eV), a constant the
fine-tuning's per-element reference energies absorb, while the part that changes with volume
and geometry (Pulay stress, ~125 GPa for LiF at 350 eV) is what spoils labels. The absolute
energy per atom is reported beside it, and gated only when ``absolute_energy_per_atom`` is set.

Rung-to-rung differences bound a step, not the distance to convergence: a stress that
creeps by 0.5-1 GPa per rung passes every step while it is still far off. For a plane-wave
cutoff the gate also estimates the Pulay stress itself from the undistorted cell's energies
at the two rungs (:func:`pulay_stress_estimate`), which is what caught LiF at 780 eV.

``label_fn(labeller, atoms) -> LabelResult`` is injectable: the engine can route these
calculations through its store, where they are ordinary labels at their own level of theory.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms, units
from pydantic import BaseModel, ConfigDict, Field

from pestle.labellers import (
    ConvergenceSetting,
    LabelError,
    Labeller,
    LabelResult,
    level_of_theory_hash,
)
from pestle.structures import chemical_system

# label_fn(labeller, atoms) -> LabelResult. One that serves an earlier label (a store) may
# put what computing it cost in ``result.extra["label_seconds"]``; the report shows that.
LabelFn = Callable[[Labeller, Atoms], LabelResult]

# Quantities a label carries, and the checks that decide each.
QUANTITY_CHECKS = {
    "energy": ("energy", "absolute_energy"),
    "forces": ("force_max", "force_rms_ratio"),
    "stress": ("stress_max", "pulay_stress"),
}
UNITS = {
    "energy": "eV/atom",
    "absolute_energy": "eV/atom",
    "force_max": "eV/Å",
    "force_rms_ratio": "",
    "force_slope": "",
    "stress_max": "GPa",
    "pulay_stress": "GPa",
}


class ConvergenceTolerances(BaseModel):
    """How close labels at one rung must be to the next rung's. Defaults, and what GPAW PBE
    measured on the representative structures of Si, LiF, MgO, Al, Cu (notes/convergence.md):

    - ``energy_per_atom`` 2 meV/atom (relative energy): distorted structures sit 8-43 meV/atom
      above their cells; a fine-tuned potential's energy error is 5-10 meV/atom. Converged
      rungs differ by <= 0.6 meV/atom in cutoff, ~1 meV/atom in metals' k-points.
    - ``force_max`` 0.05 eV/Å on any component and ``force_rms_ratio`` 2 %: the softening
      scale is read to ~0.01, and the RMS ratio bounds the bias of a softening slope. Al at
      k-point density 3 is 15 % off (slope 0.87 against density 4.5); converged rungs <= 1.4 %.
    - ``stress_max`` 1 GPa on any Voigt component: an isotropic error P moves the equilibrium
      volume by P/B (1 GPa: 1.4 % for LiF). Pulay stress at 600 eV: LiF 1.5 GPa, MgO 4.6 GPa;
      104 GPa for LiF at 350 eV; converged rungs 0.2-0.6 GPa, Cu's k-points 0.6-0.9 GPa.
    - ``pulay_stress`` 1 GPa: the stress a plane-wave cutoff leaves out, estimated from the
      energy's change between the two rungs (:func:`pulay_stress_estimate`). Rung-to-rung
      stress differences bound the step, not the distance to convergence: LiF at 780 eV
      passed them (0.5 GPa against 1020 eV) while its stress was 1.77 GPa from 1700 eV's;
      the estimate said 1.75 GPa.
    - ``absolute_energy_per_atom`` None: reported, not gated (see the module docstring).
    """

    model_config = ConfigDict(extra="forbid")

    energy_per_atom: float = Field(default=0.002, gt=0, description="eV/atom")
    absolute_energy_per_atom: float | None = Field(default=None, gt=0, description="eV/atom")
    force_max: float = Field(default=0.05, gt=0, description="eV/Å, largest component")
    force_rms_ratio: float = Field(default=0.02, gt=0, description="RMS(ΔF) / RMS(F)")
    stress_max: float = Field(default=1.0, gt=0, description="GPa, largest Voigt component")
    pulay_stress: float | None = Field(
        default=1.0,
        gt=0,
        description="GPa, the Pulay stress a plane-wave cutoff leaves, estimated from the "
        "energy's change with the cutoff (None: reported, not gated)",
    )


class ConvergenceOptions(BaseModel):
    """Everything a campaign configures about the gate (for a ``convergence:`` config
    section; ``check_seed`` takes it)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="check each system's labelling settings before its first labels at a "
        "level of theory (false: labels are trusted unchecked)",
    )
    tolerances: ConvergenceTolerances = Field(
        default_factory=ConvergenceTolerances,
        description="how close a rung's labels must be to the next rung's",
    )
    auto_raise: bool = Field(
        default=False, description="climb a failing setting's ladder instead of stopping"
    )
    max_raises: int = Field(default=3, ge=1, le=10, description="comparisons per setting")
    leave_out: list[Literal["stress"]] = Field(
        default_factory=list,
        description="quantities that may stay unconverged: the system is labelled anyway and "
        "fine-tuning leaves them out (default: any unconverged quantity stops the system)",
    )
    rattle: float = Field(default=0.05, gt=0, le=0.3, description="Å, representative structure")
    max_strain: float = Field(default=0.02, gt=0, le=0.1, description="representative structure")
    rng_seed: int = Field(default=0, description="random seed of the representative structure")

    def criteria(self) -> dict[str, Any]:
        """What a stored verdict was decided by: a verdict made under other criteria (other
        tolerances, a check added since) is made again, from the stored calculations."""
        return {
            **self.model_dump(mode="json", exclude={"enabled"}),
            "checks": {q: list(names) for q, names in QUANTITY_CHECKS.items()},
        }


# ---------------------------------------------------------------------------------------------
# The representative structure


@dataclass
class Representative:
    structure: Atoms  # rattled and strained
    reference: Atoms  # the same cell (and atoms), undistorted


def random_strain(rng: np.random.Generator, max_strain: float) -> np.ndarray:
    """Symmetric small-strain tensor: principal strains uniform in [-max, max], principal
    axes randomly oriented (so the stress has shear components too)."""
    principal = rng.uniform(-max_strain, max_strain, size=3)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q @ np.diag(principal) @ q.T


def representative(
    seed: Atoms,
    *,
    rattle: float = 0.05,
    max_strain: float = 0.02,
    rng_seed: int = 0,
    min_atoms: int = 2,
) -> Representative:
    """A deterministic off-equilibrium structure from a seed, and its undistorted reference.

    The seed cell is used as given (pass a small cell: 2 to 8 atoms), repeated along its
    shortest axis until it holds ``min_atoms`` (a one-atom cell has no forces). Every atom
    is displaced by a normal draw of standard deviation ``rattle`` Å per axis, the mean
    displacement removed (a rigid shift changes nothing), then the cell is strained by a
    random symmetric tensor of principal strains up to ``max_strain``.
    """
    if len(seed) == 0:
        raise ValueError("the seed has no atoms")
    if not seed.pbc.all():
        raise ValueError("the convergence check needs a periodic seed (stress, k-points)")
    reference = Atoms(seed.numbers, seed.positions, cell=seed.cell, pbc=True)
    while len(reference) < min_atoms:
        repeat = [1, 1, 1]
        repeat[int(np.argmin(reference.cell.lengths()))] = 2
        reference = reference.repeat(repeat)
    rng = np.random.default_rng(rng_seed)
    structure = reference.copy()
    shift = rng.normal(0.0, rattle, size=(len(structure), 3))
    structure.positions += shift - shift.mean(axis=0)
    strain = random_strain(rng, max_strain)
    structure.set_cell(structure.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    structure.info["convergence"] = {"rattle": rattle, "max_strain": max_strain, "seed": rng_seed}
    return Representative(structure=structure, reference=reference)


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Calculation:
    """One label at one rung."""

    setting: str  # the setting varied ("ecut"), "" for the configured labeller
    value: float | None  # its value at this rung
    level_of_theory_hash: str
    energy_per_atom: float  # eV/atom, absolute
    relative_energy_per_atom: float | None  # eV/atom, against the reference structure
    force_rms: float  # eV/Å
    max_force: float  # eV/Å, largest |component|
    stress_gpa: list[float] | None  # Voigt, GPa, ASE sign (positive = tensile)
    seconds: float  # wall time of the structure's label
    reference_seconds: float | None  # wall time of the reference's label (None: cached/none)
    extra: dict[str, Any] = field(default_factory=dict)  # k-point mesh, SCF iterations, CPU s
    reference_extra: dict[str, Any] = field(default_factory=dict)  # the same of the reference


@dataclass
class QuantityCheck:
    quantity: str  # energy, absolute_energy, force_max, force_rms_ratio, force_slope, stress_max
    unit: str
    difference: float  # |lower - higher| (or the ratio / slope for force_rms_ratio / slope)
    tolerance: float | None  # None: reported, not gated
    passed: bool | None  # None when not gated or not available


@dataclass
class Comparison:
    """Labels at rung ``value`` against the next rung ``against``."""

    setting: str
    value: float
    against: float
    checks: dict[str, QuantityCheck]
    passed: bool
    per_element_force_rms: dict[str, float]  # RMS |ΔF| (eV/Å) on each element's atoms

    def failed(self) -> list[QuantityCheck]:
        return [c for c in self.checks.values() if c.passed is False]


@dataclass
class SettingReport:
    setting: ConvergenceSetting
    calculations: list[Calculation]  # rungs in ladder order
    comparisons: list[Comparison]
    converged: bool
    recommended: float  # converged value, or the highest rung tested when none converged
    ceiling: str = ""  # why climbing stopped without convergence (cap, ladder's limit)


@dataclass
class ConvergenceReport:
    chemical_system: str
    formula: str
    n_atoms: int
    labeller: str
    level_of_theory_hash: str  # the configured labeller's
    status: Literal["converged", "raised", "not_converged", "nothing_to_converge", "undeclared"]
    energy_measure: Literal["relative", "absolute"]
    tolerances: dict[str, Any]
    settings: list[SettingReport]
    recommended: dict[str, float]  # setting name -> value to label at
    recommended_fields: dict[str, float]  # config field -> value, only where it changes
    converged_quantities: list[str]  # of energy, forces, stress, at the recommended settings
    unconverged_quantities: list[str]
    culprit: str | None  # element most likely at fault (failed cutoff), else None
    culprit_evidence: dict[str, Any]
    message: str
    seconds: float  # wall time of all calculations

    @property
    def passed(self) -> bool:
        """Labelling may go ahead (at ``recommended``, which for "raised" differs)."""
        return self.status in ("converged", "raised", "nothing_to_converge")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out

    def recommended_labeller(self, labeller: Labeller) -> Labeller:
        """``labeller`` with the recommended settings."""
        for name, value in self.recommended.items():
            if _configured(labeller, name) != value:
                labeller = labeller.with_setting(name, value)
        return labeller


def _configured(labeller: Labeller, name: str) -> float | None:
    for setting in labeller.convergence_settings():
        if setting.name == name:
            return setting.value
    return None


# ---------------------------------------------------------------------------------------------
# Comparing two labels


def _stress_gpa(result: LabelResult) -> np.ndarray | None:
    if result.stress is None:
        return None
    stress = np.asarray(result.stress, dtype=float)
    if stress.shape == (3, 3):
        stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    return stress / units.GPa


def pulay_stress_estimate(
    lower_energy: float, higher_energy: float, lower_cutoff: float, higher_cutoff: float,
    volume: float,
) -> float:  # fmt: skip
    """GPa: the isotropic stress a plane-wave cutoff leaves out, from the energies (eV) of one
    structure of ``volume`` Å³ at two cutoffs.

    At a fixed cutoff E_c the number of plane waves changes with the volume, and the stress
    (the derivative at a fixed basis) misses (2 / 3V) dE/d ln E_c (Francis and Payne, J. Phys.:
    Condens. Matter 2, 4395 (1990)); the energy's slope between the rungs stands in for the
    derivative at the lower one. Measured on 8-atom LiF (GPAW PBE): 1.75 GPa estimated at
    780 eV against 1020 eV; the stress there is 1.77 GPa from 1700 eV's."""
    slope = (higher_energy - lower_energy) / math.log(higher_cutoff / lower_cutoff)
    return abs(2.0 * slope / (3.0 * volume)) / units.GPa


def compare_labels(
    atoms: Atoms,
    lower: LabelResult,
    higher: LabelResult,
    tolerances: ConvergenceTolerances,
    *,
    lower_reference: LabelResult | None = None,
    higher_reference: LabelResult | None = None,
    cutoffs: tuple[float, float] | None = None,
    reference_volume: float | None = None,
) -> tuple[dict[str, QuantityCheck], dict[str, float]]:
    """Checks of labels at one rung against the next (``higher``, taken as the truth), and
    the RMS force difference on each element's atoms. ``cutoffs``: the two rungs' values
    when the setting is a plane-wave cutoff, for the Pulay stress estimate (from the
    reference's energies, of volume ``reference_volume``, when there is a reference)."""
    n = len(atoms)
    checks: dict[str, QuantityCheck] = {}

    def add(name: str, difference: float, tolerance: float | None) -> None:
        difference = float(difference)  # plain floats and bools: the report goes to JSON
        gated = tolerance is not None and math.isfinite(difference)
        passed = bool(difference <= tolerance) if gated else None
        checks[name] = QuantityCheck(name, UNITS[name], difference, tolerance, passed)

    absolute = abs(lower.energy - higher.energy) / n
    if lower_reference is not None and higher_reference is not None:
        relative = (
            abs((lower.energy - lower_reference.energy) - (higher.energy - higher_reference.energy))
            / n
        )
        add("energy", relative, tolerances.energy_per_atom)
        add("absolute_energy", absolute, tolerances.absolute_energy_per_atom)
    else:
        add("energy", absolute, tolerances.energy_per_atom)

    f_low = np.asarray(lower.forces, dtype=float)
    f_high = np.asarray(higher.forces, dtype=float)
    delta = f_low - f_high
    add("force_max", float(np.abs(delta).max()) if delta.size else 0.0, tolerances.force_max)
    f_rms = float(np.sqrt(np.mean(f_high**2))) if f_high.size else 0.0
    ratio = float(np.sqrt(np.mean(delta**2))) / f_rms if f_rms > 0 else math.nan
    add("force_rms_ratio", ratio, tolerances.force_rms_ratio)
    sxx = float(np.sum(f_high * f_high))
    add("force_slope", float(np.sum(f_high * f_low)) / sxx if sxx > 0 else math.nan, None)

    s_low, s_high = _stress_gpa(lower), _stress_gpa(higher)
    if s_low is not None and s_high is not None:
        add("stress_max", float(np.abs(s_low - s_high).max()), tolerances.stress_max)
    else:
        add("stress_max", math.nan, tolerances.stress_max)
    if cutoffs is not None:
        # The undistorted cell's energies when there are (the structure's otherwise): the
        # Pulay stress depends on the composition and volume, hardly on the distortion.
        referenced = lower_reference is not None and higher_reference is not None
        low_e, high_e = ((lower_reference.energy, higher_reference.energy) if referenced
                         else (lower.energy, higher.energy))  # fmt: skip
        volume = reference_volume if referenced and reference_volume else atoms.get_volume()
        add("pulay_stress", pulay_stress_estimate(low_e, high_e, *cutoffs, volume),
            tolerances.pulay_stress)  # fmt: skip

    symbols = np.asarray(atoms.get_chemical_symbols())
    per_element = {
        str(symbol): float(np.sqrt(np.mean(np.sum(delta[symbols == symbol] ** 2, axis=1))))
        for symbol in sorted(set(symbols))
    }
    return checks, per_element


def _groups_passed(checks: dict[str, QuantityCheck]) -> dict[str, bool | None]:
    """Per quantity (energy, forces, stress): True if every gated check passed, False if one
    failed, None if none could be made (e.g. no stress)."""
    out: dict[str, bool | None] = {}
    for quantity, names in QUANTITY_CHECKS.items():
        states = [checks[n].passed for n in names if n in checks and checks[n].passed is not None]
        out[quantity] = None if not states else all(states)
    return out


# ---------------------------------------------------------------------------------------------
# The gate


def default_label_fn(workdir: Path | None) -> LabelFn:
    """Label with ``labeller.label`` in a fresh folder under ``workdir`` (kept, for the
    logs), or in a temporary folder removed afterwards."""
    counter = iter(range(1_000_000))

    def label(labeller: Labeller, atoms: Atoms) -> LabelResult:
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="pestle-convergence-") as folder:
                return labeller.label(atoms, Path(folder))
        folder = Path(workdir) / f"{next(counter):02d}-{level_of_theory_hash(labeller)}"
        return labeller.label(atoms, folder)

    return label


class _Runner:
    """Labels through ``label_fn``, each (structure, level of theory) once, timed."""

    def __init__(self, label_fn: LabelFn, atoms: Atoms, reference: Atoms | None) -> None:
        self.label_fn = label_fn
        self.structures = {"structure": atoms, "reference": reference}
        self.cache: dict[tuple[str, str], tuple[LabelResult, float]] = {}

    def label(self, labeller: Labeller, role: str) -> tuple[LabelResult, float | None]:
        key = (role, level_of_theory_hash(labeller))
        if key in self.cache:
            return self.cache[key][0], None
        started = time.perf_counter()
        atoms = self.structures[role]
        try:
            result = self.label_fn(labeller, atoms)
        except LabelError as exc:
            settings = ", ".join(f"{s.name} = {s.value:g}" for s in labeller.convergence_settings())
            raise LabelError(
                f"convergence check of {chemical_system(atoms)}, {role} at {settings}: {exc}"
            ) from exc
        seconds = time.perf_counter() - started
        # A label_fn serving a stored label may report what computing it cost.
        seconds = float(result.extra.get("label_seconds", seconds))
        self.cache[key] = (result, seconds)
        return result, seconds

    def total_seconds(self) -> float:
        return sum(seconds for _, seconds in self.cache.values())

    def calculation(self, labeller: Labeller, setting: str, value: float | None) -> Calculation:
        result, seconds = self.label(labeller, "structure")
        if seconds is None:
            seconds = self.cache[("structure", level_of_theory_hash(labeller))][1]
        reference, ref_seconds = (None, None)
        if self.structures["reference"] is not None:
            reference, ref_seconds = self.label(labeller, "reference")
        atoms = self.structures["structure"]
        n = len(atoms)
        forces = np.asarray(result.forces, dtype=float)
        stress = _stress_gpa(result)
        kept = ("kpts", "scf_iterations", "cpu_seconds")
        extra = {k: v for k, v in result.extra.items() if k in kept}
        reference_extra = (
            {} if reference is None else {k: v for k, v in reference.extra.items() if k in kept}
        )
        return Calculation(
            setting=setting,
            value=value,
            level_of_theory_hash=level_of_theory_hash(labeller),
            energy_per_atom=result.energy / n,
            relative_energy_per_atom=None
            if reference is None
            else (result.energy - reference.energy) / n,
            force_rms=float(np.sqrt(np.mean(forces**2))) if forces.size else 0.0,
            max_force=float(np.abs(forces).max()) if forces.size else 0.0,
            stress_gpa=None if stress is None else [float(s) for s in stress],
            seconds=round(seconds, 2),
            reference_seconds=None if ref_seconds is None else round(ref_seconds, 2),
            extra=extra,
            reference_extra=reference_extra,
        )

    def results(self, labeller: Labeller) -> tuple[LabelResult, LabelResult | None]:
        h = level_of_theory_hash(labeller)
        reference = self.cache.get(("reference", h))
        return self.cache[("structure", h)][0], None if reference is None else reference[0]


def check_convergence(
    labeller: Labeller,
    atoms: Atoms,
    tolerances: ConvergenceTolerances | dict[str, Any] | None = None,
    workdir: str | Path | None = None,
    label_fn: LabelFn | None = None,
    *,
    reference: Atoms | None = None,
    auto_raise: bool = False,
    max_raises: int = 3,
    settings: Sequence[str] | None = None,
    may_stay_unconverged: Sequence[str] = (),
) -> ConvergenceReport:
    """Check that ``labeller``'s labels of ``atoms`` are converged in its numerical settings.

    ``atoms``: the representative structure (``representative(seed).structure``);
    ``reference``: its undistorted cell (``representative(seed).reference``), so the energy
    compared is the one training sees (see the module docstring); without it the absolute
    energy per atom is compared. ``settings``: names of the settings to check (default all
    the labeller declares, in its order). ``auto_raise``: climb a failing setting's ladder
    until two neighbouring rungs agree, at most ``max_raises`` comparisons per setting;
    without it one comparison per setting (configured value against the next rung).
    ``may_stay_unconverged``: quantities (``convergence.leave_out``) that are no reason to
    climb: a setting stops at the rung where everything else agrees (reported unconverged in
    them, not raised for them).
    """
    if tolerances is None:
        tolerances = ConvergenceTolerances()
    elif not isinstance(tolerances, ConvergenceTolerances):
        tolerances = ConvergenceTolerances.model_validate(tolerances)
    if max_raises < 1:
        raise ValueError(f"max_raises must be at least 1, got {max_raises}")
    system = chemical_system(atoms)
    formula = atoms.get_chemical_formula(mode="metal")
    name = getattr(labeller, "name", type(labeller).__name__)
    base = {
        "chemical_system": system,
        "formula": formula,
        "n_atoms": len(atoms),
        "labeller": name,
        "level_of_theory_hash": level_of_theory_hash(labeller),
        "energy_measure": "relative" if reference is not None else "absolute",
        "tolerances": tolerances.model_dump(),
        "culprit": None,
        "culprit_evidence": {},
        "seconds": 0.0,
    }
    if not hasattr(labeller, "convergence_settings") or not hasattr(labeller, "with_setting"):
        return ConvergenceReport(
            **base, status="undeclared", settings=[], recommended={}, recommended_fields={},
            converged_quantities=[], unconverged_quantities=[],
            message=f"{system} ({formula}): labeller {name!r} declares no convergence settings "
            "(convergence_settings() and with_setting()), so pestle cannot check its labels; "
            "implement them, or take its labels on trust",
        )  # fmt: skip
    declared = list(labeller.convergence_settings())
    if settings is not None:
        unknown = sorted(set(settings) - {s.name for s in declared})
        if unknown:
            known = ", ".join(s.name for s in declared) or "none"
            raise ValueError(f"labeller {name!r} has no setting {unknown} (it has: {known})")
        declared = [s for s in declared if s.name in settings]
    if not declared:
        return ConvergenceReport(
            **base, status="nothing_to_converge", settings=[], recommended={},
            recommended_fields={}, converged_quantities=["energy", "forces", "stress"],
            unconverged_quantities=[],
            message=f"{system} ({formula}): {name} labels have no numerical settings to "
            "converge; nothing to check",
        )  # fmt: skip
    if reference is not None and (
        len(reference) != len(atoms) or list(reference.numbers) != list(atoms.numbers)
    ):
        raise ValueError("reference must hold the same atoms as the structure, in order")

    optional = {name for q in may_stay_unconverged for name in QUANTITY_CHECKS[q]}
    runner = _Runner(label_fn or default_label_fn(None if workdir is None else Path(workdir)),
                     atoms, reference)  # fmt: skip
    current = labeller  # carries the settings found so far (cutoff before k-points)
    reports: list[SettingReport] = []
    for setting in declared:
        value = _configured(current, setting.name)
        rung = current
        calculations = [runner.calculation(rung, setting.name, value)]
        comparisons: list[Comparison] = []
        converged, settled, ceiling = False, False, ""
        while True:
            higher_value = setting.next_value(value)
            if higher_value is None:
                ceiling = f"the ladder ends at {setting.limit:g} {setting.unit}"
                # Configured at the ladder's top already: nothing higher to compare with.
                converged = not comparisons
                break
            higher = current.with_setting(setting.name, higher_value)
            calculations.append(runner.calculation(higher, setting.name, higher_value))
            low, low_ref = runner.results(rung)
            high, high_ref = runner.results(higher)
            checks, per_element = compare_labels(
                atoms, low, high, tolerances, lower_reference=low_ref, higher_reference=high_ref,
                cutoffs=(value, higher_value) if setting.plane_wave_cutoff else None,
                reference_volume=None if reference is None else reference.get_volume(),
            )  # fmt: skip
            passed = all(c.passed is not False for c in checks.values())
            comparisons.append(
                Comparison(setting.name, value, higher_value, checks, passed, per_element)
            )
            if passed:
                converged = True
                break
            if optional and all(
                c.passed is not False for n, c in checks.items() if n not in optional
            ):
                settled = True  # only what may stay unconverged differs: no reason to climb
                break
            if not auto_raise:
                break
            if len(comparisons) >= max_raises:
                ceiling = f"auto-raise stopped after {max_raises} comparisons (max_raises)"
                break
            value, rung = higher_value, higher
        # Converged: the lower rung of the passing pair. Not: the highest rung tested, a
        # floor to raise to (not vouched for).
        recommended = value if converged or settled else comparisons[-1].against
        # Later settings are checked at what this one recommends when pestle may raise it.
        if auto_raise and recommended != _configured(current, setting.name):
            current = current.with_setting(setting.name, recommended)
        reports.append(SettingReport(setting, calculations, comparisons, converged, recommended,
                                     ceiling))  # fmt: skip

    return _conclude(base, reports, labeller, atoms, auto_raise, runner.total_seconds())


def _conclude(
    base: dict[str, Any],
    reports: list[SettingReport],
    labeller: Labeller,
    atoms: Atoms,
    auto_raise: bool,
    seconds: float,
) -> ConvergenceReport:
    all_converged = all(r.converged for r in reports)
    raised = {r.setting.name: r.recommended for r in reports if r.recommended != r.setting.value}
    status = ("raised" if raised else "converged") if all_converged else "not_converged"
    # Quantities judged by each setting's decisive comparison: the one that passed, or the
    # last one made. Without auto-raise that is configured value vs next rung.
    quantity_state: dict[str, bool | None] = dict.fromkeys(QUANTITY_CHECKS)
    for report in reports:
        if not report.comparisons:
            continue
        for quantity, state in _groups_passed(report.comparisons[-1].checks).items():
            if state is None:
                continue
            previous = quantity_state[quantity]
            quantity_state[quantity] = state if previous is None else (previous and state)
    converged_q = [q for q, s in quantity_state.items() if s]
    unconverged_q = [q for q, s in quantity_state.items() if s is False]
    recommended = {r.setting.name: r.recommended for r in reports}
    fields = {r.setting.field: r.recommended for r in reports if r.setting.name in raised}
    culprit, evidence = None, {}
    failing = [r for r in reports if r.comparisons and not r.comparisons[0].passed]
    basis = [r for r in failing if r.setting.kind == "basis"]
    if basis:
        culprit, evidence = _blame(labeller, atoms, basis[0])
    out = ConvergenceReport(
        **{**base, "culprit": culprit, "culprit_evidence": evidence, "seconds": round(seconds, 1)},
        status=status,
        settings=reports,
        recommended=recommended,
        recommended_fields=fields,
        converged_quantities=converged_q,
        unconverged_quantities=unconverged_q,
        message="",
    )
    out.message = _message(out, auto_raise)
    return out


def _blame(
    labeller: Labeller, atoms: Atoms, report: SettingReport
) -> tuple[str | None, dict[str, Any]]:
    """The element a failed basis (cutoff) check most likely starves.

    First choice: the labeller's ``basis_error(symbols, value)``, an estimate from each
    element's pseudopotential of the energy it misses at the configured cutoff (GPAW: the
    kinetic energy of its setup's pseudo partial waves beyond the cutoff); the largest wins.
    Without it: the element whose atoms' forces changed most between the two rungs."""
    first = report.comparisons[0]
    evidence: dict[str, Any] = {"force_difference_rms_eV_per_A": first.per_element_force_rms}
    symbols = sorted(set(atoms.get_chemical_symbols()))
    estimate = getattr(labeller, "basis_error", None)
    if estimate is not None:
        try:
            errors = estimate(symbols, report.setting.value)
        except Exception as exc:  # an estimate must never hide the measured failure
            evidence["basis_error_failed"] = f"{type(exc).__name__}: {exc}"
        else:
            evidence["basis_error_eV_per_atom"] = {k: float(v) for k, v in errors.items()}
            evidence["rule"] = "largest estimated basis error at the configured cutoff"
            return max(errors, key=errors.get), evidence
    if len(symbols) == 1:
        evidence["rule"] = "only element"
        return symbols[0], evidence
    forces = first.per_element_force_rms
    if forces and max(forces.values()) > 0:
        evidence["rule"] = "largest force change between rungs on its atoms"
        return max(forces, key=forces.get), evidence
    return None, evidence


def _fmt(value: float, unit: str) -> str:
    if unit == "eV/atom":
        return f"{1000 * value:.1f} meV/atom"
    if unit == "GPa":
        return f"{value:.2f} GPa"
    if unit == "eV/Å":
        return f"{value:.3f} eV/Å"
    if unit == "":
        return f"{100 * value:.1f} %"
    return f"{value:.3g} {unit}"


CHECK_WORDS = {
    "energy": "energy",
    "absolute_energy": "absolute energy",
    "force_max": "largest force component",
    "force_rms_ratio": "RMS force difference / RMS force",
    "stress_max": "largest stress component",
    "pulay_stress": "Pulay stress estimated from the energy's change with the cutoff",
}


def _describe(comparison: Comparison, energy_measure: str) -> str:
    parts = []
    for check in comparison.failed():
        word = CHECK_WORDS[check.quantity]
        if check.quantity == "energy" and energy_measure == "relative":
            word = "energy relative to the undistorted cell"
        # A difference between the rungs, except the Pulay stress: an estimate at the lower.
        how = "at" if check.quantity == "pulay_stress" else "by"
        parts.append(
            f"{word} {how} {_fmt(check.difference, check.unit)} "
            f"(tolerance {_fmt(check.tolerance, check.unit)})"
        )
    return "; ".join(parts)


def _value(value: float, unit: str) -> str:
    return f"{value:g} {unit}".rstrip()


def _pulay_note(comparison: Comparison) -> str:
    """The estimated Pulay stress as a clause, when the comparison made one (a cutoff)."""
    check = comparison.checks.get("pulay_stress")
    if check is None or not math.isfinite(check.difference):
        return ""
    return f"; Pulay stress estimated at {_fmt(check.difference, check.unit)}"


def _message(report: ConvergenceReport, auto_raise: bool) -> str:
    head = f"{report.chemical_system} ({report.formula}, {report.n_atoms} atoms), {report.labeller}"
    if report.status == "converged":
        pieces = []
        for r in report.settings:
            if not r.comparisons:
                pieces.append(
                    f"{r.setting.field} = {_value(r.setting.value, r.setting.unit)} "
                    f"(not compared: {r.ceiling})"
                )
                continue
            c = r.comparisons[0]
            pieces.append(
                f"{r.setting.field} = {_value(c.value, r.setting.unit)} "
                f"(vs {_value(c.against, r.setting.unit)}{_pulay_note(c)})"
            )
        quantities = ", ".join(report.converged_quantities) or "nothing"
        return f"{head}: converged at {' and '.join(pieces)}: {quantities} within tolerance."
    if report.status == "raised":
        blame = f"; most likely at fault: {report.culprit}" if report.culprit else ""
        raised = [r for r in report.settings if r.recommended != r.setting.value]
        found = "; ".join(
            f"at {r.setting.field} = {_value(c.value, r.setting.unit)} vs "
            f"{_value(c.against, r.setting.unit)}: {_describe(c, report.energy_measure)}"
            for r in raised
            for c in r.comparisons
            if not c.passed  # every rung that failed, and why: the climb is the evidence
        )
        changes = ", ".join(
            f"{r.setting.field} {_value(r.setting.value, r.setting.unit)} → "
            f"{_value(r.recommended, r.setting.unit)} (agrees with "
            f"{_value(r.comparisons[-1].against, r.setting.unit)}"
            f"{_pulay_note(r.comparisons[-1])})"
            for r in raised
        )
        return (
            f"{head}: not converged at the configured settings ({found}{blame}); raised {changes}."
        )
    # not converged: one message naming what failed, who is to blame and what to raise
    failing = [r for r in report.settings if r.comparisons and not r.converged]
    lines = []
    for r in failing:
        first, last = r.comparisons[0], r.comparisons[-1]
        unit = r.setting.unit
        text = (
            f"labels at {r.setting.field} = {_value(first.value, unit)} differ from "
            f"{_value(first.against, unit)}: {_describe(first, report.energy_measure)}"
        )
        absolute = first.checks.get("absolute_energy")
        if absolute is not None and absolute.passed is None:
            text += f" (absolute energy: {_fmt(absolute.difference, absolute.unit)}, not gated)"
        if len(r.comparisons) > 1:
            text += (
                f"; still at {_value(last.value, unit)} vs {_value(last.against, unit)}: "
                f"{_describe(last, report.energy_measure)}"
            )
        lines.append(text)
    culprit = ""
    if report.culprit is not None:
        ev = report.culprit_evidence
        errors = ev.get("basis_error_eV_per_atom")
        cutoff = next(r for r in failing if r.setting.kind == "basis") if any(
            r.setting.kind == "basis" for r in failing) else None  # fmt: skip
        if errors and cutoff is not None:
            others = ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1])
                if k != report.culprit
            )  # fmt: skip
            culprit = (
                f" Most likely at fault: {report.culprit}, the hardest pseudopotential here (its "
                f"setup's partial waves carry an estimated {errors[report.culprit]:.2f} eV per "
                f"{report.culprit} atom of kinetic energy beyond "
                f"{_value(cutoff.setting.value, cutoff.setting.unit)}"
                + (f"; {others} eV" if others else "")
                + ")."
            )
        else:
            culprit = f" Most likely at fault: {report.culprit} ({ev.get('rule', '')})."
    if any(r.setting.kind == "sampling" for r in failing):
        culprit += (
            " The k-point check failing is the electronic structure's doing, not one element's: "
            "metals need far denser k-point grids than insulators."
        )
    raise_to = []
    for r in failing:
        last = r.comparisons[-1]
        if auto_raise and r.ceiling:
            raise_to.append(
                f"{r.setting.field} beyond {_value(last.against, r.setting.unit)} ({r.ceiling})"
            )
        else:
            raise_to.append(f"{r.setting.field} to at least {_value(last.against, r.setting.unit)}")
    advice = "Raise " + " and ".join(raise_to) + " and check again"
    if not auto_raise:
        advice += ", or let pestle climb the ladder itself (auto-raise)"
    kept = report.converged_quantities
    keep = (
        f" Converged here: {', '.join(kept)}; not converged: "
        f"{', '.join(report.unconverged_quantities)}."
        if kept
        else ""
    )
    return f"{head}: {'; '.join(lines)}.{culprit} {advice}.{keep}"


def check_seed(
    labeller: Labeller,
    seed: Atoms,
    options: ConvergenceOptions | dict[str, Any] | None = None,
    workdir: str | Path | None = None,
    label_fn: LabelFn | None = None,
) -> ConvergenceReport:
    """The gate for one chemical system: its seed's representative structure (and the
    undistorted cell as the energy reference) checked with the configured options."""
    if options is None:
        options = ConvergenceOptions()
    elif not isinstance(options, ConvergenceOptions):
        options = ConvergenceOptions.model_validate(options)
    rep = representative(
        seed, rattle=options.rattle, max_strain=options.max_strain, rng_seed=options.rng_seed
    )
    return check_convergence(
        labeller,
        rep.structure,
        options.tolerances,
        workdir,
        label_fn,
        reference=rep.reference,
        auto_raise=options.auto_raise,
        max_raises=options.max_raises,
        may_stay_unconverged=options.leave_out,
    )
