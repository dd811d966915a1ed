"""Fine-tune a matgl ``Potential`` (TensorNet, M3GNet, ...) on pestle's labels with matgl's own
training module: ``PotentialLightningModule`` driven by a Lightning ``Trainer``, data in
``MGLDataset`` through ``MGLDataLoader`` with ``collate_fn_pes``.

Units (checked against matgl 4.1's ``Potential`` and its training docs):

* energy: total eV per structure (the module's loss divides by the atom count itself);
* forces: eV/A;
* stress: matgl trains and predicts GPa with ASE's sign (compressive negative), as 3x3 blocks
  stacked per structure. ASE Voigt eV/A^3 -> 3x3 -> divided by ``ase.units.GPa``; no sign flip.

Level of theory: with ``refit_element_refs`` the Potential's per-element reference energies
(its ``AtomRef`` offsets, ``element_refs``) are shifted by a least-squares fit over
compositions of the label-minus-model energy residuals on the training set, so the network
learns only what the new labels change beyond a per-element constant. Elements absent from
the training set keep their references.

The Potential we load is the one trained: the Lightning module's own wrapper is swapped for
it, so options such as a ZBL repulsion term survive and ``Potential.save`` writes a folder
``pestle.potentials.matgl`` loads. We keep a copy of the weights from the epoch with the
lowest validation loss. Lightning's logs go under ``workdir``; nothing is downloaded.

Modes of Deng et al. (2025) (``Params.mode``, see ``pestle.trainers.modes``):

* ``custom``: the fields as given;
* ``full``: every parameter trainable, ``loss: mse_loss`` with energy/force/stress weights
  0.1/100/0.1, Adam (matgl's default optimiser) at 1e-3 with matgl's cosine schedule down to
  1e-5 (``decay_alpha`` 0.01; ``decay_steps`` = epochs - 1, so the last epoch trains at 1e-5),
  100 epochs unless ``epochs`` is given, the epoch with the lowest validation force MAE kept;
* ``linear_correction``: no training. ``Potential.forward`` computes
  E = data_std * model(g) + data_mean [+ ZBL repulsion, ``ke * ...``] + element_refs, so the
  scale multiplies ``data_std``, ``data_mean`` (and the repulsion's ``ke``), fitted in closed
  form jointly with the element-ref shift (``refit_element_refs``); the Potential is saved
  with ``Potential.save`` as always.

What every family does alike (checks, mode dispatch, metrics, checkpoint and sha256) is
``pestle.trainers.base.TrainerBase``; this module supplies matgl's hooks.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from ase import units
from ase.data import atomic_numbers
from ase.stress import voigt_6_to_full_3x3_stress
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pestle.potentials.checkpoints import check_sha256
from pestle.potentials.matgl import (
    DEFAULT_MODEL,
    MatGLPotential,
    cached_model_folder,
    check_model_folder,
    check_structure,
    folder_sha256,
    matgl_version,
)
from pestle.trainers import TRAINERS, LabelledStructure
from pestle.trainers.base import BestEpoch, ChecksumError, FineTuned, TrainerBase, torch_threads
from pestle.trainers.linear import LinearTerms
from pestle.trainers.modes import (
    PAPER_FINAL_LEARNING_RATE,
    PAPER_FULL,
    PAPER_LEARNING_RATE,
    PAPER_LOSS_WEIGHTS,
    Mode,
    apply_mode,
)
from pestle.trainers.references import least_squares_shift, reference_labels

if TYPE_CHECKING:
    from matgl.apps.pes import Potential

log = logging.getLogger("pestle.trainers.matgl")

CHECKPOINT_NAME = "matgl_finetuned"  # the folder Potential.save writes
# Lightning's advice for small CPU datasets; it does not apply to pre-built graphs.
_QUIET = (
    r".*does not have many workers.*",
    r".*The number of training batches.*",
    r".*GPU available but not used.*",
)

# matgl's cosine ends at lr * decay_alpha: 1e-3 * 0.01 = 1e-5; the paper's loss is MSE.
FULL: dict[str, Any] = {
    **PAPER_FULL,
    "decay_alpha": PAPER_FINAL_LEARNING_RATE / PAPER_LEARNING_RATE,
    "loss": "mse_loss",
}
LINEAR: dict[str, Any] = {**PAPER_LOSS_WEIGHTS, "loss": "mse_loss"}
GPA = 1.0 / units.GPa  # matgl's loss sees stresses in GPa
# Fields a closed-form linear correction has no use for.
_UNUSED_BY_LINEAR = ("epochs", "learning_rate", "decay_alpha", "batch_size")


class _Split:
    """Structures of one split with labels in matgl's units."""

    def __init__(self, labelled: Sequence[LabelledStructure], with_stress: bool) -> None:
        self.atoms = [ls.atoms for ls in labelled]
        self.labels: dict[str, list] = {"energies": [], "forces": []}
        if with_stress:
            self.labels["stresses"] = []
        for ls in labelled:
            energy, forces, stress = reference_labels(ls)
            self.labels["energies"].append(energy)
            self.labels["forces"].append(forces.tolist())
            if with_stress:
                assert stress is not None
                self.labels["stresses"].append(
                    (voigt_6_to_full_3x3_stress(stress) / units.GPa).tolist()
                )


@dataclass
class _Base:
    """The base Potential (the one trained or scaled, then saved) and what a run learns
    about it."""

    folder: Path  # as saved; linear_correction fits on a float64 copy of it
    potential: Potential
    element_types: tuple[str, ...]
    refs_before: dict[str, float] | None
    ref_shift: dict[str, float] = field(default_factory=dict)  # eV/atom, elements in the data

    def numbers(self) -> list[int]:
        return [atomic_numbers[e] for e in self.element_types]

    def references(self) -> list[float]:
        """The element refs before any shift (eV/atom, ``element_types`` order; 0 without)."""
        refs = self.refs_before
        return [refs[e] for e in self.element_types] if refs else [0.0] * len(self.element_types)


@TRAINERS.register("matgl")
class MatGLTrainer(TrainerBase[_Base]):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        model: str = Field(
            DEFAULT_MODEL, description="the pretrained matgl model to start from (matgl's cache)"
        )
        model_path: Path | None = Field(
            None,
            description="a folder written by matgl's Potential.save to start from instead",
        )
        model_sha256: str | None = Field(
            None, description="that folder's sha256 (pestle's folder digest), checked first"
        )
        epochs: int = Field(10, ge=1, description="passes over the training labels")
        learning_rate: float = Field(1e-3, gt=0, description="Adam's initial learning rate")
        decay_alpha: float = Field(
            0.01, gt=0, le=1, description="the cosine schedule ends at learning_rate x this"
        )
        batch_size: int = Field(4, ge=1, description="structures per optimiser step")
        energy_weight: float = Field(1.0, ge=0, description="weight of the energy in the loss")
        force_weight: float = Field(1.0, ge=0, description="weight of the forces in the loss")
        stress_weight: float = Field(0.1, ge=0, description="weight of the stress in the loss")
        loss: Literal["mse_loss", "huber_loss", "smooth_l1_loss", "l1_loss"] = Field(
            "mse_loss", description="matgl's loss function"
        )
        refit_element_refs: bool = Field(
            True,
            description="refit the per-element reference energies to the labels first (a "
            "new level of theory); false keeps the base model's",
        )
        seed: int = Field(
            0, description="random seed of the fine-tune (shuffling, initial weights)"
        )
        # torch.set_num_threads is process-wide: restored afterwards.
        cpu_threads: int | None = Field(
            None,
            ge=1,
            description="torch threads while training; none: torch's default. One is fastest "
            "for small models on a busy CPU",
        )
        # custom: the fields above as given. full / linear_correction: Deng et al. (2025)'s
        # recipes, which fill in the fields they fix (see FULL, LINEAR).
        mode: Mode = Field(
            default="custom",
            description="custom: the fields as given; full: Deng et al. (2025)'s full fine-tune "
            "(fixes loss weights and learning rate, 100 epochs unless given); "
            "linear_correction: their one energy scale, fitted in closed form",
        )

        @model_validator(mode="after")
        def _apply_mode(self) -> MatGLTrainer.Params:
            apply_mode(self, full=FULL, linear=LINEAR,
                       unused_by_linear=_UNUSED_BY_LINEAR)  # fmt: skip
            return self

        _hex_digest = field_validator("model_sha256")(check_sha256)

    family = "matgl"
    potential_name = "matgl"
    requires_extra: ClassVar[str] = "matgl"  # pip install 'pestle[matgl]'
    baked_into = "matgl Potential"

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.potential: Potential | None = None  # the fine-tuned Potential after train()

    @property
    def refit_references(self) -> bool:
        return self.params.refit_element_refs

    def _load_base(
        self,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
    ) -> _Base:
        import lightning as pl

        pl.seed_everything(self.params.seed, workers=True, verbose=False)
        folder = self._base_folder()
        potential = self._load(folder)
        element_types = tuple(potential.model.element_types)
        for ls in list(train_set) + list(val_set):
            check_structure(ls.atoms, element_types)
        return _Base(folder, potential, element_types, self._element_refs(potential))

    def _potential_params(self, base: _Base) -> dict[str, Any]:
        return {"default_dtype": "float32"}

    def _save(
        self,
        base: _Base,
        workdir: Path,
        *,
        best_epoch: int | None = None,
        linear_scale: float | None = None,
    ) -> Path:
        """Keep the Potential and write it with ``Potential.save`` (a folder)."""
        self.potential = base.potential
        checkpoint = workdir / CHECKPOINT_NAME
        if checkpoint.exists():
            shutil.rmtree(checkpoint)
        metadata: dict[str, Any] = {"trainer": "pestle matgl", "base": str(base.folder)}
        if linear_scale is not None:
            metadata |= {"mode": self.params.mode, "linear_correction_scale": linear_scale}
        else:
            metadata["best_epoch"] = best_epoch
        base.potential.save(checkpoint, metadata=metadata)
        return checkpoint

    def _checksum(self, checkpoint: Path) -> str:
        return folder_sha256(checkpoint)

    def _after_save(self, base: _Base, checkpoint: Path, checkpoint_sha256: str) -> dict[str, Any]:
        return {
            "element_types": list(base.element_types),
            "element_refs_before": base.refs_before,
            "element_refs_after": self._element_refs(base.potential),
            "element_ref_shift_eV": base.ref_shift,
            "architecture": type(base.potential.model).__name__,
            "base_model": str(base.folder),
            "base_sha256": folder_sha256(base.folder),
            "matgl_version": matgl_version(),
        }

    # -- custom / full: matgl's PotentialLightningModule -------------------------------------

    def _train(
        self,
        base: _Base,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        device: str,
    ) -> FineTuned:
        import lightning as pl
        from lightning.pytorch.loggers import CSVLogger
        from matgl.utils.training import PotentialLightningModule

        p = self.params
        potential = base.potential
        model = potential.model
        element_types = base.element_types
        shift = np.zeros(len(element_types))
        if p.refit_element_refs:
            shift = self._refit(base, train_set)
        base.ref_shift = {
            element: float(s)
            for element, s in zip(element_types, shift, strict=True)
            if any(element in ls.atoms.get_chemical_symbols() for ls in train_set)
        }

        everything = list(train_set) + list(val_set)
        with_stress = p.stress_weight > 0 and all(
            reference_labels(ls)[2] is not None for ls in everything
        )
        train_split = _Split(train_set, with_stress)
        val_split = _Split(val_set, with_stress) if val_set else train_split
        train_loader, val_loader = self._loaders(workdir, model, train_split, val_split)

        full = p.mode == "full"
        module = PotentialLightningModule(
            model=model,
            element_refs=None,  # the refs live on `potential`, swapped in below
            energy_weight=p.energy_weight,
            force_weight=p.force_weight,
            stress_weight=p.stress_weight if with_stress else 0.0,
            loss=p.loss,
            lr=p.learning_rate,
            # Lightning steps the cosine schedule once per epoch. full: the last epoch trains
            # at the final learning rate (the paper's cosine "to 1e-5 over the run").
            decay_steps=max(p.epochs - 1, 1) if full else p.epochs,
            decay_alpha=p.decay_alpha,
        )
        # Train the Potential we loaded (its refs, data_mean/std and options such as ZBL
        # repulsion), not the bare wrapper the module builds around `model`: the module's
        # step and loss only call self.model and read its calc_* flags.
        calc_stresses = potential.calc_stresses
        potential.calc_stresses = with_stress
        potential.train()
        potential.requires_grad_(True)
        module.model = potential
        trainable = sum(x.numel() for x in potential.parameters() if x.requires_grad)

        history = _history_callback(potential, p.mode)
        accelerator, devices = (
            ("gpu", [int(device.partition(":")[2] or 0)])
            if device.startswith("cuda")
            else ("cpu", 1)
        )
        logs = workdir / "lightning_logs"
        trainer = pl.Trainer(
            max_epochs=p.epochs,
            accelerator=accelerator,
            devices=devices,
            inference_mode=False,  # forces and stresses are gradients, in validation too
            default_root_dir=str(workdir),
            logger=CSVLogger(save_dir=str(logs), name="matgl"),
            callbacks=[history],
            enable_checkpointing=False,  # the history callback keeps the best weights
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        with torch_threads(p.cpu_threads), warnings.catch_warnings():
            for pattern in _QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)

        kept = history.best.epoch
        if kept is not None:
            potential.load_state_dict(history.best_state)
        else:
            log.warning("matgl fine-tuning produced no finite validation loss: keeping the base")
            potential.load_state_dict(history.initial_state)
        potential.calc_stresses = calc_stresses
        potential.to("cpu")
        potential.requires_grad_(False)
        potential.eval()

        best = [e for e in history.epochs if e["epoch"] == kept]
        return FineTuned(
            epochs=history.epochs,
            best_epoch=kept,
            best_val_loss=best[0].get("val_loss") if best else None,
            selection=history.best.criterion if kept is not None else "base model",
            metrics={
                "best_val_force_mae": best[0].get("val_mae", {}).get("Force") if best else None,
                "targets": "efs" if with_stress else "ef",
                "lightning_logs": str(logs),
                "optimisation": {
                    "optimizer": "Adam (matgl's PotentialLightningModule default)",
                    "loss": p.loss,
                    "scheduler": "CosineAnnealingLR (matgl's default)",
                    "learning_rate_start": p.learning_rate,
                    "learning_rate_end": p.learning_rate * p.decay_alpha,
                    "decay_steps": module.decay_steps,
                    "trainable_parameters": trainable,
                },
            },
        )

    # -- linear_correction -----------------------------------------------------------------

    def _linear_terms(
        self,
        base: _Base,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
    ) -> tuple[LinearTerms, LinearTerms | None]:
        numbers, references = base.numbers(), base.references()
        # The fit evaluates the saved base in float64 (the Potential follows its dtype).
        exact = MatGLPotential(
            MatGLPotential.Params(model_path=base.folder, model_sha256=folder_sha256(base.folder),
                                  device="cpu", default_dtype="float64")
        )  # fmt: skip
        with torch_threads(self.params.cpu_threads):
            train = LinearTerms.collect(exact, train_set, numbers, references, GPA)
            val = LinearTerms.collect(exact, val_set, numbers, references, GPA) if val_set else None
        return train, val

    def _bake(
        self,
        base: _Base,
        scale: float,
        shift: np.ndarray | None,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
    ) -> dict[str, Any]:
        """The shift into the element refs, the scale into data_std/data_mean (and ZBL)."""
        potential = base.potential
        if shift is not None:
            self._shift_refs(potential, shift)
        scale_energy(potential, scale)
        potential.requires_grad_(False)
        potential.eval()
        present = {e for ls in [*train_set, *val_set] for e in ls.atoms.get_chemical_symbols()}
        base.ref_shift = (
            {
                element: float(c)
                for element, c in zip(base.element_types, shift, strict=True)
                if element in present
            }
            if shift is not None
            else {}
        )
        return {}

    def _baked_terms(
        self, base: _Base, checkpoint: Path, checkpoint_sha256: str, first: LabelledStructure
    ) -> LinearTerms:
        tuned = MatGLPotential(
            MatGLPotential.Params(model_path=checkpoint, model_sha256=checkpoint_sha256,
                                  device="cpu", default_dtype="float64")
        )  # fmt: skip
        with torch_threads(self.params.cpu_threads):
            return LinearTerms.collect(tuned, [first], base.numbers(), base.references(), GPA)

    # -- steps -----------------------------------------------------------------------------

    def _base_folder(self) -> Path:
        p = self.params
        folder = (
            check_model_folder(p.model_path)
            if p.model_path is not None
            else (cached_model_folder(p.model))
        )
        if p.model_sha256 is not None:
            actual = folder_sha256(folder)
            if actual != p.model_sha256:
                raise ChecksumError(
                    f"matgl model {folder} has sha256 {actual}, expected {p.model_sha256}"
                )
        return folder

    @staticmethod
    def _load(folder: Path) -> Potential:
        from matgl.apps.pes import Potential
        from matgl.utils.io import load_model

        potential = load_model(folder)  # torch.load(weights_only=True) inside
        if not isinstance(potential, Potential):
            raise ValueError(f"{folder} holds a matgl {type(potential).__name__}, not a Potential")
        if potential.calc_charge or potential.calc_magmom:
            raise ValueError(
                "fine-tuning matgl potentials with charge or magnetic-moment outputs needs those "
                "labels too; pestle's labels have energies, forces and stresses only"
            )
        if potential.element_refs is not None and potential.element_refs.property_offset.ndim > 1:
            raise ValueError("matgl potentials with state-dependent element refs are not supported")
        return potential

    @staticmethod
    def _element_refs(potential: Potential) -> dict[str, float] | None:
        refs = potential.element_refs
        if refs is None:
            return None
        values = refs.property_offset.detach().cpu().numpy().astype(float)
        return {e: float(v) for e, v in zip(potential.model.element_types, values, strict=True)}

    def _refit(self, base: _Base, labelled: Sequence[LabelledStructure]) -> np.ndarray:
        """Shift the element refs by the least-squares fit of label-minus-model energies;
        returns the shift per element in ``element_types`` order (eV/atom)."""
        # The model as saved in its folder, which `base.potential` still is at this point.
        saved = MatGLPotential(
            MatGLPotential.Params(
                model_path=base.folder, model_sha256=folder_sha256(base.folder), device="cpu"
            )
        )
        structures = [ls.atoms for ls in labelled]
        predicted = [pred.energy for pred in saved.predict(structures)]
        residuals = [reference_labels(ls)[0] - e for ls, e in zip(labelled, predicted, strict=True)]
        shift = least_squares_shift(structures, residuals, base.numbers())
        self._shift_refs(base.potential, shift)
        return shift

    @staticmethod
    def _shift_refs(potential: Potential, shift: np.ndarray) -> None:
        """Add ``shift`` (eV/atom, ``element_types`` order) to the Potential's element refs,
        creating them when it has none."""
        import torch
        from matgl.layers import AtomRef

        dtype = potential.data_mean.dtype
        if potential.element_refs is None:
            offsets = torch.tensor(shift, dtype=dtype)
            potential.element_refs = AtomRef(property_offset=offsets)
        else:
            with torch.no_grad():
                potential.element_refs.property_offset += torch.tensor(shift, dtype=dtype)
            offsets = potential.element_refs.property_offset
        # Potential.save writes its constructor arguments: record the refs there too.
        potential._init_args["element_refs"] = offsets.detach().cpu().tolist()

    def _loaders(self, workdir: Path, model: Any, train: _Split, val: _Split) -> tuple:
        import torch
        from matgl.ext.ase import Atoms2Graph
        from matgl.graph.data import MGLDataLoader, MGLDataset

        converter = Atoms2Graph(tuple(model.element_types), float(model.cutoff))
        datasets = []
        for name, split in (("train", train), ("val", val)):
            root = workdir / "graphs" / name
            if root.exists():
                shutil.rmtree(root)
            datasets.append(
                MGLDataset(
                    structures=split.atoms,
                    labels={k: list(v) for k, v in split.labels.items()},
                    converter=converter,
                    root=str(root),
                    save_cache=False,
                )
            )
        return MGLDataLoader(
            train_data=datasets[0],
            val_data=datasets[1],
            batch_size=self.params.batch_size,
            num_workers=0,  # graphs are built already; workers would only add processes
            generator=torch.Generator().manual_seed(self.params.seed),
        )


def scale_energy(potential: Any, scale: float) -> None:
    """Multiply a matgl Potential's energy minus its element refs (and so forces, stress) by
    ``scale``: matgl 4.1's ``Potential.forward`` is E = data_std * model(g) + data_mean
    [+ repuls(g), linear in its buffer ``ke``] + element_refs(g)."""
    import torch

    with torch.no_grad():
        for name in ("data_std", "data_mean"):
            value = getattr(potential, name)
            value.mul_(scale)
            # Potential.save also writes the constructor arguments: keep them in step.
            if name in potential._init_args:
                potential._init_args[name] = (
                    float(value) if value.numel() == 1 else value.detach().cpu().tolist()
                )
        if potential.calc_repuls:
            potential.repuls.ke.mul_(scale)


def _history_callback(potential: Any, mode: str) -> Any:
    """A Lightning callback recording per-epoch losses and learning rates, and keeping a copy
    of the weights of the epoch ``BestEpoch(mode)`` chooses (Lightning's ModelCheckpoint
    writes files; we want the state). Defined here so that importing this module does not
    import Lightning."""
    import lightning as pl

    class History(pl.Callback):
        def __init__(self) -> None:
            self.epochs: list[dict[str, Any]] = []
            self.best = BestEpoch(mode)
            self.initial_state = _snapshot(potential)
            self.best_state: dict[str, Any] = self.initial_state

        def _entry(self, epoch: int) -> dict[str, Any]:
            for entry in self.epochs:
                if entry["epoch"] == epoch:
                    return entry
            self.epochs.append({"epoch": epoch})
            return self.epochs[-1]

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            if trainer.sanity_checking:
                return
            metrics = trainer.callback_metrics
            epoch = int(trainer.current_epoch)
            loss = float(metrics.get("val_Total_Loss", float("nan")))
            entry = self._entry(epoch)
            entry["val_loss"] = loss
            entry["val_mae"] = {
                key: float(metrics[f"val_{key}_MAE"])
                for key in ("Energy", "Force", "Stress")
                if f"val_{key}_MAE" in metrics
            }
            if self.best.offer(epoch, val_loss=loss, val_force_mae=entry["val_mae"].get("Force")):
                self.best_state = _snapshot(potential)

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
            self._entry(int(trainer.current_epoch))["learning_rate"] = lr

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            loss = trainer.callback_metrics.get("train_Total_Loss")
            self._entry(int(trainer.current_epoch))["train_loss"] = (
                float(loss) if loss is not None else None
            )

    return History()


def _snapshot(module: Any) -> dict[str, Any]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
