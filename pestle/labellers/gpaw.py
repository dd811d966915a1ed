"""GPAW plane-wave DFT labels.

The level of theory names everything that changes the numbers: code version, functional,
cutoff, k-point density, smearing, spin, SCF convergence criteria and the PAW setups, the last
as a digest of the setup files' contents (a folder path differs between machines, the
physics does not). A worker whose setups differ from the driver's computes a different hash,
and the dispatcher refuses to file its label under the wrong level of theory.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from ase import Atoms
from ase.calculators.calculator import kptdensity2monkhorstpack
from pydantic import BaseModel, ConfigDict, Field

from pestle.labellers import LABELLERS, ConvergenceSetting, LabelError, LabelResult, convention
from pestle.plugins import Resources

# Elements whose compounds are routinely magnetic: spin polarisation is switched on for them
# when ``spinpol`` is left to pestle. Everything else is computed spin-paired.
MAGNETIC_ELEMENTS = frozenset(
    {"V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Mo", "Ru", "Rh", "Ce", "Pr", "Nd", "Sm", "Eu", "Gd",
     "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "U", "Np", "Pu"}
)  # fmt: skip
# Forces beyond this are not physics but a broken calculation (overlapping cores).
MAX_PLAUSIBLE_FORCE = 1000.0  # eV/A

SMEARING_NAMES = {
    "fermi-dirac": "fermi-dirac",
    "marzari-vanderbilt": "marzari-vanderbilt",
    "gaussian": "gaussian",
}


# Debian's gpaw-data package. GPAW also finds the setups of the pip package gpaw-data; the
# two datasets differ, so which one is used must not depend on how pestle was launched.
DEBIAN_SETUPS = Path("/usr/share/gpaw-setups")


def setup_search_paths() -> list[Path]:
    """GPAW's setup search path: GPAW_SETUP_PATH when set, else Debian's gpaw-data first
    (when installed), then what GPAW finds on its own."""
    import gpaw

    wanted = not os.environ.get("GPAW_SETUP_PATH") and DEBIAN_SETUPS.is_dir()
    if wanted and str(DEBIAN_SETUPS) not in [str(p) for p in gpaw.setup_paths]:
        gpaw.setup_paths.insert(0, str(DEBIAN_SETUPS))
    return [Path(p) for p in gpaw.setup_paths]


def dataset_release(folder: Path) -> str | None:
    """Release of a setup folder when it tells: gpaw-setups-X.Y.Z, or pip's gpaw-data."""
    name = folder.resolve().name.removeprefix("gpaw-setups-")
    if name[:1].isdigit():
        return name
    if "gpaw_data" in folder.resolve().parts:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"gpaw-data {version('gpaw-data')} (pip)"
        except PackageNotFoundError:
            return None
    return None


@functools.lru_cache(maxsize=16)
def setup_dataset(setup_name: str) -> dict[str, Any]:
    """Identify the PAW dataset GPAW will load for ``setup_name`` (e.g. "PBE"): the first
    folder on GPAW's search path holding such setups, digested by file names and contents."""
    for folder in setup_search_paths():
        files = sorted(folder.glob(f"*.{setup_name}.gz")) + sorted(folder.glob(f"*.{setup_name}"))
        if not files:
            continue
        digest = hashlib.sha256()
        for path in sorted(files, key=lambda p: p.name):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return {
            "name": "paw",
            "functional": setup_name,
            "files": len(files),
            "sha256": digest.hexdigest(),
            "release": dataset_release(folder),
        }
    searched = ", ".join(str(p) for p in setup_search_paths()) or "nothing"
    raise LabelError(
        f"no GPAW PAW setups for {setup_name} found (searched {searched}); install Debian's "
        "gpaw-data and set GPAW_SETUP_PATH to its folder (dpkg -L gpaw-data)"
    )


@LABELLERS.register("gpaw")
class GPAWLabeller:
    requires_extra: ClassVar[str] = "gpaw"  # pip install 'pestle[gpaw]'

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        xc: str = Field(
            default="PBE", description="exchange-correlation functional, as GPAW names it"
        )
        ecut: float = Field(default=400.0, gt=0, le=3000, description="plane-wave cutoff, eV")
        kpoint_density: float = Field(
            default=3.0,
            gt=0,
            description="k-points per reciprocal-lattice length (1/A), as ASE's kptdensity",
        )
        gamma_centered: bool = Field(
            default=True, description="Monkhorst-Pack mesh shifted to contain the Gamma point"
        )
        smearing: Literal["fermi-dirac", "marzari-vanderbilt", "gaussian"] = Field(
            default="fermi-dirac",
            description="occupation smearing; labels hold the free energy at this smearing",
        )
        smearing_width: float = Field(default=0.05, ge=0, le=2.0, description="eV")
        spinpol: bool | None = Field(
            default=None, description="None: spin-polarised iff a magnetic element is present"
        )
        convergence: dict[str, float] = Field(
            default_factory=lambda: {"energy": 1e-6, "density": 1e-5, "eigenstates": 1e-8},
            description="GPAW SCF criteria (energy in eV per valence electron)",
        )
        maxiter: int = Field(
            default=200, ge=1, description="SCF iterations before the label fails as unconverged"
        )
        parallel_ranks: int = Field(
            default=1,
            ge=1,
            description="MPI ranks per calculation (1: serial in the worker; more: mpiexec)",
        )
        txt: bool = Field(default=True, description="keep GPAW's log as gpaw.txt in the job folder")

    def __init__(self, params: Params) -> None:
        self.params = params

    def resources(self) -> Resources:
        """Cores one calculation occupies (its MPI ranks): the Dask CPU resource it asks for."""
        return Resources(cpus=self.params.parallel_ranks)

    def cpus(self) -> int:
        """``resources().cpus``, for callers written before ``resources()``."""
        return self.resources().cpus

    def _setup_name(self) -> str:
        from gpaw.xc import XC

        try:
            return XC(self.params.xc).get_setup_name()
        except Exception as exc:
            raise LabelError(f"labeller.params.xc: GPAW does not know {self.params.xc!r}") from exc

    def level_of_theory(self) -> dict[str, Any]:
        import gpaw

        p = self.params
        return {
            "code": "gpaw",
            "version": gpaw.__version__,
            "mode": "pw",
            "xc": p.xc,
            "ecut": p.ecut,
            "kpoint_density": p.kpoint_density,
            "gamma_centered": p.gamma_centered,
            "smearing": {"name": p.smearing, "width": p.smearing_width},
            "spinpol": "auto" if p.spinpol is None else p.spinpol,
            "convergence": dict(sorted(p.convergence.items())),
            "setups": setup_dataset(self._setup_name()),
        }

    @staticmethod
    def energy_convention(level_of_theory: dict[str, Any]) -> dict[str, Any]:
        """The free energy at the configured smearing (``label`` asks GPAW for the
        force-consistent energy), not extrapolated to zero width."""
        smearing = level_of_theory.get("smearing") or {}
        return convention("free", "gpaw", smearing.get("name"), smearing.get("width"))

    def kpoints(self, atoms: Atoms) -> list[int]:
        if not atoms.pbc.any():
            return [1, 1, 1]
        mesh = kptdensity2monkhorstpack(atoms, kptdensity=self.params.kpoint_density, even=False)
        return [int(k) if periodic else 1 for k, periodic in zip(mesh, atoms.pbc, strict=True)]

    def spin_polarised(self, atoms: Atoms) -> bool:
        if self.params.spinpol is not None:
            return self.params.spinpol
        return bool(MAGNETIC_ELEMENTS & set(atoms.get_chemical_symbols()))

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
        if self.params.parallel_ranks > 1:
            return self._label_with_mpi(atoms, Path(workdir))
        return self._label_here(atoms, Path(workdir))

    def _label_with_mpi(self, atoms: Atoms, workdir: Path) -> LabelResult:
        """The same calculation in ``mpiexec -n parallel_ranks`` (see gpaw_mpi.py)."""
        import json
        import shutil
        import subprocess
        import sys

        from pestle.structures import atoms_to_dict

        mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            raise LabelError("labeller.params.parallel_ranks > 1 needs mpiexec on the PATH")
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "result.json").unlink(missing_ok=True)
        request = {"atoms": atoms_to_dict(atoms), "params": self.params.model_dump(mode="json")}
        (workdir / "input.json").write_text(json.dumps(request))
        # GPAW enables MPI in a plain python only when asked (else `gpaw python` is needed).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GPAW_MPI_BACKEND": "cgpaw"}
        for path in setup_search_paths()[:1]:
            env.setdefault("GPAW_SETUP_PATH", str(path))  # the ranks use the same setups
        if os.geteuid() == 0:  # OpenMPI refuses root unless told twice
            env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        command = [mpiexec, "-n", str(self.params.parallel_ranks), sys.executable, "-m",
                   "pestle.labellers.gpaw_mpi", str(workdir)]  # fmt: skip
        with open(workdir / "mpi.log", "w") as log_file:
            done = subprocess.run(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        result_file = workdir / "result.json"
        if not result_file.is_file():
            tail = (workdir / "mpi.log").read_text()[-2000:]
            raise RuntimeError(f"mpiexec exited with {done.returncode} and no result:\n{tail}")
        reply = json.loads(result_file.read_text())
        if "label_error" in reply:
            raise LabelError(reply["label_error"])
        if "error" in reply:
            raise RuntimeError(f"GPAW under MPI: {reply['error']}")
        return LabelResult(
            energy=reply["energy"],
            forces=np.asarray(reply["forces"]),
            stress=None if reply["stress"] is None else np.asarray(reply["stress"]),
            extra=reply["extra"],
        )

    def _label_here(self, atoms: Atoms, workdir: Path) -> LabelResult:
        from gpaw import GPAW, PW, ConvergenceError

        p = self.params
        setup_search_paths()  # the same setups as level_of_theory() describes
        setup_dataset(self._setup_name())  # fail early and clearly if setups are missing
        workdir.mkdir(parents=True, exist_ok=True)
        atoms = atoms.copy()
        atoms.calc = None
        kpts = self.kpoints(atoms)
        spinpol = self.spin_polarised(atoms)
        if spinpol and not atoms.get_initial_magnetic_moments().any():
            atoms.set_initial_magnetic_moments([1.0] * len(atoms))
        calc = GPAW(
            mode=PW(p.ecut),
            xc=p.xc,
            kpts={"size": kpts, "gamma": p.gamma_centered},
            occupations={"name": SMEARING_NAMES[p.smearing], "width": p.smearing_width},
            spinpol=spinpol,
            convergence=dict(p.convergence),
            maxiter=p.maxiter,
            txt=str(workdir / "gpaw.txt") if p.txt else None,
            parallel={"domain": 1, "band": 1},
        )
        atoms.calc = calc
        started = time.perf_counter()
        try:
            # The free energy is the one consistent with the forces under smearing.
            energy = atoms.get_potential_energy(force_consistent=True)
            forces = atoms.get_forces()
            stress = atoms.get_stress(voigt=True) if atoms.pbc.all() else None
        except ConvergenceError as exc:
            raise LabelError(f"GPAW SCF did not converge in {p.maxiter} iterations") from exc
        except FileNotFoundError as exc:
            raise LabelError(f"GPAW could not read its setups: {exc}") from exc
        seconds = time.perf_counter() - started
        check_result(energy, forces, stress)
        extra: dict[str, Any] = {
            "kpts": kpts,
            "scf_iterations": int(calc.get_number_of_iterations()),
            # Per-element md5 of the setup files GPAW actually loaded (it prints them too).
            "setup_fingerprints": {
                symbol: calc.setups[index].fingerprint
                for symbol, index in sorted(
                    {s: i for i, s in enumerate(atoms.get_chemical_symbols())}.items()
                )
            },
            "fermi_level": _finite_or_none(calc.get_fermi_level()),
            "gpaw_seconds": round(seconds, 3),
            "spinpol": spinpol,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        }
        if spinpol:
            extra["magmom"] = float(calc.get_magnetic_moment())
        return LabelResult(energy=float(energy), forces=forces, stress=stress, extra=extra)

    def convergence_settings(self) -> tuple[ConvergenceSetting, ...]:
        """Cutoff first (+30 % a rung, in 10 eV steps), then k-point density (x1.5 a rung, so
        every axis of the mesh grows by about half, in steps of 0.5/Å)."""
        p = self.params
        return (
            ConvergenceSetting("ecut", "labeller.params.ecut", p.ecut, "eV", "basis",
                               factor=1.3, quantum=10.0, limit=2000.0,
                               description="plane-wave cutoff",
                               plane_wave_cutoff=True),
            ConvergenceSetting("kpoint_density", "labeller.params.kpoint_density",
                               p.kpoint_density, "per Å⁻¹", "sampling", factor=1.5, quantum=0.5,
                               limit=15.0, description="k-point density"),
        )  # fmt: skip

    def with_setting(self, name: str, value: float) -> GPAWLabeller:
        if name not in ("ecut", "kpoint_density"):
            raise ValueError(f"gpaw has no convergence setting {name!r}")
        return GPAWLabeller(self.Params.model_validate({**self.params.model_dump(), name: value}))

    def basis_error(self, symbols: Any, ecut: float) -> dict[str, float]:
        """Per element, the kinetic energy (eV per atom) its occupied pseudo partial waves
        carry in plane waves beyond ``ecut``: what a cutoff cannot represent, from the PAW
        setup alone (GPAW's dataset generator prints the same quantity). An estimate of which
        element a cutoff starves, not of the error in the solid."""
        setup_search_paths()
        name = self._setup_name()
        return {symbol: kinetic_energy_beyond(symbol, name, float(ecut))
                for symbol in sorted(set(symbols))}  # fmt: skip


@functools.lru_cache(maxsize=256)
def kinetic_energy_beyond(symbol: str, setup_name: str, ecut: float) -> float:
    """Kinetic energy (eV per atom) of the occupied, bound pseudo partial waves of an
    element's PAW setup in plane waves above ``ecut`` (eV): sum over states of occupation
    times the integral of G^2/2 |phi(G)|^2 beyond the cutoff sphere."""
    from ase.units import Ha
    from gpaw.setup_data import SetupData

    data = SetupData(symbol, setup_name)
    rgd = data.rgd
    g_cut = math.sqrt(2 * ecut / Ha)
    total = 0.0
    for n, ell, f, phit in zip(data.n_j, data.l_j, data.f_j, data.phit_jg, strict=True):
        if n <= 0 or f <= 0:  # unbound projector functions carry no electrons
            continue
        g, phi_g = rgd.fft(phit * rgd.r_g, ell)
        density = 0.5 * phi_g**2 * g**4 / (2 * math.pi) ** 3
        beyond = g > g_cut
        total += f * float(np.trapezoid(density[beyond], g[beyond]))
    return total * Ha


def _finite_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_result(energy: float, forces: np.ndarray, stress: np.ndarray | None) -> None:
    """Refuse numbers no physical calculation produces."""
    if not math.isfinite(energy):
        raise LabelError(f"non-finite energy {energy}")
    if not np.all(np.isfinite(forces)):
        raise LabelError("non-finite forces")
    worst = float(np.abs(forces).max()) if forces.size else 0.0
    if worst > MAX_PLAUSIBLE_FORCE:
        raise LabelError(f"force component of {worst:.3g} eV/A is not physical")
    if stress is not None and not np.all(np.isfinite(stress)):
        raise LabelError("non-finite stress")
