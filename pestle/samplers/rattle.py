"""Gaussian rattling: every atom displaced by an independent normal draw per Cartesian axis."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from pestle.samplers import SAMPLERS, Candidate, Seed, sampler_rng

# Repetitions of the seed cell along its three lattice vectors.
Supercell = tuple[PositiveInt, PositiveInt, PositiveInt]


def make_supercell(atoms, supercell: tuple[int, int, int]):
    """Repeat so that displacements are not all periodic images of one another."""
    return atoms.repeat(supercell) if tuple(supercell) != (1, 1, 1) else atoms.copy()


@SAMPLERS.register("rattle")
class RattleSampler:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        amplitudes: list[float] = Field(
            default=[0.05, 0.1, 0.2],
            min_length=1,
            description="standard deviations of the displacement per axis, in Angstrom",
        )
        per_amplitude: int = Field(default=3, ge=1, le=10_000)
        supercell: Supercell = (1, 1, 1)

        @field_validator("amplitudes")
        @classmethod
        def _physical_amplitudes(cls, value: list[float]) -> list[float]:
            if any(a <= 0 or a > 1.5 for a in value):
                raise ValueError("amplitudes must lie in (0, 1.5] Angstrom")
            return value

    def __init__(self, params: Params) -> None:
        self.params = params

    def sample(self, seed: Seed, rng_seed: int) -> list[Candidate]:
        base = make_supercell(seed.atoms, self.params.supercell)
        # One child seed per candidate: each structure is reproducible on its own from
        # (rng_seed, index), independent of how many others were drawn.
        children = sampler_rng(rng_seed).integers(
            0, 2**63 - 1, size=self.params.per_amplitude * len(self.params.amplitudes)
        )
        candidates = []
        index = 0
        for amplitude in self.params.amplitudes:
            for _ in range(self.params.per_amplitude):
                child_seed = int(children[index])
                atoms = base.copy()
                atoms.positions += sampler_rng(child_seed).normal(
                    0.0, amplitude, size=(len(atoms), 3)
                )
                atoms.info.pop("pestle", None)
                candidates.append(
                    Candidate(
                        atoms=atoms,
                        sampler=self.name,
                        params={
                            "amplitude": amplitude,
                            "supercell": list(self.params.supercell),
                            "index": index,
                        },
                        parent_id=seed.id,
                        rng_seed=child_seed,
                    )
                )
                index += 1
        return candidates
