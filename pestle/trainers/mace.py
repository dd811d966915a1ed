"""Fine-tune a MACE foundation model on pestle's labels with mace-torch's own training script.

We run ``python -m mace.cli.run_train`` with an argument list in a child process: mace's
``run`` sets the process-wide torch default dtype, adds handlers to the root logger and
unpickles the foundation model with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set, none of which
should leak into a Dask worker that also predicts with other models. Everything mace writes
(data files, logs, checkpoints, results, the final ``.model``) stays under ``workdir``.

Units: the train/valid sets are extended XYZ files with ``REF_energy`` (total, eV),
``REF_forces`` (eV/A) and ``REF_stress`` (ASE Voigt order, eV/A^3, ASE sign). MACE reads a
6-vector stress in that order (``voigt_to_matrix``) and predicts stress with ASE's sign, so
the labels go in unchanged.

Safety: the foundation ``.model`` file is a full pickle. It is copied into ``workdir`` and
the copy is verified against ``model_sha256`` (or accepted because
``trust_model_file`` says so) before mace or we unpickle it, so the file mace loads is the
file we checked.

Level of theory: with ``refit_element_refs`` we shift the foundation's isolated-atom energies (E0s)
by a least-squares fit over compositions of the label-minus-foundation energy residuals on
the training set, as mace's ``--E0s=estimated`` does, and pass them to mace as a dict. We
fit them ourselves so that elements absent from the training set keep their foundation E0s
when ``keep_foundation_elements`` is on (mace's estimate covers only the training elements
and would leave the others at 0 eV).

Multihead fine-tuning: mace switches multihead replay off *silently* for a local foundation
file unless ``--pt_train_file`` names the pretraining data, and then fine-tunes naively. We
refuse ``finetuning: multihead`` without ``replay_file`` and, after training, check that the
saved model has mace's ``pt_head`` beside the fine-tuned head (and that mace's log says it
used the multihead mode); otherwise the run fails instead of passing off a naive fine-tune.
(``finetuning`` was called ``mode`` before the paper's modes below took that name; the old
spelling ``mode: naive`` / ``mode: multihead`` is still read.)

Modes of Deng et al. (2025) (``Params.mode``, see ``pestle.trainers.modes``):

* ``custom``: the fields as given, mace's run_train as above;
* ``full``: run_train with every parameter trainable, MSE loss (mace's ``weighted``, or
  ``stress`` with stress labels) weighted 0.1/100/0.1, Adam (``--weight_decay=0``, no gradient
  clipping) at 1e-3 decayed to 1e-5 over the run (100 epochs unless ``epochs`` is given), and
  the epoch with the lowest validation force MAE kept. Two deviations are forced by mace
  0.3's command line: its schedulers are ``ExponentialLR`` and ``ReduceLROnPlateau`` only, so
  the cosine becomes ``ExponentialLR`` with the gamma that takes 1e-3 to exactly 1e-5 on the
  last epoch (same end points, geometric rather than cosine in between; the plateau scheduler
  would not reach 1e-5 on any fixed schedule); and ``--amsgrad`` is ``store_true`` with
  default True, so Adam runs in its AMSGrad variant. mace keeps the checkpoint with the
  lowest validation *loss*; we have it save every epoch (``--save_all_checkpoints``), delete
  the ones that cannot win while it runs, and put the weights of the epoch with the lowest
  validation force MAE into the saved model;
* ``linear_correction``: no run_train. The verified foundation is loaded, the scale on its
  interaction energy (everything but the E0s: ScaleShiftMACE's ``scale_shift`` block holds
  ``scale`` and ``shift`` of the per-atom interaction energy, and both are multiplied by s)
  is fitted in closed form jointly with the E0 shift (``refit_element_refs``), baked in and the
  module saved with ``torch.save`` like mace saves it.

What every family does alike (checks, mode dispatch, metrics, checkpoint and sha256) is
``pestle.trainers.base.TrainerBase``; the data files are ``pestle.formats.mace_xyz``'s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from pestle.formats.mace_xyz import (
    REF_ENERGY,
    REF_FORCES,
    REF_STRESS,
    read_mace_xyz,
    write_mace_xyz,
)
from pestle.plugins import renamed_fields
from pestle.potentials.checkpoints import check_sha256
from pestle.potentials.mace import MACEPotential, choose_head, load_mace_model, mace_version
from pestle.trainers import TRAINERS, LabelledStructure
from pestle.trainers.base import (
    SELECTED_BY_FORCE,
    ChecksumError,
    FineTuned,
    TrainerBase,
    best_epoch,
    sha256_file,
    torch_threads,
)
from pestle.trainers.linear import LinearTerms
from pestle.trainers.modes import (
    PAPER_FINAL_LEARNING_RATE,
    PAPER_FULL,
    PAPER_LOSS_WEIGHTS,
    Mode,
    apply_mode,
)
from pestle.trainers.references import least_squares_shift, reference_labels

log = logging.getLogger("pestle.trainers.mace")

RUN_NAME = "mace_finetuned"
CHECKPOINT_NAME = f"{RUN_NAME}.model"
FINETUNE_HEAD = "Default"  # the head mace gives the fine-tuning data (prepare_default_head)
REPLAY_HEAD = "pt_head"  # the head mace trains on the replay data in multihead mode
MULTIHEAD_LOG_LINE = "Using multiheads finetuning mode"
# How often the full mode looks for checkpoints it can delete while mace runs (seconds).
PRUNE_INTERVAL = 2.0

# Deng et al. (2025)'s full fine-tune is plain Adam on the weights themselves.
FULL: dict[str, Any] = {**PAPER_FULL, "ema": False}
# Fields a closed-form linear correction has no use for.
_UNUSED_BY_LINEAR = (
    "epochs",
    "learning_rate",
    "batch_size",
    "ema",
    "ema_decay",
    "keep_foundation_elements",
    "finetuning",
    "replay_file",
    "replay_max_structures",
    "replay_weight",
)


def _training_atoms(ls: LabelledStructure) -> Atoms:
    """A clean copy of the geometry with the labels mace trains on (no stress without a
    volume) in a SinglePointCalculator, and pestle's ids."""
    energy, forces, stress = reference_labels(ls)
    atoms = Atoms(
        numbers=ls.atoms.numbers, positions=ls.atoms.positions, cell=ls.atoms.cell, pbc=ls.atoms.pbc
    )
    atoms.info["pestle_structure_id"] = str(ls.structure_id)
    atoms.info["pestle_label_id"] = str(ls.label_id)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    return atoms


@dataclass
class _Foundation:
    """The verified foundation and what a run learns about it and its data."""

    run_dir: Path  # everything mace (and we) write
    file: Path  # the verified copy mace and we load
    potential: MACEPotential | None  # float64 on the CPU; dropped before mace runs
    model: Any  # its torch module
    heads: list[str]
    head_index: int
    head: str  # the head the trained model is used through
    zs: list[int]  # the foundation's elements, in its order
    e0s: dict[int, float]  # of the starting head
    train_frames: list[Atoms]
    val_frames: list[Atoms]  # the training frames when val_set is empty
    replay_frames: list[Atoms]
    loss: str = ""  # mace's --loss, once chosen

    def references(self) -> list[float]:
        """The starting head's E0s in the order of ``zs``."""
        return [self.e0s[z] for z in self.zs]


@TRAINERS.register("mace")
class MACETrainer(TrainerBase[_Foundation]):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        # One spelling across trainers (and potentials): model_path, model_sha256,
        # refit_element_refs; the old names are still read, with a warning.
        model_path: Path = Field(
            validation_alias=AliasChoices("model_path", "foundation_model"),
            description="the MACE .model file to start from (a MACE-MP download or your own); "
            "formerly foundation_model",
        )
        model_sha256: str | None = Field(
            None,
            validation_alias=AliasChoices("model_sha256", "foundation_model_sha256"),
            description="the .model file's sha256, checked before it is unpickled; formerly "
            "foundation_model_sha256",
        )
        # .model files are pickles: without a sha256, using one needs this explicit opt-in.
        trust_model_file: bool = Field(
            False,
            description="use a .model file without model_sha256 (a pickle runs any code it names)",
        )
        foundation_head: str | None = Field(
            None, description="which head of a multi-head model to start from"
        )
        finetuning: Literal["naive", "multihead"] = Field(
            "naive",
            description="naive: train on the labels alone; multihead: mace's replay of "
            "pretraining data beside them (needs replay_file)",
        )
        replay_file: Path | None = Field(
            None, description="pretraining data for multihead replay (extxyz)"
        )
        replay_max_structures: int | None = Field(
            None, ge=1, description="a random subset of the replay file of this size"
        )
        replay_weight: float = Field(
            1.0, ge=0, description="weight of the replay head in the loss (mace's --weight_pt_head)"
        )
        # True: foundation E0s shifted by a least-squares fit to the labels (new level of
        # theory); False: keep the foundation's E0s (same level of theory).
        refit_element_refs: bool = Field(
            True,
            validation_alias=AliasChoices("refit_element_refs", "e0s"),
            description="refit the isolated-atom energies (E0s) to the labels first (a new level "
            "of theory); false keeps the model's; formerly e0s: refit | foundation",
        )
        keep_foundation_elements: bool = Field(
            True,
            description="keep every element of the starting model (false: only the elements "
            "of the training labels)",
        )
        epochs: int = Field(10, ge=1, description="passes over the training labels")
        learning_rate: float = Field(1e-3, gt=0, description="the optimiser's learning rate")
        batch_size: int = Field(4, ge=1, description="structures per optimiser step")
        # mace's own defaults: its loss weighs forces 100x the per-atom energy.
        energy_weight: float = Field(
            1.0, ge=0, description="weight of the energy per atom in the loss"
        )
        force_weight: float = Field(100.0, ge=0, description="weight of the forces in the loss")
        stress_weight: float = Field(1.0, ge=0, description="weight of the stress in the loss")
        ema: bool = Field(
            False, description="exponential moving average of the weights (mace's --ema)"
        )
        ema_decay: float = Field(0.99, gt=0, lt=1, description="decay of that average")
        default_dtype: Literal["float32", "float64"] = Field(
            "float64", description="precision mace trains in"
        )
        seed: int = Field(
            0, description="random seed of the fine-tune (shuffling, initial weights)"
        )
        cpu_threads: int | None = Field(
            None,
            ge=1,
            description="threads of mace's training process (OMP_NUM_THREADS); none: torch's "
            "default. One is fastest for small models on a busy CPU",
        )
        # custom: the fields above as given. full / linear_correction: Deng et al. (2025)'s
        # recipes, which fill in the fields they fix (see FULL, modes.PAPER_LOSS_WEIGHTS).
        mode: Mode = Field(
            default="custom",
            description="custom: the fields as given; full: Deng et al. (2025)'s full fine-tune "
            "(fixes loss weights and learning rate, 100 epochs unless given); "
            "linear_correction: their one energy scale, fitted in closed form",
        )

        @model_validator(mode="before")
        @classmethod
        def _legacy_mode(cls, data: Any) -> Any:
            """``mode: naive|multihead`` is the old name of ``finetuning``."""
            if isinstance(data, dict) and data.get("mode") in ("naive", "multihead"):
                data = dict(data)
                legacy = data.pop("mode")
                if data.setdefault("finetuning", legacy) != legacy:
                    raise ValueError(
                        f"mode {legacy!r} (the old name of finetuning) contradicts "
                        f"finetuning {data['finetuning']!r}"
                    )
            return data

        _hex_digest = field_validator("model_sha256")(check_sha256)
        _old_names = renamed_fields("trainer mace")

        @field_validator("refit_element_refs", mode="before")
        @classmethod
        def _e0s_values(cls, value: Any) -> Any:
            """The old ``e0s`` took ``refit`` / ``foundation``."""
            return {"refit": True, "foundation": False}.get(value, value)

        @model_validator(mode="after")
        def _replay_for_multihead(self) -> MACETrainer.Params:
            apply_mode(self, full=FULL, linear=PAPER_LOSS_WEIGHTS,
                       unused_by_linear=_UNUSED_BY_LINEAR)  # fmt: skip
            if self.finetuning == "multihead" and self.mode == "full":
                raise ValueError(
                    "mode full is the paper's naive fine-tune with an MSE loss; mace's multihead "
                    "replay trains with its own 'universal' loss. Use finetuning 'naive'"
                )
            if self.finetuning == "multihead" and self.replay_file is None:
                raise ValueError(
                    "finetuning 'multihead' needs replay_file (the pretraining data, passed to "
                    "mace as --pt_train_file): without it mace silently turns multihead replay "
                    "off for a local foundation model and fine-tunes naively. Set replay_file, "
                    "or use finetuning 'naive'"
                )
            if self.finetuning == "naive" and self.replay_file is not None:
                raise ValueError("replay_file is only used with finetuning 'multihead'")
            return self

    family = "MACE"
    potential_name = "mace"
    requires_extra: ClassVar[str] = "mace"  # pip install 'pestle[mace]'
    baked_into = "MACE model"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self._foundation_head: str | None = None

    @property
    def refit_references(self) -> bool:
        return self.params.refit_element_refs

    def _load_base(
        self,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
    ) -> _Foundation:
        p = self.params
        if p.finetuning == "multihead" and p.replay_file is None:  # Params refuses it
            raise ValueError("finetuning 'multihead' needs replay_file")
        run_dir = workdir / "mace"
        if run_dir.exists():  # a rerun must not resume from (or report) an older run's files
            shutil.rmtree(run_dir)
        run_dir.mkdir()

        foundation = self._verified_copy(run_dir)
        base = MACEPotential(
            MACEPotential.Params(
                model_path=foundation,
                model_sha256=sha256_file(foundation),  # the copy we verified (or trusted)
                head=p.foundation_head,
                device="cpu",
                default_dtype="float64",
            )
        )
        model = base.load_model()
        foundation_heads = [str(h) for h in getattr(model, "heads", [FINETUNE_HEAD])]
        # The head to start from: named, the only one, or "default" (as MACEPotential picks);
        # named to mace whenever the foundation has several.
        head = choose_head(foundation_heads, p.foundation_head)
        self._foundation_head = head if len(foundation_heads) > 1 else None
        foundation_zs = [int(z) for z in model.atomic_numbers]
        head_index = foundation_heads.index(head)

        train_frames = [_training_atoms(ls) for ls in train_set]
        val_frames = [_training_atoms(ls) for ls in val_set] if val_set else train_frames
        replay_frames = (
            read_mace_xyz(p.replay_file, limit=p.replay_max_structures, seed=p.seed)
            if p.finetuning == "multihead" and p.replay_file is not None
            else []
        )
        data_zs = {int(z) for frame in train_frames + val_frames for z in frame.numbers}
        replay_zs = {int(z) for frame in replay_frames for z in frame.numbers}
        missing = sorted((data_zs | replay_zs) - set(foundation_zs))
        if missing:
            names = ", ".join(chemical_symbols[z] for z in missing)
            raise ValueError(
                f"the foundation model has no parameters for element(s) {names}: MACE "
                "fine-tuning keeps the foundation's element embedding"
            )
        return _Foundation(
            run_dir=run_dir,
            file=foundation,
            potential=base,
            model=model,
            heads=foundation_heads,
            head_index=head_index,
            head=head,
            zs=foundation_zs,
            e0s=self._e0s(model, head_index),
            train_frames=train_frames,
            val_frames=val_frames,
            replay_frames=replay_frames,
        )

    def _potential_params(self, foundation: _Foundation) -> dict[str, Any]:
        return {"head": foundation.head, "default_dtype": self.params.default_dtype}

    def _save(
        self,
        foundation: _Foundation,
        workdir: Path,
        *,
        best_epoch: int | None = None,
        linear_scale: float | None = None,
    ) -> Path:
        """linear_correction: the baked module saved as mace saves one. Otherwise mace has
        saved it (with the kept epoch's weights, see ``_train``)."""
        checkpoint = foundation.run_dir / CHECKPOINT_NAME
        if linear_scale is not None:
            _save_mace(foundation.model, checkpoint, self.params.default_dtype)
            foundation.model = foundation.potential = None  # the saved one is checked next
        return checkpoint

    def _after_save(
        self, foundation: _Foundation, checkpoint: Path, checkpoint_sha256: str
    ) -> dict[str, Any]:
        """After mace's own training: what it saved (heads, E0s) and whether it really
        trained with the replay. Then the verified foundation copy goes (the checkpoints
        dir holds mace's own)."""
        entries = {}
        if self.params.mode != "linear_correction":
            entries = self._check_saved(foundation, checkpoint, checkpoint_sha256)
        foundation_sha256 = sha256_file(foundation.file)
        foundation.file.unlink()
        return {**entries, "foundation_sha256": foundation_sha256, "mace_version": mace_version()}

    # -- custom / full: mace's run_train -------------------------------------------------------

    def _train(
        self,
        foundation: _Foundation,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        device: str,
    ) -> FineTuned:
        p = self.params
        f = foundation
        data_zs = {int(z) for frame in f.train_frames + f.val_frames for z in frame.numbers}
        replay_zs = {int(z) for frame in f.replay_frames for z in frame.numbers}
        model_zs = sorted(f.zs) if p.keep_foundation_elements else sorted(data_zs | replay_zs)

        e0_shift: dict[str, float] = {}
        if p.refit_element_refs:
            structures = [ls.atoms for ls in train_set]
            assert f.potential is not None
            predicted = [pred.energy for pred in f.potential.predict(structures)]
            residuals = [
                reference_labels(ls)[0] - e for ls, e in zip(train_set, predicted, strict=True)
            ]
            shift = least_squares_shift(structures, residuals, model_zs)
            e0s = {z: f.e0s[z] + float(c) for z, c in zip(model_zs, shift, strict=True)}
            e0_shift = {chemical_symbols[z]: float(c) for z, c in zip(model_zs, shift, strict=True)
                        if z in data_zs}  # fmt: skip
        else:
            e0s = {z: f.e0s[z] for z in model_zs}
        f.model = f.potential = None  # mace loads the foundation itself, in its own process

        run_dir = f.run_dir
        train_file, valid_file = run_dir / "train.xyz", run_dir / "valid.xyz"
        write_mace_xyz(train_file, f.train_frames)
        write_mace_xyz(valid_file, f.val_frames)
        replay_file = None
        if f.replay_frames:
            replay_file = run_dir / "replay.xyz"
            write_mace_xyz(replay_file, f.replay_frames)
        has_stress = any(frame.calc.results.get("stress") is not None for frame in f.train_frames)
        f.loss = loss = "stress" if has_stress and p.stress_weight > 0 else "weighted"

        argv = self._argv(run_dir, f.file, train_file, valid_file, replay_file, e0s, loss,
                          device)  # fmt: skip
        full = p.mode == "full"
        self._run(argv, run_dir, device, prune=full)

        checkpoint = run_dir / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise RuntimeError(
                f"mace finished without writing {checkpoint}; see {run_dir / 'logs'}"
            )
        if full:
            # mace saved its latest checkpoint; the paper keeps the best validation forces.
            kept, selection = self._keep_best_force_epoch(run_dir, checkpoint)
        else:
            kept = self._best_epoch_from_checkpoints(run_dir)
            selection = "lowest validation loss of the fine-tuning head (mace's checkpoint)"
        f.head = FINETUNE_HEAD  # the head mace gives the fine-tuning data

        history = self._history(run_dir)
        metrics: dict[str, Any] = {
            "initial_val": history["initial_val"],
            "final_train_loss": history["final_train_loss"],
            "n_replay": len(f.replay_frames),
            "finetuning": p.finetuning,
            "e0_shift_eV": e0_shift,
            "argv": argv,
        }
        if full:
            best = [e for e in history["epochs"] if e["epoch"] == kept]
            metrics["best_val_force_mae"] = best[0]["val_mae_f"] if best else None
            metrics["optimisation"] = self._full_schedule(loss)
        return FineTuned(
            epochs=history["epochs"],
            best_epoch=kept,
            best_val_loss=history["best_val_loss"],
            selection=selection,
            metrics=metrics,
        )

    def _check_saved(
        self, foundation: _Foundation, checkpoint: Path, checkpoint_sha256: str
    ) -> dict[str, Any]:
        """The heads and E0s of the model mace saved, refusing a multihead fine-tune that
        mace quietly ran naively (or a naive one with a replay head)."""
        p = self.params
        run_dir = foundation.run_dir
        tuned = load_mace_model(checkpoint, checkpoint_sha256, device="cpu")
        heads = [str(h) for h in getattr(tuned, "heads", [FINETUNE_HEAD])]
        saved_e0s = self._e0s(tuned, heads.index(FINETUNE_HEAD))
        del tuned
        log_text = self._log_text(run_dir)
        multihead_used = REPLAY_HEAD in heads and MULTIHEAD_LOG_LINE in log_text
        if p.finetuning == "multihead" and not multihead_used:
            raise RuntimeError(
                f"mace did not fine-tune in multihead mode with replay (heads of the saved "
                f"model: {heads}); see the log in {run_dir / 'logs'}"
            )
        if p.finetuning == "naive" and REPLAY_HEAD in heads:
            raise RuntimeError(f"mace trained a replay head in naive mode (heads: {heads})")
        return {
            "multihead_replay": multihead_used,
            "heads": heads,
            "loss": "universal" if multihead_used else foundation.loss,
            "e0s": {chemical_symbols[z]: e for z, e in saved_e0s.items()},
            "elements": [chemical_symbols[z] for z in sorted(saved_e0s)],
        }

    # -- steps -----------------------------------------------------------------------------

    def _verified_copy(self, run_dir: Path) -> Path:
        """The foundation file copied into ``run_dir``, checked the way MACEPotential checks
        a model file (sha256 or an explicit trust)."""
        p = self.params
        source = Path(p.model_path)
        if not source.is_file():
            raise FileNotFoundError(f"MACE foundation model {source} does not exist")
        copy = run_dir / "foundation.model"
        shutil.copyfile(source, copy)
        if p.model_sha256 is not None:
            actual = sha256_file(copy)
            if actual != p.model_sha256:
                raise ChecksumError(
                    f"MACE foundation model {source} has sha256 {actual}, expected {p.model_sha256}"
                )
        elif not p.trust_model_file:
            raise ValueError(
                f"MACE foundation model {source} is a full pickle of a torch module: loading it "
                "runs any code it names. Set model_sha256 to the file's sha256 "
                "(sha256sum prints it), or set trust_model_file: true if you trust its source"
            )
        else:
            log.warning("fine-tuning from %s unverified: trust_model_file is set", source)
        return copy

    @staticmethod
    def _e0s(model: Any, head_index: int) -> dict[int, float]:
        """A model's isolated-atom energies by atomic number, for one head."""
        values = model.atomic_energies_fn.atomic_energies.detach().cpu().numpy()
        if values.ndim == 2:
            values = values[head_index]
        return {int(z): float(e) for z, e in zip(model.atomic_numbers, values, strict=True)}

    def _argv(
        self,
        run_dir: Path,
        foundation: Path,
        train_file: Path,
        valid_file: Path,
        replay_file: Path | None,
        e0s: dict[int, float],
        loss: str,
        device: str,
    ) -> list[str]:
        p = self.params
        argv = [
            f"--name={RUN_NAME}",
            f"--seed={p.seed}",
            f"--work_dir={run_dir}",
            f"--model_dir={run_dir}",
            f"--log_dir={run_dir / 'logs'}",
            f"--checkpoints_dir={run_dir / 'checkpoints'}",
            f"--results_dir={run_dir / 'results'}",
            f"--downloads_dir={run_dir / 'downloads'}",
            f"--device={'cuda' if device.startswith('cuda') else 'cpu'}",
            f"--default_dtype={p.default_dtype}",
            f"--foundation_model={foundation}",
            f"--foundation_model_elements={p.keep_foundation_elements}",
            f"--train_file={train_file}",
            f"--valid_file={valid_file}",
            f"--energy_key={REF_ENERGY}",
            f"--forces_key={REF_FORCES}",
            f"--stress_key={REF_STRESS}",
            f"--E0s={dict(e0s)!r}",  # mace reads it with ast.literal_eval
            f"--loss={loss}",
            f"--energy_weight={p.energy_weight}",
            f"--forces_weight={p.force_weight}",
            f"--stress_weight={p.stress_weight}",
            f"--lr={p.learning_rate}",
            f"--max_num_epochs={p.epochs}",
            f"--batch_size={p.batch_size}",
            f"--valid_batch_size={p.batch_size}",
            "--eval_interval=1",
            "--num_workers=0",
            "--save_cpu",
            "--plot=False",
            "--error_table=PerAtomRMSEstressvirials"
            if loss == "stress"
            else "--error_table=PerAtomRMSE",
        ]
        if self._foundation_head is not None:
            argv.append(f"--foundation_head={self._foundation_head}")
        if p.ema:
            argv += ["--ema", f"--ema_decay={p.ema_decay}"]
        if p.mode == "full":
            argv += [
                "--optimizer=adam",
                "--weight_decay=0.0",  # plain Adam (mace's default adds 5e-7 L2)
                "--clip_grad=None",  # and no gradient clipping (mace's default clips at 10)
                "--scheduler=ExponentialLR",  # mace has no cosine (see the module docstring)
                f"--lr_scheduler_gamma={exponential_gamma(p.learning_rate, p.epochs)!r}",
                # Every epoch's weights, so the best validation forces can be kept; the
                # parent deletes the checkpoints that cannot win while mace runs.
                "--save_all_checkpoints",
            ]
        if p.finetuning == "multihead":
            argv += [
                "--multiheads_finetuning=True",
                f"--pt_train_file={replay_file}",
                f"--weight_pt_head={p.replay_weight}",
                # mace would otherwise replace lr with 1e-4 and turn EMA on in this mode
                "--force_mh_ft_lr=True",
            ]
        else:
            argv.append("--multiheads_finetuning=False")
        return argv

    def _run(self, argv: list[str], run_dir: Path, device: str, prune: bool = False) -> None:
        """Run mace's training script; with ``prune``, delete superseded checkpoints (see
        :meth:`_prune_checkpoints`) every ``PRUNE_INTERVAL`` seconds while it runs."""
        env = dict(os.environ)
        match = re.fullmatch(r"cuda:(\d+)", device)
        if match:  # mace takes "cuda" only: show it the one GPU we were given
            env["CUDA_VISIBLE_DEVICES"] = match.group(1)
        if self.params.cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(self.params.cpu_threads)
        command = [sys.executable, "-m", "mace.cli.run_train", *argv]
        log.info("running mace fine-tuning in %s", run_dir)
        with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
            process = subprocess.Popen(command, cwd=run_dir, env=env, stdout=out, stderr=err)
            try:
                while True:
                    try:
                        returncode = process.wait(timeout=PRUNE_INTERVAL if prune else None)
                        break
                    except subprocess.TimeoutExpired:
                        self._prune_checkpoints(run_dir)
            finally:
                if process.poll() is None:  # interrupted: do not leave mace running
                    process.kill()
                    process.wait()
        if returncode != 0:
            tail = (run_dir / "stderr.log").read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(
                f"mace fine-tuning failed (exit code {returncode}); last lines of "
                f"{run_dir / 'stderr.log'}:\n" + "\n".join(tail)
            )

    # -- full mode: keep the epoch with the best validation forces ---------------------------

    @staticmethod
    def _checkpoint_files(run_dir: Path) -> dict[int, Path]:
        """mace's per-epoch checkpoints (stage one) by epoch."""
        files = {}
        for path in (run_dir / "checkpoints").glob(f"{RUN_NAME}*_epoch-*.pt"):
            match = re.search(r"_epoch-(\d+)\.pt$", path.name)
            if match:
                files[int(match.group(1))] = path
        return files

    @staticmethod
    def _val_force_errors(run_dir: Path) -> dict[int, float]:
        """Validation force MAE of the fine-tuning head per epoch, from mace's results file
        (read while mace may be appending to it: an incomplete last line is skipped)."""
        errors: dict[int, float] = {}
        for path in sorted((run_dir / "results").glob(f"{RUN_NAME}*_train.txt")):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (
                    record.get("mode") == "eval"
                    and record.get("epoch") is not None
                    and str(record.get("head", FINETUNE_HEAD)) == FINETUNE_HEAD
                ):
                    value = _number(record.get("mae_f"))
                    if value is not None and math.isfinite(value):
                        errors[int(record["epoch"])] = value
        return errors

    def _prune_checkpoints(self, run_dir: Path) -> None:
        """Delete checkpoints that can no longer be the best: every one older than the
        newest except that of the lowest validation force MAE so far. The newest is never
        touched (mace may be writing it, and loads the newest when it finishes), nor one
        whose epoch has no validation record yet. Bounds the disk use of
        ``--save_all_checkpoints`` to about two checkpoints."""
        files = self._checkpoint_files(run_dir)
        if len(files) < 2:
            return
        errors = self._val_force_errors(run_dir)
        best = best_epoch(errors)
        newest = max(files)
        for epoch, path in files.items():
            if epoch not in (newest, best) and epoch in errors:
                path.unlink(missing_ok=True)

    def _keep_best_force_epoch(self, run_dir: Path, model_file: Path) -> tuple[int | None, str]:
        """Put the weights of the epoch with the lowest validation force MAE into mace's
        saved model (``model_file``, which holds the latest epoch's) and delete the other
        checkpoints. Returns that epoch and how it was chosen."""
        import torch

        errors = self._val_force_errors(run_dir)
        files = self._checkpoint_files(run_dir)
        candidates = {epoch: error for epoch, error in errors.items() if epoch in files}
        best = best_epoch(candidates)
        if best is None:
            log.warning("mace full fine-tune: no finite validation force error; keeping its model")
            return None, "mace's latest model (no finite validation force MAE)"
        if any(errors[e] < candidates[best] for e in errors):  # pruning kept the best always
            raise RuntimeError(f"the checkpoint of the best epoch is missing from {run_dir}")
        # A checkpoint is a dict of state dicts: the safe loader reads it.
        state = torch.load(files[best], map_location="cpu", weights_only=True)["model"]
        dtype = self.params.default_dtype
        model = load_mace_model(model_file, sha256_file(model_file), device="cpu",
                                default_dtype=dtype)  # fmt: skip
        model.load_state_dict(state)
        _save_mace(model, model_file, dtype)
        for epoch, path in files.items():
            if epoch != best:
                path.unlink(missing_ok=True)
        # mace's other copies of its latest model (in checkpoints/, and TorchScript-compiled)
        # are not the model kept: remove them rather than leave them to be mistaken for it.
        stale = [*(run_dir / "checkpoints").glob(f"{RUN_NAME}*.model"),
                 *run_dir.glob(f"{RUN_NAME}*_compiled.model")]  # fmt: skip
        for path in stale:
            path.unlink(missing_ok=True)
        return best, SELECTED_BY_FORCE

    def _full_schedule(self, loss: str) -> dict[str, Any]:
        p = self.params
        gamma = exponential_gamma(p.learning_rate, p.epochs)
        return {
            "optimizer": "adam (amsgrad: mace's command line cannot turn it off)",
            "loss": f"mace '{loss}' (MSE)",
            "scheduler": "ExponentialLR (mace has no cosine schedule)",
            "gamma": gamma,
            "learning_rate_start": p.learning_rate,
            "learning_rate_end": p.learning_rate * gamma ** (p.epochs - 1),
            "weight_decay": 0.0,
            "clip_grad": None,
        }

    # -- linear correction -----------------------------------------------------------------

    def _linear_terms(
        self,
        foundation: _Foundation,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
    ) -> tuple[LinearTerms, LinearTerms | None]:
        f = foundation
        check_scalable(f.model, len(f.heads))
        with torch_threads(self.params.cpu_threads):
            train = LinearTerms.collect(f.potential, train_set, f.zs, f.references())
            val = (
                LinearTerms.collect(f.potential, val_set, f.zs, f.references()) if val_set else None
            )
        return train, val

    def _bake(
        self,
        foundation: _Foundation,
        scale: float,
        shift: np.ndarray | None,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
    ) -> dict[str, Any]:
        """The E0 shift into the head's E0s, the scale into its interaction energy."""
        import torch

        f = foundation
        model = f.model
        with torch.no_grad():
            if shift is not None:
                energies = model.atomic_energies_fn.atomic_energies
                delta = torch.as_tensor(shift, dtype=energies.dtype)
                if energies.ndim == 2:
                    energies[f.head_index] += delta
                else:
                    energies += delta
            scale_interaction_energy(model, scale, f.head_index, len(f.heads))
        saved_e0s = self._e0s(model, f.head_index)
        data_zs = {int(z) for ls in [*train_set, *val_set] for z in ls.atoms.numbers}
        return {
            "finetuning": None,
            "heads": f.heads,
            "head": f.head,
            "e0s": {chemical_symbols[z]: e for z, e in saved_e0s.items()},
            "e0_shift_eV": {
                chemical_symbols[z]: float(c)
                for z, c in zip(f.zs, shift, strict=True)
                if z in data_zs
            }
            if shift is not None
            else {},
            "elements": [chemical_symbols[z] for z in sorted(saved_e0s)],
        }

    def _baked_terms(
        self,
        foundation: _Foundation,
        checkpoint: Path,
        checkpoint_sha256: str,
        first: LabelledStructure,
    ) -> LinearTerms:
        f = foundation
        tuned = MACEPotential(
            MACEPotential.Params(model_path=checkpoint, model_sha256=checkpoint_sha256,
                                 head=f.head, device="cpu", default_dtype="float64")
        )  # fmt: skip
        with torch_threads(self.params.cpu_threads):
            return LinearTerms.collect(tuned, [first], f.zs, f.references())

    # -- mace's records ----------------------------------------------------------------------

    @staticmethod
    def _log_text(run_dir: Path) -> str:
        logs = sorted((run_dir / "logs").glob(f"{RUN_NAME}*.log"))
        main = [path for path in logs if not path.name.endswith("_debug.log")]
        return "\n".join(path.read_text(errors="replace") for path in main)

    @staticmethod
    def _history(run_dir: Path) -> dict[str, Any]:
        """Per-epoch train loss (mean over the epoch's optimiser steps) and validation loss
        and errors of each head, from mace's results file (JSON lines)."""
        results = sorted((run_dir / "results").glob(f"{RUN_NAME}*_train.txt"))
        train: dict[int, list[float]] = {}
        valid: dict[str, dict[Any, dict[str, Any]]] = {}
        for path in results:
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("mode") == "opt":
                    train.setdefault(int(record["epoch"]), []).append(float(record["loss"]))
                elif record.get("mode") == "eval":
                    head = str(record.get("head", FINETUNE_HEAD))
                    epoch = record.get("epoch")
                    valid.setdefault(head, {})[epoch] = {
                        key: _number(record.get(key))
                        for key in ("loss", "rmse_e_per_atom", "rmse_f", "mae_f", "rmse_stress")
                    }
        epochs = []
        for epoch in sorted(train):
            entry: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(train[epoch]))}
            for head, per_epoch in valid.items():
                if epoch in per_epoch:
                    suffix = "" if head == FINETUNE_HEAD else f"_{head}"
                    entry[f"val_loss{suffix}"] = per_epoch[epoch]["loss"]
                    entry[f"val_rmse_f{suffix}"] = per_epoch[epoch]["rmse_f"]
                    entry[f"val_mae_f{suffix}"] = per_epoch[epoch]["mae_f"]
                    entry[f"val_rmse_e_per_atom{suffix}"] = per_epoch[epoch]["rmse_e_per_atom"]
            epochs.append(entry)
        initial = valid.get(FINETUNE_HEAD, {}).get(None)
        finite = [
            e for e in epochs if e.get("val_loss") is not None and math.isfinite(e["val_loss"])
        ]
        best = min(finite, key=lambda e: e["val_loss"]) if finite else None
        return {
            "epochs": epochs,
            "initial_val": initial,  # the foundation with the new E0s, before any step
            "best_val_loss": best["val_loss"] if best else None,
            "final_train_loss": epochs[-1]["train_loss"] if epochs else None,
        }

    @classmethod
    def _best_epoch_from_checkpoints(cls, run_dir: Path) -> int | None:
        """The epoch of the checkpoint mace kept and saved as the model: mace saves one when
        the fine-tuning head's validation loss improves and deletes the one before."""
        return max(cls._checkpoint_files(run_dir), default=None)


def exponential_gamma(learning_rate: float, epochs: int) -> float:
    """The ExponentialLR factor that takes ``learning_rate`` to the paper's final 1e-5 on the
    last of ``epochs`` epochs (mace steps the scheduler before every epoch but the first)."""
    if epochs < 2:
        return 1.0
    return (PAPER_FINAL_LEARNING_RATE / learning_rate) ** (1.0 / (epochs - 1))


def check_scalable(model: Any, n_heads: int) -> None:
    """Refuse models whose non-E0 energy :func:`scale_interaction_energy` cannot scale."""
    if hasattr(model, "embedding_readout"):
        raise ValueError(
            "linear_correction: this MACE adds an embedding-readout energy to the E0s, outside "
            "the scaled interaction energy; it is not supported"
        )
    if hasattr(model, "scale_shift"):
        return
    if n_heads > 1:
        raise ValueError(
            "linear_correction: a multi-head MACE without a scale_shift block cannot have one "
            "head's energy scaled (its readouts are shared)"
        )
    if hasattr(model, "pair_repulsion"):
        raise ValueError(
            "linear_correction: a MACE without a scale_shift block adds its ZBL pair repulsion "
            "outside the readouts, with no factor to scale"
        )


def scale_interaction_energy(model: Any, scale: float, head_index: int, n_heads: int) -> None:
    """Multiply the MACE model's energy minus its E0s (and so forces, stress) by ``scale``.

    mace 0.3's ``ScaleShiftMACE.forward``: E = sum_i E0(Z_i) + sum_i [scale * (pair_i +
    sum_readouts e_i) + shift] (``ScaleShiftBlock``: ``scale[head] * x + shift[head]``), so
    multiplying ``scale`` and ``shift`` of the head by ``s`` multiplies the interaction energy
    by ``s``. A scale/shift shared by several heads becomes a per-head vector first. Plain
    ``MACE``: E = sum E0 + pair + sum over readouts, each ending in a linear layer; scaling that
    layer's weights (and bias) scales its energy (refused with a pair repulsion or several
    heads, see :func:`check_scalable`)."""
    import torch

    check_scalable(model, n_heads)
    with torch.no_grad():
        block = getattr(model, "scale_shift", None)
        if block is not None:
            for name in ("scale", "shift"):
                value = getattr(block, name).detach().clone()
                if n_heads > 1:
                    if value.numel() == 1:
                        value = value.reshape(1).repeat(n_heads)
                    value[head_index] *= scale
                else:
                    value = value * scale
                setattr(block, name, value)
            return
        for readout in model.readouts:
            layer = getattr(readout, "linear_2", None)
            if layer is None:
                layer = getattr(readout, "linear", None)
            if layer is None:
                raise TypeError(f"unexpected MACE readout {type(readout).__name__}")
            for param in layer.parameters():
                param.mul_(scale)


def _save_mace(model: Any, path: Path, default_dtype: str) -> None:
    """Save the module the way mace's run_train does (``torch.save`` of the whole module, on
    the CPU, in the training dtype), trainable again so it can be fine-tuned further."""
    import torch

    model = model.float() if default_dtype == "float32" else model.double()
    model.to("cpu")
    model.requires_grad_(True)
    torch.save(model, path)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
