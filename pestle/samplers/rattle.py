"""Rattling: every atom displaced by an independent normal draw per Cartesian axis, either
plainly (``gaussian``) or accepted with the Boltzmann factor of the energy change a potential
predicts (``boltzmann``), so the structures stay thermally plausible at temperature T."""

from __future__ import annotations

import logging
import math
from typing import ClassVar, Literal

from ase import units
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from pestle.plugins import PluginSpec
from pestle.samplers import SAMPLERS, Candidate, PotentialSpec, Seed, displace, sampler_rng

log = logging.getLogger("pestle.samplers.rattle")

# Repetitions of the seed cell along its three lattice vectors.
Supercell = tuple[PositiveInt, PositiveInt, PositiveInt]


def make_supercell(atoms, supercell: tuple[int, int, int]):
    """Repeat so that displacements are not all periodic images of one another."""
    return atoms.repeat(supercell) if tuple(supercell) != (1, 1, 1) else atoms.copy()


@SAMPLERS.register("rattle")
class RattleSampler:
    """Gaussian displacements at several amplitudes, optionally Boltzmann-accepted."""

    # In mode boltzmann: the acceptance weighs energies of ``potential``.
    drives_with_potential: ClassVar[bool] = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        amplitudes: list[float] = Field(
            default=[0.05, 0.1, 0.2],
            min_length=1,
            description="standard deviations of the displacement per axis, in Angstrom",
        )
        per_amplitude: int = Field(
            default=3, ge=1, le=10_000, description="candidates per amplitude"
        )
        supercell: Supercell = Field(
            default=(1, 1, 1), description="repetitions of the seed along its cell vectors"
        )
        mode: Literal["gaussian", "boltzmann"] = Field(
            default="gaussian",
            description="gaussian: every draw kept; boltzmann: a draw kept with probability "
            "exp(-dE/kT) under the potential (needs temperature and potential)",
        )
        temperature: float | None = Field(default=None, gt=0, description="K, for mode boltzmann")
        potential: PotentialSpec | None = Field(
            default=None, description="energy model for mode boltzmann"
        )
        max_trials: int = Field(
            default=50, ge=1, description="draws per accepted structure (boltzmann)"
        )

        @field_validator("amplitudes")
        @classmethod
        def _physical_amplitudes(cls, value: list[float]) -> list[float]:
            if any(a <= 0 or a > 1.5 for a in value):
                raise ValueError("amplitudes must lie in (0, 1.5] Angstrom")
            return value

        @model_validator(mode="after")
        def _boltzmann_needs(self):
            if self.mode == "boltzmann":
                missing = [k for k in ("temperature", "potential") if getattr(self, k) is None]
                if missing:
                    raise ValueError(f"mode boltzmann needs {' and '.join(missing)}")
            return self

    def __init__(self, params: Params) -> None:
        self.params = params

    def with_potential(self, spec: PluginSpec) -> RattleSampler:
        if self.params.mode != "boltzmann":  # plain Gaussian rattling uses no potential
            return RattleSampler(self.params.model_copy())
        return RattleSampler(self.params.model_copy(update={"potential": spec}))

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        p = self.params
        base = make_supercell(seed.atoms, p.supercell)
        # One child seed per candidate: each structure is reproducible on its own from
        # (rng_seed, index), independent of how many others were drawn.
        children = sampler_rng(rng_seed).integers(
            0, 2**63 - 1, size=p.per_amplitude * len(p.amplitudes)
        )
        potential = None
        if p.mode == "boltzmann":
            from pestle.potentials import POTENTIALS

            potential = POTENTIALS.build_spec(p.potential)
        reference = potential.predict([base])[0].energy if potential is not None else None
        candidates = []
        for index, child in enumerate(children):
            amplitude = p.amplitudes[index // p.per_amplitude]
            rng = sampler_rng(int(child))
            params = {"amplitude": amplitude, "supercell": list(p.supercell), "index": index}
            if potential is None:
                atoms = displace(base.copy(), amplitude, rng)
            else:
                atoms, accepted = self._boltzmann(base, amplitude, rng, potential, reference)
                if atoms is None:
                    log.info("rattle: nothing accepted in %d trials at %.3g A, %g K",
                             p.max_trials, amplitude, p.temperature)  # fmt: skip
                    continue
                params |= {"mode": "boltzmann", "temperature": p.temperature, **accepted,
                           "potential": potential.describe()}  # fmt: skip
            candidates.append(
                Candidate(
                    atoms=atoms,
                    sampler=self.name,
                    params=params,
                    parent_id=seed.id,
                    rng_seed=int(child),
                )
            )
        return candidates

    def _boltzmann(self, base, amplitude, rng, potential, reference):
        """Metropolis-style acceptance of one rattled structure against the unrattled seed."""
        kT = units.kB * self.params.temperature
        for trial in range(1, self.params.max_trials + 1):
            atoms = displace(base.copy(), amplitude, rng)
            delta = potential.predict([atoms])[0].energy - reference
            probability = 1.0 if delta <= 0 else math.exp(-delta / kT)
            if rng.random() < probability:
                return atoms, {
                    "energy_change_eV": float(delta),
                    "acceptance_probability": float(probability),
                    "trials": trial,
                }
        return None, {}
