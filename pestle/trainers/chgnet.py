"""Fine-tune CHGNet on pestle's labels with chgnet's own ``chgnet.trainer.Trainer``.

Unit conventions (checked against chgnet 0.4's model, dataset and trainer):

* energy: CHGNet's pretrained models are intensive, so labels become eV/atom;
* forces: eV/A, as in ASE;
* stress: the model outputs GPa with ASE's sign (positive = tensile; its ASE calculator only
  multiplies by ``ase.units.GPa``). ``chgnet.data.StructureData`` expects VASP kBar and
  multiplies by -0.1 to reach that convention; we build targets directly in the model's
  convention (ASE Voigt eV/A^3 -> 3x3 -> divide by ``units.GPa``) so no sign juggling occurs.

Energies from another DFT code (GPAW PBE) sit on a different absolute scale than the Materials
Project VASP energies CHGNet learnt. With ``refit_atom_ref`` we first shift CHGNet's
per-element reference energies (its ``AtomRef`` composition model) by a least-squares fit of
the label-minus-model residuals, using chgnet's ``AtomRef.fit``; the graph network then only
has to learn the interaction part. Elements absent from the labels keep their references.
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
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pestle.potentials.chgnet import (
    TENSOR_TO_SCALAR_WARNING,
    check_pretrained_name,
    load_chgnet,
    pack_by_atom_count,
    save_checkpoint,
    sha256_file,
)
from pestle.trainers import TRAINERS, LabelledStructure, TrainedModel

if TYPE_CHECKING:
    from chgnet.model.model import CHGNet

log = logging.getLogger("pestle.trainers.chgnet")

CHECKPOINT_NAME = "chgnet_finetuned.pth.tar"
MAE_UNITS = {"e": "eV/atom", "f": "eV/A", "s": "GPa"}

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


def _reference(ls: LabelledStructure) -> tuple[float, np.ndarray, np.ndarray | None]:
    """Total energy (eV), forces (eV/A) and ASE Voigt stress (eV/A^3) or None."""
    where = f"structure {ls.structure_id} (label {ls.label_id})"
    calc = ls.atoms.calc
    if calc is None:
        raise ValueError(f"{where} has no reference results in atoms.calc")
    results = calc.results
    if results.get("energy") is None or results.get("forces") is None:
        raise ValueError(f"{where} lacks a reference energy or forces")
    forces = np.asarray(results["forces"], dtype=float)
    if forces.shape != (len(ls.atoms), 3):
        raise ValueError(f"{where}: forces have shape {forces.shape}, not ({len(ls.atoms)}, 3)")
    stress = results.get("stress")
    if stress is not None:
        stress = np.asarray(stress, dtype=float)
        if stress.shape == (3, 3):
            stress = np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2],
                               stress[0, 2], stress[0, 1]])  # fmt: skip
    return float(results["energy"]), forces, stress


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


def _collate(batch: list[tuple[Any, dict]]) -> tuple[list, dict]:
    """The batch layout chgnet's Trainer consumes: a list of graphs, energies stacked,
    forces and stresses as per-structure lists. (Not chgnet.data.dataset.collate_graphs:
    importing that module runs ``warnings.filterwarnings("ignore")`` for the whole process.)"""
    import torch

    graphs = [graph for graph, _ in batch]
    targets = {
        "e": torch.stack([t["e"] for _, t in batch]),
        "f": [t["f"] for _, t in batch],
        "s": [t["s"] for _, t in batch],
    }
    return graphs, targets


class _LossMeter:
    """Stands in for the chgnet Trainer's criterion to record the combined loss per epoch;
    the Trainer itself only reports MAEs."""

    def __init__(self, criterion: Any, model: CHGNet) -> None:
        self.criterion = criterion
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.sums = {"train": 0.0, "val": 0.0}
        self.counts = {"train": 0, "val": 0}

    def __call__(self, targets: dict, prediction: dict) -> dict:
        out = self.criterion(targets, prediction)
        phase = "train" if self.model.training else "val"
        n = int(targets["e"].shape[0])
        self.sums[phase] += float(out["loss"].detach()) * n
        self.counts[phase] += n
        return out

    def mean(self, phase: str) -> float:
        return self.sums[phase] / self.counts[phase] if self.counts[phase] else math.nan


@TRAINERS.register("chgnet")
class CHGNetTrainer:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        base_model: str = "0.3.0"  # a pretrained name shipped in chgnet's wheel
        base_checkpoint: Path | None = None  # takes precedence over base_model
        epochs: int = Field(5, ge=1)
        learning_rate: float = Field(1e-3, gt=0)
        batch_size: int = Field(2, ge=1)  # structures per optimiser step
        energy_weight: float = Field(1.0, ge=0)
        force_weight: float = Field(1.0, ge=0)
        stress_weight: float = Field(0.1, ge=0)
        freeze: Literal["none", "embeddings", "all_but_readout"] = "embeddings"
        refit_atom_ref: bool = True
        seed: int = 0

        _known_model = field_validator("base_model")(check_pretrained_name)

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.model: CHGNet | None = None  # the fine-tuned model after train(), on the CPU

    def train(
        self,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        device: str = "cpu",
    ) -> TrainedModel:
        import torch
        from chgnet.trainer import Trainer
        from torch.utils.data import DataLoader

        from pestle.devices import pick_device

        p = self.params
        if not train_set:
            raise ValueError("cannot fine-tune CHGNet on an empty training set")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        device = pick_device(device)
        _seed_everything(p.seed)

        model = load_chgnet(p.base_model, p.base_checkpoint, device="cpu")
        atom_ref_shift = self._refit_atom_ref(model, train_set) if p.refit_atom_ref else {}
        _freeze(model, p.freeze)

        has_stress = any(_reference(ls)[2] is not None for ls in train_set)
        targets = "efs" if has_stress and p.stress_weight > 0 else "ef"
        train_data = self._dataset(model, train_set)
        val_source = "val_set" if val_set else "train_set (val_set was empty)"
        val_data = self._dataset(model, val_set) if val_set else train_data

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
        )
        meter = _LossMeter(trainer.criterion, model)
        trainer.criterion = meter

        def snapshot() -> dict[str, Any]:
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        epochs: list[dict[str, Any]] = []
        # If no epoch finishes with a finite loss we keep the (refit) base model, never
        # weights a NaN step may have touched.
        best_loss, best_epoch, best_state = math.inf, -1, snapshot()
        stopped = None
        for epoch in range(p.epochs):
            # One epoch per call so we can keep a copy of the weights with the lowest
            # validation loss (chgnet's own "best" is a reference to the live model).
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
                trainer.train(train_loader, val_loader, save_dir="", train_composition_model=False)
            train_loss, val_loss = meter.mean("train"), meter.mean("val")
            if len(trainer.training_history["e"]["train"]) == done_before or not (
                math.isfinite(train_loss) and math.isfinite(val_loss)
            ):
                stopped = f"non-finite loss in epoch {epoch}"
                log.warning("CHGNet fine-tuning stopped: %s", stopped)
                break
            history = trainer.training_history
            epochs.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "train_mae": {k: float(history[k]["train"][-1]) for k in targets},
                    "val_mae": {k: float(history[k]["val"][-1]) for k in targets},
                }
            )
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = snapshot()

        model.to("cpu")
        model.load_state_dict(best_state)
        model.eval()
        self.model = model

        checkpoint = save_checkpoint(
            model,
            workdir / CHECKPOINT_NAME,
            {
                "trainer": "chgnet",
                "hyperparameters": p.model_dump(mode="json"),
                "best_epoch": best_epoch,
            },
        )
        metrics = {
            "epochs": epochs,
            "best_epoch": best_epoch,
            "best_val_loss": best_loss if best_epoch >= 0 else None,
            "selection": "lowest validation loss" if best_epoch >= 0 else "base model (no epoch)",
            "stopped": stopped,
            "val_source": val_source,
            "n_train": len(train_set),
            "n_val": len(val_set) if val_set else len(train_set),
            "targets": targets,
            "mae_units": {k: MAE_UNITS[k] for k in targets},
            "atom_ref_shift_eV_per_atom": atom_ref_shift,
            "trainable_parameters": sum(x.numel() for x in model.parameters() if x.requires_grad),
            "device": device,
            "checkpoint_sha256": sha256_file(checkpoint),
        }
        return TrainedModel(
            checkpoint=checkpoint,
            potential="chgnet",
            potential_params={"model": p.base_model},
            hyperparameters=p.model_dump(mode="json"),
            metrics=metrics,
        )

    def _dataset(self, model: CHGNet, labelled: Sequence[LabelledStructure]) -> _GraphDataset:
        import torch
        from pymatgen.io.ase import AseAtomsAdaptor

        graphs, targets = [], []
        for ls in labelled:
            energy, forces, stress = _reference(ls)
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
            _reference(ls)[0] / k - e for ls, k, e in zip(labelled, scale, predicted, strict=True)
        ]
        fit = AtomRef(is_intensive=model.composition_model.is_intensive)
        fit.fit(structures, residual)
        shift = fit.fc.weight.detach().to(model.composition_model.fc.weight.dtype)
        with torch.no_grad():
            model.composition_model.fc.weight += shift
        numbers = sorted({int(z) for ls in labelled for z in ls.atoms.numbers})
        return {chemical_symbols[z]: float(shift[0, z - 1]) for z in numbers}


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
