"""Molecular-dynamics snapshots driven by a potential: thermally disordered structures at
temperatures where the model's errors grow, sampled after equilibration."""

from __future__ import annotations

from typing import ClassVar, Literal

from ase import units
from pydantic import BaseModel, ConfigDict, Field

from pestle.plugins import PluginSpec
from pestle.samplers import (
    SAMPLERS,
    Candidate,
    PotentialSpec,
    Seed,
    default_potential,
    sampler_rng,
)
from pestle.samplers.rattle import Supercell, make_supercell


@SAMPLERS.register("md")
class MDSampler:
    """Langevin (NVT) or NVE dynamics with a potential; snapshots every k steps."""

    drives_with_potential: ClassVar[bool] = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        potential: PotentialSpec = Field(
            default_factory=default_potential,
            description="the potential that drives the dynamics (the daemon can swap in the "
            "promoted model)",
        )
        temperatures: list[float] = Field(
            default=[300.0, 1000.0], min_length=1, description="K; one trajectory per temperature"
        )
        thermostat: Literal["langevin", "nve"] = Field(
            default="langevin",
            description="langevin: NVT at each temperature; nve: velocity Verlet from "
            "velocities drawn at it",
        )
        timestep_fs: float = Field(default=1.0, gt=0, le=10, description="MD time step, fs")
        friction_per_fs: float = Field(default=0.02, gt=0, description="Langevin friction")
        equilibration_steps: int = Field(
            default=100, ge=0, description="steps run before the first snapshot"
        )
        snapshot_every: int = Field(default=20, ge=1, description="steps between snapshots")
        snapshots_per_temperature: int = Field(
            default=3, ge=1, description="candidates taken from each trajectory"
        )
        supercell: Supercell = Field(
            default=(1, 1, 1), description="repetitions of the seed along its cell vectors"
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def with_potential(self, spec: PluginSpec) -> MDSampler:
        return MDSampler(self.params.model_copy(update={"potential": spec}))

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        from ase.constraints import FixCom
        from ase.md.langevin import Langevin
        from ase.md.velocitydistribution import Stationary, thermalize_momenta
        from ase.md.verlet import VelocityVerlet

        from pestle.potentials import POTENTIALS
        from pestle.potentials.calculator import PotentialCalculator

        p = self.params
        potential = POTENTIALS.build_spec(p.potential)
        described = potential.describe()
        children = sampler_rng(rng_seed).integers(0, 2**63 - 1, size=len(p.temperatures))
        candidates = []
        for temperature, child in zip(p.temperatures, children, strict=True):
            rng = sampler_rng(int(child))
            atoms = make_supercell(seed.atoms, p.supercell)
            atoms.calc = PotentialCalculator(potential)
            thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
            Stationary(atoms)
            atoms.set_constraint(FixCom())  # no drift of the whole cell
            timestep = p.timestep_fs * units.fs
            if p.thermostat == "langevin":
                dynamics = Langevin(
                    atoms,
                    timestep,
                    temperature_K=temperature,
                    friction=p.friction_per_fs / units.fs,
                    rng=rng,
                    fixcm=False,
                )
            else:
                dynamics = VelocityVerlet(atoms, timestep)
            dynamics.run(p.equilibration_steps)
            for snapshot in range(p.snapshots_per_temperature):
                dynamics.run(p.snapshot_every)
                step = p.equilibration_steps + (snapshot + 1) * p.snapshot_every
                frame = atoms.copy()
                frame.calc = None
                frame.set_constraint()
                candidates.append(
                    Candidate(
                        atoms=frame,
                        sampler=self.name,
                        params={
                            "temperature_K": temperature,
                            "thermostat": p.thermostat,
                            "step": step,
                            "time_fs": step * p.timestep_fs,
                            "kinetic_temperature_K": float(atoms.get_temperature()),
                            "potential_energy_eV": float(atoms.get_potential_energy()),
                            "total_energy_eV": float(atoms.get_total_energy()),
                            "timestep_fs": p.timestep_fs,
                            "potential": described,
                            "supercell": list(p.supercell),
                        },
                        parent_id=seed.id,
                        rng_seed=int(child),
                    )
                )
        return candidates
