"""Fine-tune CHGNet on pestle's labels with chgnet's own ``chgnet.trainer.Trainer``.

Unit conventions (checked against chgnet 0.4's model, dataset and trainer):

* energy: CHGNet's pretrained models are intensive, so labels become eV/atom;
* forces: eV/A, as in ASE;
* stress: the model outputs GPa with ASE's sign (positive = tensile; its ASE calculator only
  multiplies by ``ase.units.GPa``). ``chgnet.data.StructureData`` expects VASP kBar and
  multiplies by -0.1 to reach that convention; we build targets directly in the model's
  convention (ASE Voigt eV/A^3 -> 3x3 -> divide by ``units.GPa``) so no sign juggling occurs.

Energies from another DFT code (GPAW PBE) sit on a different absolute scale than the Materials
Project VASP energies CHGNet learnt. With ``refit_element_refs`` we first shift CHGNet's
per-element reference energies (its ``AtomRef`` composition model) by a least-squares fit of
the label-minus-model residuals, using chgnet's ``AtomRef.fit``; the graph network then only
has to learn the interaction part. Elements absent from the labels keep their references.

Three modes (``Params.mode``):

* ``custom``: the loss weights, learning rate, epochs and frozen layers given in ``Params``;
* ``full``: the full fine-tune of Deng et al., npj Comput. Mater. 11:9 (2025), "Systematic
  softening in universal machine learning interatomic potentials": every parameter trainable,
  energy/force/stress loss weights 0.1/100/0.1, MSE, Adam at 1e-3 cosine-decayed to 1e-5 over
  the run (100 epochs unless ``epochs`` is given), the epoch with the lowest validation force
  MAE kept;
* ``linear_correction``: the same paper's one-parameter correction: a single scale ``s`` on the
  network's energy (everything but the AtomRef composition model), so forces and stress scale
  by ``s`` too, all else frozen. Solved in closed form (``pestle.trainers.linear``) and baked
  into the readout's last linear layer, so the checkpoint is an ordinary CHGNet.

What every family does alike (checks, mode dispatch, metrics, checkpoint and sha256) is
``pestle.trainers.base.TrainerBase``; this module supplies CHGNet's hooks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from ase import units
from ase.data import chemical_symbols
from ase.stress import voigt_6_to_full_3x3_stress
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from pestle.plugins import renamed_fields
from pestle.potentials.chgnet import (
    TENSOR_TO_SCALAR_WARNING,
    check_pretrained_name,
    load_chgnet,
    load_scaled_chgnet,
    pack_by_atom_count,
    save_checkpoint,
    save_scaled_checkpoint,
)
from pestle.structures import chemical_system
from pestle.trainers import TRAINERS, LabelledStructure, reference_results
from pestle.trainers.base import BestEpoch, FineTuned, TrainerBase
from pestle.trainers.linear import LinearTerms, ScaleFit, ScaleTerms, joined_arrays
from pestle.trainers.modes import (
    PAPER_FINAL_LEARNING_RATE,
    PAPER_FULL,
    PAPER_LOSS_WEIGHTS,
    Mode,
    apply_mode,
)
from pestle.trainers.replay import (
    PressureCorrection,
    pressure_corrections,
    replay_structures,
    unreplayable_elements,
)

if TYPE_CHECKING:
    from ase import Atoms
    from chgnet.model.model import CHGNet

log = logging.getLogger("pestle.trainers.chgnet")

CHECKPOINT_NAME = "chgnet_finetuned.pth.tar"
SCALED_CHECKPOINT_NAME = "chgnet_scaled.pth.tar"
MAE_UNITS = {"e": "eV/atom", "f": "eV/A", "s": "GPa"}

# Deng et al. (2025)'s full fine-tune trains every parameter.
FULL: dict[str, Any] = {**PAPER_FULL, "freeze": "none"}
# Fields a closed-form linear correction has no use for.
_UNUSED_BY_LINEAR = ("epochs", "learning_rate", "batch_size", "freeze", "replay_weight",
                     "replay_per_structure", "replay_volume_strain", "replay_stress",
                     "replay_pressure_from_labels",
                     "l2sp", "select_epoch", "patience", "relative_loss_above",
                     "stress_below_force")  # fmt: skip
_LINEAR_ONLY = ("linear_scope", "linear_ridge")

# The input featurisation: atom/bond/angle embeddings and their basis expansions.
_EMBEDDINGS = (
    "atom_embedding",
    "bond_embedding",
    "angle_embedding",
    "bond_basis_expansion",
    "angle_basis_expansion",
)


def _freeze(model: CHGNet, what: str) -> None:
    """Freeze layers the way chgnet's fine-tuning notebook does.

    ``embeddings`` freezes the input featurisation only. ``all_but_readout`` is the
    notebook's full list: the embeddings plus every message-passing layer except the last
    atom convolution, leaving that layer and the readout MLP to adapt.
    """
    if what == "none":
        return
    modules = [getattr(model, name) for name in _EMBEDDINGS]
    if what == "all_but_readout":
        modules += [model.atom_conv_layers[:-1], model.bond_conv_layers, model.angle_layers]
    for module in modules:
        for param in module.parameters():
            param.requires_grad = False


class _GraphDataset:
    """Graphs converted once, with targets already in the model's units.

    chgnet's ``StructureData`` replaces a structure it cannot convert with a random other one;
    converting up front lets us name the bad structure instead.
    """

    def __init__(self, graphs: list, targets: list[dict]) -> None:
        self.graphs = graphs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int) -> tuple[Any, dict]:
        return self.graphs[index], self.targets[index]

    def joined(self, other: _GraphDataset) -> _GraphDataset:
        return _GraphDataset(self.graphs + other.graphs, self.targets + other.targets)


def label_weight(forces: np.ndarray, relative_above: float | None) -> float:
    """A label's loss weight: 1, or ``(relative_above / RMS force)^2`` when its RMS reference
    force exceeds ``relative_above`` (eV/Å), which makes its squared errors relative."""
    if relative_above is None:
        return 1.0
    rms = float(np.sqrt(np.mean(np.square(forces)))) if np.size(forces) else 0.0
    return 1.0 if rms <= relative_above else (relative_above / rms) ** 2


def _collate(batch: list[tuple[Any, dict]]) -> tuple[list, dict]:
    """The batch layout chgnet's Trainer consumes: a list of graphs, energies stacked,
    forces and stresses as per-structure lists; plus each structure's loss weight ``w`` and
    index ``k`` in its data set, which only our criterion reads. (Not
    chgnet.data.dataset.collate_graphs: importing that module runs
    ``warnings.filterwarnings("ignore")`` for the whole process.)"""
    import torch

    graphs = [graph for graph, _ in batch]
    targets = {
        "e": torch.stack([t["e"] for _, t in batch]),
        "f": [t["f"] for _, t in batch],
        "s": [t["s"] for _, t in batch],
        "w": torch.stack([t["w"] for _, t in batch]),
        "k": torch.stack([t["k"] for _, t in batch]),
    }
    return graphs, targets


class _Criterion:
    """Stands in for the chgnet Trainer's criterion: records the loss per epoch (the Trainer
    itself only reports MAEs) and each validation structure's force errors (for per-system
    epoch selection); in training, with ``weighted``, replaces the loss by the same MSE loss
    with per-structure weights (replayed structures), and adds the L2-SP penalty
    ``l2sp * sum((w - w0)^2)`` over ``anchors``. chgnet's own criterion still gives the
    MAEs it records."""

    def __init__(
        self,
        criterion: Any,
        model: CHGNet,
        *,
        weighted: bool = False,
        l2sp: float = 0.0,
        anchors: list[tuple[Any, Any]] | None = None,
    ) -> None:
        self.criterion = criterion
        self.model = model
        self.weighted = weighted
        self.l2sp = l2sp
        self.anchors = anchors or []
        self.reset()

    def reset(self) -> None:
        self.sums = {"train": 0.0, "val": 0.0}
        self.counts = {"train": 0, "val": 0}
        self.penalty = 0.0
        self.steps = 0
        self.force_errors: dict[int, tuple[float, int]] = {}

    def __call__(self, targets: dict, prediction: dict) -> dict:
        import torch

        out = self.criterion(targets, prediction)
        phase = "train" if self.model.training else "val"
        # chgnet's MSE over a batch whose stresses are all missing (NaN) is NaN; ours skips
        # the term (a diverged prediction stays NaN in ours too).
        if (phase == "train" and self.weighted) or not bool(torch.isfinite(out["loss"])):
            out["loss"] = self._weighted_loss(targets, prediction)
        if phase == "train":
            if self.l2sp > 0 and self.anchors:
                penalty = self.l2sp * sum(
                    ((w - w0.to(w.device)) ** 2).sum() for w, w0 in self.anchors
                )
                out["loss"] = out["loss"] + penalty
                self.penalty += float(penalty.detach())
                self.steps += 1
        else:
            for k, f_pred, f_ref in zip(targets["k"], prediction["f"], targets["f"], strict=True):
                error = (f_pred.detach() - f_ref).abs()
                self.force_errors[int(k)] = (float(error.sum()), int(error.numel()))
        n = int(targets["e"].shape[0])
        self.sums[phase] += float(out["loss"].detach()) * n
        self.counts[phase] += n
        return out

    def _weighted_loss(self, targets: dict, prediction: dict) -> Any:
        """chgnet's combined MSE loss with each structure's terms weighted by ``w`` (a force
        or stress component carries its structure's weight); the same as chgnet's when every
        weight is 1."""
        import torch

        c = self.criterion
        w = targets["w"].to(prediction["e"].dtype)
        loss = c.energy_loss_ratio * torch.mean(w * (prediction["e"] - targets["e"]) ** 2)
        if "f" in prediction:
            f_pred, f_ref = torch.cat(prediction["f"]), torch.cat(targets["f"])
            wf = torch.cat([w[j].expand(f.shape[0], 3) for j, f in enumerate(targets["f"])])
            loss = loss + c.force_loss_ratio * torch.mean(wf * (f_pred - f_ref) ** 2)
        if "s" in prediction and c.stress_loss_ratio:
            s_pred, s_ref = torch.cat(prediction["s"]), torch.cat(targets["s"])
            ws = torch.cat([w[j].expand(s.shape) for j, s in enumerate(targets["s"])])
            valid = ~torch.isnan(s_ref)
            if valid.any():
                loss = loss + c.stress_loss_ratio * torch.mean(
                    ws[valid] * (s_pred[valid] - s_ref[valid]) ** 2
                )
        return loss

    def mean(self, phase: str) -> float:
        return self.sums[phase] / self.counts[phase] if self.counts[phase] else math.nan

    def system_force_maes(self, systems: Sequence[str]) -> dict[str, float]:
        """This epoch's validation force MAE per chemical system (``systems``: per
        validation structure, by index)."""
        return _pooled_by_system(self.force_errors, systems)


def _pooled_by_system(
    errors: dict[int, tuple[float, int]], systems: Sequence[str]
) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for k, (total, count) in errors.items():
        entry = sums.setdefault(systems[k], [0.0, 0])
        entry[0] += total
        entry[1] += count
    return {system: total / count for system, (total, count) in sorted(sums.items()) if count}


@TRAINERS.register("chgnet")
class CHGNetTrainer(TrainerBase["CHGNet"]):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        # One spelling across trainers (and potentials): model, model_path,
        # refit_element_refs; the old names are still read, with a warning.
        model: str = Field(
            "0.3.0",
            validation_alias=AliasChoices("model", "base_model"),
            description="the pretrained CHGNet to start from (shipped in chgnet's wheel); "
            "formerly base_model",
        )
        model_path: Path | None = Field(
            None,
            validation_alias=AliasChoices("model_path", "base_checkpoint"),
            description="a CHGNet checkpoint file to start from instead; formerly base_checkpoint",
        )
        epochs: int = Field(5, ge=1, description="passes over the training labels")
        learning_rate: float = Field(1e-3, gt=0, description="Adam's learning rate")
        batch_size: int = Field(2, ge=1, description="structures per optimiser step")
        energy_weight: float = Field(
            1.0, ge=0, description="weight of the energy per atom in the loss"
        )
        force_weight: float = Field(1.0, ge=0, description="weight of the forces in the loss")
        stress_weight: float = Field(0.1, ge=0, description="weight of the stress in the loss")
        freeze: Literal["none", "embeddings", "all_but_readout"] = Field(
            "embeddings",
            description="layers kept fixed: none; the input embeddings; or all but the last "
            "atom convolution and the readout",
        )
        refit_element_refs: bool = Field(
            True,
            validation_alias=AliasChoices("refit_element_refs", "refit_atom_ref"),
            description="refit the per-element reference energies to the labels first (a "
            "new level of theory); false keeps the base model's; formerly refit_atom_ref",
        )
        seed: int = Field(
            0, description="random seed of the fine-tune (shuffling, initial weights)"
        )
        # custom: the fields above as given. full / linear_correction: Deng et al. (2025)'s
        # recipes, which fill in the fields they fix (see FULL, modes.PAPER_LOSS_WEIGHTS).
        mode: Mode = Field(
            default="custom",
            description="custom: the fields as given; full: Deng et al. (2025)'s full fine-tune "
            "(fixes loss weights and learning rate, 100 epochs unless given); "
            "linear_correction: their one energy scale, fitted in closed form",
        )

        linear_scope: Literal["model", "system", "element"] = Field(
            "model",
            description="linear_correction: one scale for the whole model (the paper's; "
            "refused when the systems' own scales disagree beyond their intervals), one per "
            "chemical system, or one per element (then the checkpoint is a chgnet_scaled: no "
            "CHGNet layer can hold them)",
        )
        linear_ridge: float = Field(
            1e-3,
            ge=0,
            description="linear_correction: pull towards 1 of scales the labels barely "
            "determine, relative to each scale's own curvature of the loss",
        )
        # custom / full, against drift where the labels say nothing:
        replay_weight: float = Field(
            0.0,
            ge=0,
            description="loss weight of each replayed structure (near-equilibrium seeds and "
            "element crystals labelled by the model itself) relative to a label; 0: none",
        )
        replay_per_structure: int = Field(
            2, ge=1, description="replayed copies of each seed and element crystal"
        )
        replay_volume_strain: float = Field(
            0.03,
            gt=0,
            le=0.25,
            description="the replayed copies' volumes are spread evenly over 1 ± this times "
            "the seed's; with replay_pressure_from_labels, spanning the strained labels' "
            "range pins the whole isotropic P(V) there, not only its slope at the seed",
        )
        replay_stress: bool = Field(
            True,
            description="train on the replayed structures' stresses too; false leaves the "
            "volume dependence (pressure, so the bulk modulus) to the labels' stresses, "
            "where the pretrained model's would pull it back to its own",
        )
        replay_pressure_from_labels: bool = Field(
            False,
            description="shift each seed's replayed stresses by the pretrained model's "
            "pressure error on the seed's strained training labels (a line in volumetric "
            "strain, fitted when labels lie on both sides of the seed's volume), so replay "
            "does not hold a bulk modulus or equilibrium volume the labels contradict",
        )
        relative_loss_above: float | None = Field(
            None,
            gt=0,
            description="a label whose RMS reference force (eV/Å) exceeds this has its loss "
            "terms weighted (this / RMS)^2, so its relative error counts as a near-equilibrium "
            "label's does (softening is a relative error; unweighted, the largest rattles "
            "outweigh the strained cells that carry the bulk modulus); none: every label 1",
        )
        stress_below_force: float | None = Field(
            None,
            gt=0,
            description="a label whose largest reference force component (eV/Å) exceeds "
            "this trains energy and forces, not stress: a heavily rattled cell's pressure "
            "(up to 110 GPa here) is its atoms' repulsion, which its forces carry, and squared "
            "it outweighs the few GPa of the strained cells that carry the bulk modulus; "
            "none: every label's stress trains",
        )
        l2sp: float = Field(
            0.0,
            ge=0,
            description="L2-SP: coefficient of sum((w - w_pretrained)^2) over the trained "
            "network weights (element references excluded), in the loss's units",
        )
        select_epoch: Literal["auto", "val_force_mae", "val_loss", "worst_system", "last"] = Field(
            "auto",
            description="the epoch kept: auto, the mode's (full: validation force MAE, custom: "
            "loss); worst_system, the epoch whose worst chemical system has the lowest force "
            "MAE relative to the base model on the validation set (the base kept if none is "
            "better everywhere); last, the last epoch",
        )
        patience: int | None = Field(
            None, ge=1, description="stop after this many epochs without a better kept epoch"
        )

        _known_model = field_validator("model")(check_pretrained_name)
        _old_names = renamed_fields("trainer chgnet")

        @model_validator(mode="after")
        def _apply_mode(self) -> CHGNetTrainer.Params:
            apply_mode(self, full=FULL, linear=PAPER_LOSS_WEIGHTS,
                       unused_by_linear=_UNUSED_BY_LINEAR)  # fmt: skip
            if self.mode != "linear_correction":
                given = [
                    name
                    for name in _LINEAR_ONLY
                    if name in self.model_fields_set
                    and getattr(self, name) != type(self).model_fields[name].default
                ]
                if given:
                    raise ValueError(f"{', '.join(given)} apply to mode linear_correction only")
            if self.replay_pressure_from_labels and not (self.replay_weight > 0
                                                         and self.replay_stress):  # fmt: skip
                raise ValueError("replay_pressure_from_labels shifts the replayed stresses: it "
                                 "needs replay_weight > 0 and replay_stress true")  # fmt: skip
            return self

    family = "CHGNet"
    potential_name = "chgnet"
    baked_into = "CHGNet readout"
    baked_rtol = 1e-3  # a float32 model

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.model: CHGNet | None = None  # the fine-tuned model after train(), on the CPU

    @property
    def refit_references(self) -> bool:
        return self.params.refit_element_refs

    def _load_base(
        self,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
    ) -> CHGNet:
        p = self.params
        _seed_everything(p.seed)  # before the model is built: its construction draws weights
        return load_chgnet(p.model, p.model_path, device="cpu")

    def _potential_params(self, model: CHGNet) -> dict[str, Any]:
        return {"model": self.params.model}

    def _save(
        self,
        model: CHGNet,
        workdir: Path,
        *,
        best_epoch: int | None = None,
        linear_scale: float | None = None,
    ) -> Path:
        """Keep ``model`` and write its checkpoint."""
        p = self.params
        self.model = model
        if linear_scale is not None:
            outcome: dict[str, Any] = {"linear_scale": linear_scale}
        else:
            outcome = {"best_epoch": best_epoch}
        return save_checkpoint(
            model,
            workdir / CHECKPOINT_NAME,
            {
                "trainer": "chgnet",
                "hyperparameters": p.model_dump(mode="json"),
                "mode": p.mode,
                **outcome,
            },
        )

    # -- custom / full: chgnet's Trainer ---------------------------------------------------

    def _train(
        self,
        model: CHGNet,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        device: str,
    ) -> FineTuned:
        import torch
        from chgnet.trainer import Trainer
        from torch.utils.data import DataLoader

        p = self.params
        atom_ref_shift = self._refit_atom_ref(model, train_set) if p.refit_element_refs else {}
        _freeze(model, p.freeze)

        has_stress = any(reference_results(ls)[2] is not None for ls in train_set)
        targets = "efs" if has_stress and p.stress_weight > 0 else "ef"
        label_data = self._dataset(model, train_set, relative_above=p.relative_loss_above,
                                   stress_below_force=p.stress_below_force)  # fmt: skip
        # Replay labels come from the model as it is now (references refitted, nothing
        # trained yet), so replayed and new energies share one zero.
        replay, replay_info = self._replay(model, train_set) if p.replay_weight > 0 else (None, {})
        train_data = label_data if replay is None else label_data.joined(replay)
        val_data = self._dataset(model, val_set) if val_set else label_data
        val_systems = [chemical_system(ls.atoms) for ls in (val_set or train_set)]

        # A seeded generator makes the shuffling order a function of the seed alone.
        generator = torch.Generator().manual_seed(p.seed)
        train_loader = DataLoader(
            train_data,
            batch_size=p.batch_size,
            shuffle=True,
            collate_fn=_collate,
            generator=generator,
        )
        val_loader = DataLoader(
            val_data, batch_size=p.batch_size, shuffle=False, collate_fn=_collate
        )

        full = p.mode == "full"
        extra: dict[str, Any] = {}
        if full:
            # chgnet's CosLR decays to decay_fraction * learning_rate.
            extra["scheduler_params"] = {
                "decay_fraction": PAPER_FINAL_LEARNING_RATE / p.learning_rate
            }
        trainer = Trainer(
            model=model,
            targets=targets,
            energy_loss_ratio=p.energy_weight,
            force_loss_ratio=p.force_weight,
            stress_loss_ratio=p.stress_weight,
            optimizer="Adam",
            scheduler="CosLR",
            criterion="MSE",
            epochs=p.epochs,
            learning_rate=p.learning_rate,
            print_freq=10**9,  # one line per epoch is enough in a worker's log
            torch_seed=p.seed,
            data_seed=p.seed,
            use_device=device,
            **extra,
        )
        schedule: dict[str, Any] = {"optimizer": "Adam", "criterion": "MSE", "scheduler": "CosLR"}
        if full:
            # chgnet's CosLR has T_max = 10 * epochs and steps min(10, batches) times per
            # epoch, so on fewer than 10 batches per epoch (the paper's single structure is
            # one) it would end far above 1e-5. Stretch the cosine over the steps that will
            # really be taken, so the last one reaches the final learning rate.
            steps = _scheduler_steps_per_epoch(len(train_loader)) * p.epochs
            trainer.scheduler.T_max = steps
            schedule |= {
                "learning_rate_start": p.learning_rate,
                "learning_rate_end": PAPER_FINAL_LEARNING_RATE,
                "scheduler_steps": steps,
            }
        # L2-SP anchors: the trainable network weights as they start (the element
        # references are refitted and free to move: they absorb another code's zero).
        anchors = [
            (w, w.detach().clone())
            for name, w in model.named_parameters()
            if w.requires_grad and not name.startswith("composition_model")
        ] if p.l2sp > 0 else []  # fmt: skip
        weighted = replay is not None or p.relative_loss_above is not None
        meter = _Criterion(trainer.criterion, model, weighted=weighted, l2sp=p.l2sp,
                           anchors=anchors)  # fmt: skip
        trainer.criterion = meter

        def snapshot() -> dict[str, Any]:
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        best = BestEpoch(p.mode, p.select_epoch)
        # The base model's validation force errors per system: what worst_system compares
        # each epoch with (and reported for every selection).
        base_by_system = _pooled_by_system(_force_errors(model, val_data), val_systems)
        epochs: list[dict[str, Any]] = []
        # If no epoch qualifies we keep the (refit) base model, never weights a NaN step
        # may have touched.
        best_state = start_state = snapshot()
        stopped = None
        for epoch in range(p.epochs):
            # One epoch per call so we can keep a copy of the best weights (chgnet's own
            # "best" is a reference to the live model).
            # save_dir="" skips chgnet's per-epoch checkpoint files: we write our own.
            trainer.starting_epoch, trainer.epochs = epoch, epoch + 1
            meter.reset()
            done_before = len(trainer.training_history["e"]["train"])
            # chgnet's Trainer prints per-step lines; they go to a log beside the checkpoint.
            with (
                open(workdir / "chgnet-train.log", "a") as log_file,
                contextlib.redirect_stdout(log_file),
                warnings.catch_warnings(),
            ):
                warnings.filterwarnings("ignore", message=TENSOR_TO_SCALAR_WARNING)
                # full: every parameter trains, the (refit) AtomRef included.
                trainer.train(train_loader, val_loader, save_dir="", train_composition_model=full)
            train_loss, val_loss = meter.mean("train"), meter.mean("val")
            if len(trainer.training_history["e"]["train"]) == done_before or not (
                math.isfinite(train_loss) and math.isfinite(val_loss)
            ):
                stopped = f"non-finite loss in epoch {epoch}"
                log.warning("CHGNet fine-tuning stopped: %s", stopped)
                break
            history = trainer.training_history
            by_system = meter.system_force_maes(val_systems)
            ratios = {
                system: mae / base_by_system[system]
                for system, mae in by_system.items()
                if base_by_system.get(system, 0) > 0
            }
            epochs.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "train_mae": {k: float(history[k]["train"][-1]) for k in targets},
                    "val_mae": {k: float(history[k]["val"][-1]) for k in targets},
                    "val_force_mae_by_system": by_system,
                    "worst_system_ratio": max(ratios.values()) if ratios else None,
                    "learning_rate": float(trainer.optimizer.param_groups[0]["lr"]),
                    **({"l2sp_penalty": meter.penalty / max(meter.steps, 1)} if anchors else {}),
                }
            )
            if best.offer(epoch, val_loss=val_loss, val_force_mae=epochs[-1]["val_mae"]["f"],
                          worst_system_ratio=epochs[-1]["worst_system_ratio"]):  # fmt: skip
                best_state = snapshot()
            if p.patience is not None and best.waited(epoch) >= p.patience:
                stopped = f"no better epoch in {p.patience} (patience) after epoch {epoch}"
                break

        trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
        model.to("cpu")
        model.load_state_dict(best_state)
        model.eval()
        kept = epochs[best.epoch] if best.epoch is not None else None
        # How far the kept network weights moved (the element references left out).
        moved = sum(
            float(((best_state[k].float() - v.float()) ** 2).sum())
            for k, v in start_state.items()
            if v.is_floating_point() and not k.startswith("composition_model")
        )
        return FineTuned(
            epochs=epochs,
            best_epoch=best.epoch if best.epoch is not None else -1,  # -1: none (the base)
            best_val_loss=kept["val_loss"] if kept else None,
            selection=best.criterion if kept else f"base model (no epoch: {best.criterion})",
            metrics={
                "best_val_force_mae": kept["val_mae"]["f"] if kept else None,
                "base_val_force_mae_by_system": base_by_system,
                "stopped": stopped,
                "targets": targets,
                "mae_units": {k: MAE_UNITS[k] for k in targets},
                "atom_ref_shift_eV_per_atom": atom_ref_shift,
                "trainable_parameters": trainable,
                "optimisation": schedule,
                "replay": replay_info,
                "label_stresses": {
                    "below_force": p.stress_below_force,
                    "trained": sum(not bool(torch.isnan(t["s"]).all()) for t in label_data.targets),
                    "labels": len(label_data.targets),
                },
                "label_weights": {
                    "relative_loss_above": p.relative_loss_above,
                    "min": min(float(t["w"]) for t in label_data.targets),
                    "mean": float(np.mean([float(t["w"]) for t in label_data.targets])),
                },
                "l2sp": p.l2sp,
                "weight_distance_sq": moved,
                "select_epoch": best.by,
            },
        )

    def _replay(
        self, model: CHGNet, train_set: Sequence[LabelledStructure]
    ) -> tuple[_GraphDataset, dict[str, Any]]:
        """Near-equilibrium structures of the seeds and of the labels' elements, labelled by
        ``model`` (energies per atom, forces, stresses in its units), weighted
        ``replay_weight`` each; with ``replay_pressure_from_labels``, each seed's replayed
        stresses shifted by the pressure error its strained labels measure."""
        import torch

        p = self.params
        elements = sorted({s for ls in train_set for s in ls.atoms.get_chemical_symbols()})
        structures = replay_structures(self.seeds, elements, per_structure=p.replay_per_structure,
                                       volume_strain=p.replay_volume_strain,
                                       rng_seed=p.seed)  # fmt: skip
        if not self.seeds:
            log.warning("replay without seeds: only the elements' crystals are replayed")
        graphs, outputs = _predict(model, structures, "replay")
        corrections: dict[str, PressureCorrection] = {}
        if p.replay_stress and p.replay_pressure_from_labels:

            def pressures(cells: list[Atoms]) -> list[float]:
                return [-float(np.trace(o["s"])) / 3 for o in _predict(model, cells, "label")[1]]

            corrections = pressure_corrections(self.seeds, train_set, pressures)
        targets = []
        for atoms, o in zip(structures, outputs, strict=True):
            stress = np.full((3, 3), np.nan)  # NaN: a stress the loss skips
            if p.replay_stress:
                correction = corrections.get(atoms.info["replay_origin"])
                shift = 0.0 if correction is None else correction.at(
                    atoms.info["replay_volume_factor"] - 1)  # fmt: skip
                # More pressure is a more negative stress (ASE's sign, GPa).
                stress = np.asarray(o["s"]) - shift * np.eye(3)
            targets.append({
                "e": torch.tensor(float(o["e"]), dtype=torch.float32),
                "f": torch.tensor(np.asarray(o["f"]), dtype=torch.float32),
                "s": torch.tensor(stress, dtype=torch.float32),
                "w": torch.tensor(p.replay_weight, dtype=torch.float32),
            })  # fmt: skip
        for k, t in enumerate(targets):
            t["k"] = torch.tensor(k)
        info = {
            "n_structures": len(structures),
            "weight": p.replay_weight,
            "stress": p.replay_stress,
            "from_seeds": len(self.seeds),
            "origins": sorted({a.info["replay_origin"] for a in structures}),
            "elements_without_crystal": unreplayable_elements(elements),
        }
        if corrections:
            info["pressure_from_labels"] = [c.as_dict() for c in corrections.values()]
        return _GraphDataset(graphs, targets), info

    # -- linear_correction -----------------------------------------------------------------

    def _linear_terms(
        self,
        model: CHGNet,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
    ) -> tuple[LinearTerms, LinearTerms | None]:
        model.eval()
        model.requires_grad_(False)
        train = graph_linear_terms(model, self._dataset(model, train_set))
        val = graph_linear_terms(model, self._dataset(model, val_set)) if val_set else None
        return train, val

    def _bake(
        self,
        model: CHGNet,
        scale: float,
        shift: np.ndarray | None,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
    ) -> dict[str, Any]:
        """The AtomRef shift into the composition model, the scale into the readout."""
        import torch

        atom_ref_shift: dict[str, float] = {}
        if shift is not None:
            with torch.no_grad():
                model.composition_model.fc.weight += torch.as_tensor(
                    shift, dtype=model.composition_model.fc.weight.dtype
                ).view(1, -1)
            numbers = sorted({int(z) for ls in train_set for z in ls.atoms.numbers})
            atom_ref_shift = {chemical_symbols[z]: float(shift[z - 1]) for z in numbers}
        scale_readout(model, scale)
        return {
            "linear_scale": scale,
            "stopped": None,
            "mae_units": {k: MAE_UNITS[k] for k in "efs"},
            "atom_ref_shift_eV_per_atom": atom_ref_shift,
        }

    def _baked_terms(
        self, model: CHGNet, checkpoint: Path, checkpoint_sha256: str, first: LabelledStructure
    ) -> LinearTerms:
        # The model in memory is the one just saved (save_checkpoint leaves it as it is).
        return graph_linear_terms(model, self._dataset(model, [first]))

    def _scale_terms(
        self,
        model: CHGNet,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        scope: str,
        train: LinearTerms,
        val: LinearTerms | None,
    ) -> tuple[ScaleTerms, ScaleTerms | None]:
        """Per system from the totals (the base's); per element from CHGNet's site
        energies: each element's share of the network energy and its exact derivatives."""
        if scope != "element":
            return super()._scale_terms(model, train_set, val_set, scope, train, val)
        numbers = sorted({int(z) for ls in train_set for z in ls.atoms.numbers})
        groups = [chemical_symbols[z] for z in numbers]

        def split(labelled: Sequence[LabelledStructure], terms: LinearTerms) -> ScaleTerms:
            present = sorted({int(z) for ls in labelled for z in ls.atoms.numbers})
            every = sorted(set(present) | set(numbers))
            e_by, f_by, s_by = graph_element_parts(model, self._dataset(model, labelled), every)
            fitted = [every.index(z) for z in numbers]
            rest = [every.index(z) for z in every if z not in numbers]
            return ScaleTerms(
                terms, groups, e_by[:, fitted], f_by[:, fitted], s_by[:, fitted],
                [chemical_system(ls.atoms) for ls in labelled],
                e_by[:, rest].sum(axis=1), f_by[:, rest].sum(axis=1), s_by[:, rest].sum(axis=1),
            )  # fmt: skip

        return split(train_set, train), split(val_set, val) if val is not None else None

    def _save_scaled(
        self,
        model: CHGNet,
        workdir: Path,
        fit: ScaleFit,
        train_set: Sequence[LabelledStructure],
    ) -> tuple[Path, str, dict[str, Any]]:
        """The AtomRef shift into the composition model, the model saved with the scales
        beside it (a chgnet_scaled checkpoint)."""
        import torch

        atom_ref_shift: dict[str, float] = {}
        if fit.shift is not None:
            with torch.no_grad():
                model.composition_model.fc.weight += torch.as_tensor(
                    fit.shift, dtype=model.composition_model.fc.weight.dtype
                ).view(1, -1)
            numbers = sorted({int(z) for ls in train_set for z in ls.atoms.numbers})
            atom_ref_shift = {chemical_symbols[z]: float(fit.shift[z - 1]) for z in numbers}
        scales = {g: float(v) for g, v in zip(fit.groups, fit.scales, strict=True)}
        self.model = model
        path = save_scaled_checkpoint(
            model,
            workdir / SCALED_CHECKPOINT_NAME,
            fit.scope,
            scales,
            {"trainer": "chgnet", "hyperparameters": self.params.model_dump(mode="json"),
             "mode": self.params.mode, "linear_scales": fit.as_dict()},
        )  # fmt: skip
        return (
            path,
            "chgnet_scaled",
            {
                "stopped": None,
                "mae_units": {k: MAE_UNITS[k] for k in "efs"},
                "atom_ref_shift_eV_per_atom": atom_ref_shift,
            },
        )

    def _scaled_terms(
        self, checkpoint: Path, checkpoint_sha256: str, first: LabelledStructure
    ) -> LinearTerms:
        scaled = load_scaled_chgnet(checkpoint, checkpoint_sha256)
        scaled.eval()
        scaled.requires_grad_(False)
        return graph_linear_terms(scaled, self._dataset(scaled, [first]))

    # -- data ------------------------------------------------------------------------------

    def _dataset(
        self,
        model: CHGNet,
        labelled: Sequence[LabelledStructure],
        relative_above: float | None = None,
        stress_below_force: float | None = None,
    ) -> _GraphDataset:
        """Graphs and targets; ``relative_above``: weights from ``label_weight``;
        ``stress_below_force``: labels with a larger force component train no stress."""
        import torch
        from pymatgen.io.ase import AseAtomsAdaptor

        graphs, targets = [], []
        for ls in labelled:
            energy, forces, stress = reference_results(ls)
            n_atoms = len(ls.atoms)
            try:
                graph = model.graph_converter(
                    AseAtomsAdaptor.get_structure(ls.atoms.copy()),
                    graph_id=ls.label_id,
                    mp_id=ls.structure_id,
                )
            except Exception as exc:
                raise ValueError(
                    f"CHGNet cannot build a graph for structure {ls.structure_id}: {exc}"
                ) from exc
            # NaN marks a missing stress; chgnet's loss skips NaN labels.
            if stress_below_force is not None and np.abs(forces).max() > stress_below_force:
                stress = None
            stress_gpa = (
                voigt_6_to_full_3x3_stress(stress) / units.GPa
                if stress is not None
                else np.full((3, 3), np.nan)
            )
            graphs.append(graph)
            targets.append(
                {
                    "e": torch.tensor(
                        energy / n_atoms if model.is_intensive else energy, dtype=torch.float32
                    ),
                    "f": torch.tensor(forces, dtype=torch.float32),
                    "s": torch.tensor(stress_gpa, dtype=torch.float32),
                    "w": torch.tensor(label_weight(forces, relative_above), dtype=torch.float32),
                    "k": torch.tensor(len(targets)),
                }
            )
        return _GraphDataset(graphs, targets)

    def _refit_atom_ref(
        self, model: CHGNet, labelled: Sequence[LabelledStructure]
    ) -> dict[str, float]:
        """Shift CHGNet's per-element reference energies by a linear fit of the residual
        (label - model) energies; returns the shift per element present (eV/atom)."""
        import torch
        from chgnet.model.composition_model import AtomRef
        from pymatgen.io.ase import AseAtomsAdaptor

        if model.composition_model is None:
            raise ValueError("this CHGNet has no composition model to refit")
        structures = [AseAtomsAdaptor.get_structure(ls.atoms.copy()) for ls in labelled]
        predicted: list[float] = []
        sizes = [len(s) for s in structures]
        for batch in pack_by_atom_count(sizes, 128):  # bound memory by atoms, as predicting
            with torch.no_grad():  # energies need no autograd
                out = model.predict_structure(
                    [structures[i] for i in batch], task="e", batch_size=len(batch)
                )
            out = [out] if isinstance(out, dict) else out
            predicted += [float(o["e"]) for o in out]
        scale = [len(s) if model.is_intensive else 1 for s in structures]
        residual = [
            reference_results(ls)[0] / k - e
            for ls, k, e in zip(labelled, scale, predicted, strict=True)
        ]
        fit = AtomRef(is_intensive=model.composition_model.is_intensive)
        fit.fit(structures, residual)
        shift = fit.fc.weight.detach().to(model.composition_model.fc.weight.dtype)
        with torch.no_grad():
            model.composition_model.fc.weight += shift
        numbers = sorted({int(z) for ls in labelled for z in ls.atoms.numbers})
        return {chemical_symbols[z]: float(shift[0, z - 1]) for z in numbers}


def _predict(model: CHGNet, structures: Sequence[Atoms], prefix: str) -> tuple[list, list[dict]]:
    """``model``'s graphs of ``structures`` and its energy (per atom), forces and stress
    (GPa, ASE's sign) of each, in batches bounded by atoms."""
    from pymatgen.io.ase import AseAtomsAdaptor

    graphs = [
        model.graph_converter(AseAtomsAdaptor.get_structure(atoms), graph_id=f"{prefix}-{i}")
        for i, atoms in enumerate(structures)
    ]
    outputs: list[dict] = []
    for batch in pack_by_atom_count([len(a) for a in structures], 128):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TENSOR_TO_SCALAR_WARNING)
            out = model.predict_graph([graphs[i] for i in batch], task="efs",
                                      batch_size=len(batch))  # fmt: skip
        outputs += [out] if isinstance(out, dict) else out  # batches are consecutive
    return graphs, outputs


def _scheduler_steps_per_epoch(n_batches: int) -> int:
    """How often chgnet's Trainer steps its scheduler in an epoch of ``n_batches``: after
    batch ``idx`` when ``idx + 1`` is in ``arange(1, 11) * n_batches // 10``."""
    return len({int(i) for i in np.arange(1, 11) * n_batches // 10} - {0})


def graph_linear_terms(model: CHGNet, data: _GraphDataset) -> LinearTerms:
    """What the linear correction needs of a data set, in the model's energy unit (eV/atom
    for intensive CHGNets, as its loss): labels, the AtomRef composition energy (the
    element references), the network energy (prediction minus composition energy) and the
    network's forces and stresses. Missing stress labels (NaN) are dropped with their
    predictions, as chgnet's loss does."""
    import torch

    if model.composition_model is None:
        raise ValueError("linear_correction needs a CHGNet with an AtomRef composition model")
    e_ref, e_comp, e_net, f_ref, f_net, s_ref, s_net, features = ([] for _ in range(8))
    n_forces, n_stresses = [], []
    sizes = [g.atomic_number.shape[0] for g in data.graphs]
    n_elements = model.composition_model.fc.weight.shape[1]
    for batch in pack_by_atom_count(sizes, 128):
        graphs = [data.graphs[i] for i in batch]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TENSOR_TO_SCALAR_WARNING)
            out = model.predict_graph(graphs, task="efs", batch_size=len(graphs))
        out = [out] if isinstance(out, dict) else out
        with torch.no_grad():
            comp = model.composition_model(graphs).detach().cpu().numpy().reshape(-1)
        for i, o, c, g in zip(batch, out, comp, graphs, strict=True):
            target = data.targets[i]
            e_ref.append(float(target["e"]))
            e_comp.append(float(c))
            e_net.append(float(o["e"]) - float(c))
            f_ref.append(target["f"].numpy().ravel())
            f_net.append(np.asarray(o["f"]).ravel())
            n_forces.append(f_ref[-1].size)
            sr, sn = target["s"].numpy().ravel(), np.asarray(o["s"]).ravel()
            valid = ~np.isnan(sr)
            s_ref.append(sr[valid])
            s_net.append(sn[valid])
            n_stresses.append(int(valid.sum()))
            counts = np.bincount(g.atomic_number.cpu().numpy() - 1, minlength=n_elements)
            counts = counts.astype(float)
            # The feature AtomRef uses: element fractions (intensive) or counts.
            intensive = model.composition_model.is_intensive
            features.append(counts / counts.sum() if intensive else counts)

    return LinearTerms(
        e_ref=np.asarray(e_ref, dtype=float),
        e_refs=np.asarray(e_comp, dtype=float),
        e_net=np.asarray(e_net, dtype=float),
        features=np.asarray(features, dtype=float).reshape(len(e_ref), n_elements),
        f_ref=joined_arrays(f_ref),
        f_net=joined_arrays(f_net),
        s_ref=joined_arrays(s_ref),
        s_net=joined_arrays(s_net),
        n_forces=n_forces,
        n_stresses=n_stresses,
    )


def _force_errors(model: CHGNet, data: _GraphDataset) -> dict[int, tuple[float, int]]:
    """Per structure of ``data`` (by index): the sum of |F_model - F_ref| over its
    components and their number."""
    errors: dict[int, tuple[float, int]] = {}
    sizes = [g.atomic_number.shape[0] for g in data.graphs]
    was_training = model.training
    for batch in pack_by_atom_count(sizes, 128):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TENSOR_TO_SCALAR_WARNING)
            out = model.predict_graph([data.graphs[i] for i in batch], task="ef",
                                      batch_size=len(batch))  # fmt: skip
        out = [out] if isinstance(out, dict) else out
        for i, o in zip(batch, out, strict=True):
            error = np.abs(np.asarray(o["f"]) - data.targets[i]["f"].numpy())
            errors[i] = (float(error.sum()), int(error.size))
    model.train(was_training)
    return errors


def graph_element_parts(
    model: CHGNet, data: _GraphDataset, numbers: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CHGNet's network energy split by element: per structure, the sum of the site
    energies of each element's atoms (per atom of the structure when the model is
    intensive, as its energy), and that sum's forces (-d/dr) and stress (GPa), columns in
    ``numbers`` order. The columns add up to the model's network energy, forces and stress.
    Stress rows are kept where the label has a stress, as ``graph_linear_terms`` keeps them."""
    import torch
    from chgnet.model.model import BatchedGraph

    column = {int(z): k for k, z in enumerate(numbers)}
    e_rows, f_rows, s_rows = [], [], []
    sizes = [g.atomic_number.shape[0] for g in data.graphs]
    model.eval()
    for batch in pack_by_atom_count(sizes, 128):
        graphs = [data.graphs[i] for i in batch]
        for g in graphs:
            g.atom_frac_coord.requires_grad_(True)
        bg = BatchedGraph.from_graphs(
            graphs,
            bond_basis_expansion=model.bond_basis_expansion,
            angle_basis_expansion=model.angle_basis_expansion,
            compute_stress=True,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TENSOR_TO_SCALAR_WARNING)
            out = model._compute(bg, return_site_energies=True)
        site = torch.cat(out["site_energies"])
        z = bg.atomic_numbers
        owners = bg.atom_owners.long()
        n_graphs = len(graphs)
        e_part = np.zeros((n_graphs, len(numbers)))
        f_part = [np.zeros((g.atomic_number.shape[0] * 3, len(numbers))) for g in graphs]
        s_part = [np.zeros((9, len(numbers))) for _ in graphs]
        for number in sorted({int(v) for v in z}):
            k = column[number]
            mask = z == number
            grads = torch.autograd.grad(
                site[mask].sum(), [*bg.atom_positions, *bg.strains],
                retain_graph=True, allow_unused=True,
            )  # fmt: skip
            for j in range(n_graphs):
                e_part[j, k] = float(site[mask & (owners == j)].sum().detach())
                if grads[j] is not None:
                    f_part[j][:, k] = -grads[j].detach().cpu().numpy().ravel()
                if grads[n_graphs + j] is not None:
                    stress = grads[n_graphs + j].detach() * 160.21766208 / bg.volumes[j].detach()
                    s_part[j][:, k] = stress.cpu().numpy().ravel()
        for j, i in enumerate(batch):
            n_atoms = sizes[i]
            e_rows.append(e_part[j] / n_atoms if model.is_intensive else e_part[j])
            f_rows.append(f_part[j])
            valid = ~np.isnan(data.targets[i]["s"].numpy().ravel())
            s_rows.append(s_part[j][valid])
    width = len(numbers)
    return (
        np.asarray(e_rows).reshape(-1, width),
        np.vstack(f_rows) if f_rows else np.empty((0, width)),
        np.vstack(s_rows) if s_rows else np.empty((0, width)),
    )


def readout_output_layer(model: CHGNet) -> Any:
    """The last linear layer of CHGNet's readout MLP (1 output: energy per atom or per
    structure, before pooling).

    In chgnet 0.4's ``CHGNet._compute`` the network energy is ``pooling(mlp(atom_feas))``
    (``mlp_first``) or ``mlp(pooling(atom_feas)) * n_atoms``, pooling a sum or mean, then
    divided by n_atoms when intensive; forces and stress are its gradients; ``forward`` adds
    the composition model's energy and nothing else. So scaling this layer's weight and bias
    by ``s`` scales the network energy, forces and stress by exactly ``s``.
    """
    from chgnet.model.functions import MLP
    from torch import nn

    if isinstance(model.mlp, MLP):
        layer = model.mlp.layers[-1]
    elif isinstance(model.mlp, nn.Sequential):
        layer = model.mlp[-1]
    else:
        raise TypeError(f"unexpected CHGNet readout {type(model.mlp).__name__}")
    if not isinstance(layer, nn.Linear) or layer.out_features != 1:
        raise TypeError(f"CHGNet readout ends in {layer}, not a Linear(..., 1)")
    return layer


def scale_readout(model: CHGNet, scale: float) -> None:
    """Multiply the network part of CHGNet's energy (and so forces, stress) by ``scale``."""
    import torch

    layer = readout_output_layer(model)
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.mul_(scale)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
