"""Any registered Potential as a reference labeller: teacher labels from a trusted model,
or a cheap stand-in for DFT in tests and dry runs of a campaign."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field

from pestle.labellers import LABELLERS, ConvergenceSetting, LabelResult, convention
from pestle.labellers.gpaw import check_result
from pestle.plugins import PluginSpec, Resources, default_name


@LABELLERS.register("potential")
class PotentialLabeller:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        # ``potential: {params: {...}}`` without a name means CHGNet.
        potential: Annotated[PluginSpec, default_name("chgnet")] = Field(
            default_factory=lambda: PluginSpec(name="chgnet"),
            description="the potential whose predictions are the labels ({name, params}; "
            "without a name: chgnet)",
        )

    def __init__(self, params: Params) -> None:
        from pestle.potentials import POTENTIALS

        self.params = params
        # Built (and its weights loaded) lazily on the worker: the instance travels pickled.
        self._potential = None
        POTENTIALS.validate_params(params.potential.name, params.potential.params)

    def _model(self):
        from pestle.potentials import POTENTIALS

        if self._potential is None:
            self._potential = POTENTIALS.build_spec(self.params.potential)
        return self._potential

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params, "_potential": None}

    def resources(self) -> Resources:
        return Resources(cpus=1)  # one model evaluation per structure, in the worker

    def level_of_theory(self) -> dict[str, Any]:
        return {"code": "pestle-potential", "potential": self._model().describe()}

    @staticmethod
    def energy_convention(level_of_theory: dict[str, Any]) -> dict[str, Any]:
        """A model's prediction: whatever energy it learnt, with no smearing of its own."""
        return convention("total", "pestle-potential")

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
        [prediction] = self._model().predict([atoms])
        check_result(prediction.energy, prediction.forces, prediction.stress)
        return LabelResult(
            energy=float(prediction.energy), forces=prediction.forces, stress=prediction.stress
        )

    def convergence_settings(self) -> tuple[ConvergenceSetting, ...]:
        """Nothing to converge: a potential's prediction is exact arithmetic, with no basis or k-point grid."""
        return ()

    def with_setting(self, name: str, value: float) -> PotentialLabeller:
        raise ValueError(f"potential labels have no convergence setting {name!r}")
