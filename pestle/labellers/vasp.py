"""VASP labels with Materials Project input sets, so labels sit at the level of theory the
foundation models were trained on (PBE/PBE+U, MP POTCARs, MP INCAR), run with the configured
command under custodian's error handlers, parsed from vasprun.xml.

Nothing here pretends VASP ran: without the executable and POTCARs (PMG_VASP_PSP_DIR) the
labeller fails with the reason. Input generation and parsing are tested on their own.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms, units
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pestle.extras import require
from pestle.labellers import LABELLERS, ConvergenceSetting, LabelError, LabelResult, convention
from pestle.labellers.gpaw import check_result
from pestle.plugins import Resources

INPUT_SETS = ("MPStaticSet", "MPRelaxSet", "MPScanStaticSet")


def input_set_class(name: str):
    from pymatgen.io.vasp import sets

    return getattr(sets, name)


def parse_vasprun(path: str | Path) -> LabelResult:
    """Energy (free energy, the one consistent with the forces), forces and stress (ASE
    convention: eV/A^3, positive = tensile; VASP prints kBar with the opposite sign) of the
    last ionic step; LabelError if the electronic loop did not converge."""
    from pymatgen.io.vasp import Vasprun

    path = Path(path)
    try:
        run = Vasprun(str(path), parse_dos=False, parse_eigen=False, parse_potcar_file=False)
    except Exception as exc:
        raise LabelError(f"cannot parse {path.name}: {type(exc).__name__}: {exc}") from None
    if not run.converged_electronic:
        raise LabelError(f"VASP SCF did not converge in NELM steps ({path})")
    last = run.ionic_steps[-1]
    forces = np.asarray(last["forces"], dtype=float)
    stress = None
    if last.get("stress") is not None:
        full = -np.asarray(last["stress"], dtype=float) * 0.1 * units.GPa
        stress = full[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    # With PSTRESS, vasprun's e_fr_energy at the end of a step is the enthalpy E + PV
    # (ASE's reader makes the same correction); labels hold the energy.
    pstress_kbar = float(run.parameters.get("PSTRESS", 0.0) or 0.0)
    volume = run.ionic_steps[-1]["structure"].volume
    energy = float(last["e_fr_energy"]) - pstress_kbar * 0.1 * units.GPa * volume
    check_result(energy, forces, stress)
    return LabelResult(
        energy=energy,
        forces=forces,
        stress=stress,
        extra={
            "vasp_version": run.vasp_version,
            "potcars": [str(p) for p in (run.potcar_symbols or [])],
            "electronic_steps": len(last.get("electronic_steps", [])),
            "pstress_kbar": pstress_kbar,
        },
    )


@LABELLERS.register("vasp")
class VASPLabeller:
    """VASP through pymatgen's Materials Project input sets and custodian."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        input_set: Literal["MPStaticSet", "MPRelaxSet", "MPScanStaticSet"] = Field(
            default="MPStaticSet",
            description="pymatgen's Materials Project input set the INCAR, KPOINTS and POTCARs "
            "come from",
        )
        user_incar_settings: dict[str, Any] = Field(
            default_factory=dict, description="INCAR tags over the input set's (ENCUT: 600)"
        )
        user_kpoints_settings: dict[str, Any] = Field(
            default_factory=dict,
            description="k-points over the input set's (reciprocal_density: 200)",
        )
        command: str = Field(default="vasp_std", description='e.g. "srun -n 32 vasp_std"')
        vasp_version: str | None = Field(
            default=None, description="declared version; a label from another version fails"
        )
        custodian: bool = Field(
            default=True,
            description="run VASP under custodian's error handlers (false: run command as is)",
        )
        max_errors: int = Field(
            default=5, ge=0, description="corrections custodian may make before giving up"
        )

        @model_validator(mode="after")
        def _custodian_installed(self) -> VASPLabeller.Params:
            # VASP itself is the user's; custodian is pestle[vasp], needed only when used.
            if self.custodian:
                require("vasp", "labeller 'vasp' with custodian: true (false runs command alone)")
            return self

    def __init__(self, params: Params) -> None:
        self.params = params

    def resources(self) -> Resources:
        """One Dask slot per calculation: ``command`` places VASP's own ranks (srun -n 32)."""
        return Resources(cpus=1)

    def level_of_theory(self) -> dict[str, Any]:
        import pymatgen.core

        p = self.params
        config = input_set_class(p.input_set).CONFIG
        return {
            "code": "vasp",
            "version": p.vasp_version,
            "input_set": p.input_set,
            "pymatgen_version": pymatgen.core.__version__,
            "incar": {**config["INCAR"], **p.user_incar_settings},
            "kpoints": {**config.get("KPOINTS", {}), **p.user_kpoints_settings},
            "potcar_functional": config.get("POTCAR_FUNCTIONAL"),
            "potcar": config["POTCAR"],
        }

    @staticmethod
    def energy_convention(level_of_theory: dict[str, Any]) -> dict[str, Any]:
        """vasprun's ``e_fr_energy`` (TOTEN, the free energy), with the INCAR's ISMEAR and
        SIGMA (VASP's defaults 1 and 0.2 eV when the INCAR leaves them out)."""
        incar = level_of_theory.get("incar") or {}
        ismear = int(incar.get("ISMEAR", 1))
        names = {-5: "tetrahedron-blochl", -4: "tetrahedron", -2: "fixed", -1: "fermi-dirac",
                 0: "gaussian"}  # fmt: skip
        name = (
            f"methfessel-paxton-{ismear}" if ismear > 0 else names.get(ismear, f"ISMEAR {ismear}")
        )
        width = None if ismear in (-5, -4, -2) else float(incar.get("SIGMA", 0.2))
        return convention("free", "vasp", name, width)

    def input_set(self, atoms: Atoms):
        from pymatgen.io.ase import AseAtomsAdaptor

        p = self.params
        structure = AseAtomsAdaptor.get_structure(
            Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        )
        return input_set_class(p.input_set)(
            structure,
            user_incar_settings=p.user_incar_settings or None,
            user_kpoints_settings=p.user_kpoints_settings or None,
        )

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.input_set(atoms).write_input(workdir)
        except Exception as exc:  # most often: no POTCARs (PMG_VASP_PSP_DIR)
            raise LabelError(f"cannot write VASP inputs: {type(exc).__name__}: {exc}") from None
        self._run(workdir)
        result = parse_vasprun(workdir / "vasprun.xml")
        declared = self.params.vasp_version
        if declared and not str(result.extra["vasp_version"]).startswith(declared):
            raise LabelError(
                f"VASP {result.extra['vasp_version']} ran, the level of theory says {declared}"
            )
        return result

    def _run(self, workdir: Path) -> None:
        import subprocess

        command = shlex.split(self.params.command)
        if not self.params.custodian:
            done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
            if done.returncode != 0:
                raise LabelError(f"{self.params.command} exited with {done.returncode}")
            return
        from custodian import Custodian
        from custodian.vasp.handlers import (
            MeshSymmetryErrorHandler,
            NonConvergingErrorHandler,
            PotimErrorHandler,
            UnconvergedErrorHandler,
            VaspErrorHandler,
        )
        from custodian.vasp.jobs import VaspJob

        handlers = [
            VaspErrorHandler(),
            MeshSymmetryErrorHandler(),
            UnconvergedErrorHandler(),
            NonConvergingErrorHandler(),
            PotimErrorHandler(),
        ]
        job = VaspJob(command, auto_npar=False, final=True, suffix="")
        try:
            Custodian(
                handlers, [job], max_errors=self.params.max_errors, directory=str(workdir)
            ).run()
        except Exception as exc:
            raise LabelError(f"VASP under custodian failed: {type(exc).__name__}: {exc}") from None

    def _incar(self) -> dict[str, Any]:
        return {**input_set_class(self.params.input_set).CONFIG["INCAR"],
                **self.params.user_incar_settings}  # fmt: skip

    def _reciprocal_density(self) -> float:
        """k-points per reciprocal-space volume (1/Å^3) the input set writes: the user's, else
        the input set's own default (MPStaticSet: 100; MPRelaxSet: its CONFIG, 64)."""
        user = self.params.user_kpoints_settings.get("reciprocal_density")
        if user is not None:
            return float(user)
        cls = input_set_class(self.params.input_set)
        default = getattr(cls, "reciprocal_density", None)
        if isinstance(default, (int, float)):
            return float(default)
        return float(cls.CONFIG.get("KPOINTS", {}).get("reciprocal_density", 64))

    def convergence_settings(self) -> tuple[ConvergenceSetting, ...]:
        """ENCUT (+30 % a rung, 10 eV steps), then the k-point sampling: KSPACING when the
        INCAR sets it (divided by 1.5 a rung), else pymatgen's reciprocal_density (x3.375 a
        rung, i.e. x1.5 along each axis). Other KPOINTS schemes are not laddered."""
        incar = self._incar()
        settings = [
            ConvergenceSetting("ENCUT", "labeller.params.user_incar_settings.ENCUT",
                               float(incar.get("ENCUT", 520)), "eV", "basis", factor=1.3,
                               quantum=10.0, limit=2000.0, description="plane-wave cutoff",
                               plane_wave_cutoff=True),
        ]  # fmt: skip
        if incar.get("KSPACING") is not None:
            settings.append(
                ConvergenceSetting("KSPACING", "labeller.params.user_incar_settings.KSPACING",
                                   float(incar["KSPACING"]), "1/Å", "sampling", factor=1 / 1.5,
                                   quantum=0.01, limit=0.05, description="k-point spacing")
            )  # fmt: skip
        elif set(self.params.user_kpoints_settings) <= {"reciprocal_density"}:
            settings.append(
                ConvergenceSetting("reciprocal_density",
                                   "labeller.params.user_kpoints_settings.reciprocal_density",
                                   self._reciprocal_density(), "1/Å³", "sampling",
                                   factor=1.5**3, quantum=10.0, limit=20000.0,
                                   description="k-point density")
            )  # fmt: skip
        return tuple(settings)

    def with_setting(self, name: str, value: float) -> VASPLabeller:
        p = self.params.model_dump()
        if name in ("ENCUT", "KSPACING"):
            p["user_incar_settings"] = {**p["user_incar_settings"], name: value}
        elif name == "reciprocal_density":
            p["user_kpoints_settings"] = {**p["user_kpoints_settings"], name: int(round(value))}
        else:
            raise ValueError(f"vasp has no convergence setting {name!r}")
        return VASPLabeller(self.Params.model_validate(p))
