"""What every trainer does the same way; each family supplies its library's part as hooks.

``TrainerBase.train``:

1. refuses an empty training set or a structure without labels, before any model loads;
2. ``_load_base``: the family loads and verifies its base model and checks the data fits it;
3. by ``params.mode`` (see ``pestle.trainers.modes``):

   * ``linear_correction``: ``_linear_terms`` of both sets, the closed-form fit of
     ``pestle.trainers.linear``, ``_bake`` (scale and reference shift into the model),
     ``_save``, and ``_baked_terms`` of the saved model checked against the fit;
   * ``custom`` / ``full``: ``_train`` runs the library's own training (CHGNet's Trainer,
     mace's run_train, matgl's Lightning module) and keeps the epoch :class:`BestEpoch`
     chooses, then ``_save``;

4. the checkpoint's sha256 (``_checksum``), ``_after_save`` (the family's checks of and
   entries about the saved model), the metrics and the ``TrainedModel``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
from ase import Atoms
from pydantic import BaseModel

# The checkpoint checksum and its error, for every family (one import to move when they get a
# module of their own in pestle.potentials).
from pestle.plugins import Resources
from pestle.potentials.checkpoints import ChecksumError, sha256_file
from pestle.trainers import LabelledStructure, TrainedModel, reference_results
from pestle.trainers.linear import (
    LinearTerms,
    ScaleFit,
    ScaleTerms,
    check_baked,
    check_one_scale,
    check_scaled,
    fit_linear_scale,
    fit_scales,
    linear_metrics,
    scale_metrics,
)

__all__ = [
    "SELECTED_BY_FORCE",
    "SELECTED_BY_LOSS",
    "SELECTED_BY_WORST_SYSTEM",
    "BestEpoch",
    "ChecksumError",
    "FineTuned",
    "TrainerBase",
    "best_epoch",
    "check_sets",
    "sha256_file",
    "torch_threads",
]

Base = TypeVar("Base")  # the family's loaded base model and what the run learns about it

SELECTED_BY_FORCE = "lowest validation force MAE"
SELECTED_BY_LOSS = "lowest validation loss"
SELECTED_BY_WORST_SYSTEM = (
    "lowest worst-system validation force MAE ratio to the base model (the base model kept "
    "unless an epoch makes every system better)"
)


def check_sets(
    train_set: Sequence[LabelledStructure], val_set: Sequence[LabelledStructure], family: str
) -> None:
    """What no family can train on: an empty training set, or a structure (in either set)
    without a reference energy and forces of the right shape. Errors name the set, the
    structure and the label."""
    if not train_set:
        raise ValueError(f"cannot fine-tune {family} on an empty training set")
    for name, labelled in (("train_set", train_set), ("val_set", val_set)):
        for ls in labelled:
            try:
                reference_results(ls)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None


def best_epoch(scores: Mapping[int, float]) -> int | None:
    """The epoch with the lowest finite score, the earliest on ties; None without one."""
    finite = {epoch: score for epoch, score in scores.items() if math.isfinite(score)}
    return min(finite, key=lambda epoch: (finite[epoch], epoch)) if finite else None


class BestEpoch:
    """The epoch a fine-tune keeps, chosen while it runs: by default the lowest validation
    force MAE in ``full`` (Deng et al. 2025), the lowest validation loss otherwise; the
    earliest on ties, and never one with a non-finite score or loss (a NaN step leaves no
    weights worth keeping). ``epoch`` is None until one qualifies.

    ``by="worst_system"``: the score is the largest, over the validation set's chemical
    systems, of the epoch's force MAE over the base model's on the same structures; it starts
    at 1 (the base model itself), so an epoch is kept only if it leaves every system better
    than the base model, and ``epoch`` stays None (keep the base) otherwise.
    ``by="last"``: the last epoch with finite losses."""

    def __init__(self, mode: str, by: str = "auto") -> None:
        if by == "auto":
            by = "val_force_mae" if mode == "full" else "val_loss"
        if by not in ("val_force_mae", "val_loss", "worst_system", "last"):
            raise ValueError(f"unknown epoch selection {by!r}")
        self.by = by
        self.by_force = by == "val_force_mae"
        self.epoch: int | None = None
        self.score = 1.0 if by == "worst_system" else math.inf

    @property
    def criterion(self) -> str:
        return {
            "val_force_mae": SELECTED_BY_FORCE,
            "val_loss": SELECTED_BY_LOSS,
            "worst_system": SELECTED_BY_WORST_SYSTEM,
            "last": "the last epoch",
        }[self.by]

    def offer(
        self,
        epoch: int,
        *,
        val_loss: float | None,
        val_force_mae: float | None,
        worst_system_ratio: float | None = None,
    ) -> bool:
        """Weigh one epoch's validation results; True when it is the best so far (the caller
        keeps its weights then). ``val_loss`` None: the library reports no loss to check."""
        score = {
            "val_force_mae": val_force_mae,
            "val_loss": val_loss,
            "worst_system": worst_system_ratio,
            "last": -float(epoch),
        }[self.by]
        if score is None or not math.isfinite(score):
            return False
        if val_loss is not None and not math.isfinite(val_loss):
            return False
        if score < self.score:
            self.epoch, self.score = epoch, score
            return True
        return False

    def waited(self, epoch: int) -> int:
        """Epochs since the last improvement (since the start when none)."""
        return epoch - (self.epoch if self.epoch is not None else -1)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside (it is process-wide), restored after."""
    import torch

    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class FineTuned:
    """What a family's own training (``custom`` / ``full``) reports: the epochs as its library
    records them, the epoch kept and how it was chosen, and the family's own metrics entries."""

    epochs: list[dict[str, Any]]
    best_epoch: int | None
    best_val_loss: float | None
    selection: str
    metrics: dict[str, Any] = field(default_factory=dict)


class TrainerBase(ABC, Generic[Base]):
    """A fine-tuning family: ``train`` is the same for all; the hooks below are its own.

    Subclasses set ``family`` (names the model in messages and logs), ``potential_name`` (the
    registered Potential that loads the checkpoint), ``baked_into`` (what the linear
    correction is baked into, for the check's error), and a nested ``Params`` with ``mode``,
    ``energy_weight``, ``force_weight``, ``stress_weight``."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    family: ClassVar[str]
    potential_name: ClassVar[str]
    baked_into: ClassVar[str]
    # Tolerance (relative) of the check that the saved model predicts what the fit assumed.
    baked_rtol: ClassVar[float] = 1e-4

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params: Any = params if params is not None else self.Params()
        # The campaign's seed structures of the current ``train`` call (replay uses them).
        self.seeds: list[Atoms] = []

    def resources(self) -> Resources:
        """One worker core, and a GPU when the cluster has one (else the CPU)."""
        return Resources(cpus=1, gpus=1)

    def train(
        self,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        device: str = "cpu",
        *,
        seeds: Sequence[Atoms] = (),
    ) -> TrainedModel:
        """``seeds``: the campaign's seed structures (near-equilibrium crystals), for the
        families and options that use them (replay); ignored otherwise."""
        from pestle.devices import pick_device

        check_sets(train_set, val_set, self.family)
        self.seeds = [atoms.copy() for atoms in seeds]
        # Resolved: libraries driven in a child process or with their own root see it too.
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        device = pick_device(device)
        base = self._load_base(train_set, val_set, workdir)
        if self.params.mode == "linear_correction":
            # One scalar in closed form: no optimiser, no device worth moving to.
            return self._linear_correction(base, train_set, val_set, workdir)
        return self._fine_tune(base, train_set, val_set, workdir, device)

    # -- the two flows -----------------------------------------------------------------------

    def _fine_tune(
        self,
        base: Base,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        device: str,
    ) -> TrainedModel:
        run = self._train(base, train_set, val_set, workdir, device)
        checkpoint = self._save(base, workdir, best_epoch=run.best_epoch)
        checkpoint_sha256 = self._checksum(checkpoint)
        metrics: dict[str, Any] = {
            "mode": self.params.mode,
            "epochs": run.epochs,
            "best_epoch": run.best_epoch,
            "best_val_loss": run.best_val_loss,
            "selection": run.selection,
            # An empty validation set: the epochs are judged on the training set.
            "val_source": "val_set" if val_set else "train_set (val_set was empty)",
            "n_train": len(train_set),
            "n_val": len(val_set) if val_set else len(train_set),
            **run.metrics,
            **self._after_save(base, checkpoint, checkpoint_sha256),
            "device": device,
            "checkpoint_sha256": checkpoint_sha256,
        }
        return self._trained_model(base, checkpoint, metrics)

    def _linear_correction(
        self,
        base: Base,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
    ) -> TrainedModel:
        """Deng et al.'s linear correction: one scale on the energy without the element
        references, fitted in closed form (with the references' shift when the family
        refits them), baked into the model, saved, and the saved model checked.

        ``linear_scope`` (where the family offers it): ``model`` is the paper's one scale,
        refused when the chemical systems' own scales disagree beyond their intervals;
        ``system`` / ``element`` fit one scale per chemical system / per element jointly and
        save a model that applies them (``_save_scaled``)."""
        from pestle.structures import chemical_system

        p = self.params
        scope = getattr(p, "linear_scope", "model")
        ridge = float(getattr(p, "linear_ridge", 0.0))
        train, val = self._linear_terms(base, train_set, val_set)
        weights = {
            "e": p.energy_weight,
            "f": p.force_weight,
            "s": p.stress_weight if train.s_ref.size else 0.0,
        }
        systems = [chemical_system(ls.atoms) for ls in train_set]
        # Every scope fits each system's own scale first: the refusal of one model-wide
        # scale rests on it, and every scope reports it.
        per_system = fit_scales(ScaleTerms.by_system(train, systems), weights,
                                refit_references=self.refit_references, scope="system")  # fmt: skip
        if scope != "model":
            return self._scoped_correction(base, train_set, val_set, workdir, scope, ridge,
                                           train, val, weights, per_system)  # fmt: skip
        if len(per_system.groups) > 1:
            check_one_scale(per_system)
        scale, shift = fit_linear_scale(train, weights, refit_references=self.refit_references)
        baked = self._bake(base, scale, shift, train_set, val_set)
        checkpoint = self._save(base, workdir, linear_scale=scale)
        checkpoint_sha256 = self._checksum(checkpoint)
        after = self._baked_terms(base, checkpoint, checkpoint_sha256, train_set[0])
        check_baked(after, train, scale, shift, what=self.baked_into, rtol=self.baked_rtol)
        metrics: dict[str, Any] = {
            **linear_metrics(train, val, scale, shift, weights),
            "linear_scope": "model",
            "system_scales": per_system.as_dict(),
            **linear_facts(p.mode, train_set, val_set, weights),
            **baked,
            **self._after_save(base, checkpoint, checkpoint_sha256),
            "device": "cpu",
            "checkpoint_sha256": checkpoint_sha256,
        }
        logging.getLogger(type(self).__module__).info(
            "%s linear correction: scale %.5f on %d structures", self.family, scale, len(train_set)
        )
        return self._trained_model(base, checkpoint, metrics)

    def _scoped_correction(
        self,
        base: Base,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        scope: str,
        ridge: float,
        train: LinearTerms,
        val: LinearTerms | None,
        weights: dict[str, float],
        per_system: ScaleFit,
    ) -> TrainedModel:
        """One scale per chemical system or element, fitted jointly (with the reference
        shift), saved by the family with the scales applied, and the saved model checked
        against the fit on the first training structure."""
        p = self.params
        st_train, st_val = self._scale_terms(base, train_set, val_set, scope, train, val)
        fit = fit_scales(st_train, weights, refit_references=self.refit_references,
                         scope=scope, ridge=ridge)  # fmt: skip
        checkpoint, potential, extra = self._save_scaled(base, workdir, fit, train_set)
        checkpoint_sha256 = self._checksum(checkpoint)
        after = self._scaled_terms(checkpoint, checkpoint_sha256, train_set[0])
        check_scaled(after, st_train.structures([0]), fit, rtol=self.baked_rtol)
        metrics: dict[str, Any] = {
            **scale_metrics(fit, st_train, st_val, weights),
            "system_scales": per_system.as_dict(),
            **linear_facts(p.mode, train_set, val_set, weights),
            **extra,
            "device": "cpu",
            "checkpoint_sha256": checkpoint_sha256,
        }
        logging.getLogger(type(self).__module__).info(
            "%s linear correction per %s: %s", self.family, scope,
            "; ".join(fit.text(g) for g in fit.groups),
        )  # fmt: skip
        return self._trained_model(base, checkpoint, metrics, potential=potential)

    def _trained_model(
        self,
        base: Base,
        checkpoint: Path,
        metrics: dict[str, Any],
        potential: str | None = None,
    ) -> TrainedModel:
        return TrainedModel(
            checkpoint=checkpoint,
            potential=potential or self.potential_name,
            potential_params=self._potential_params(base),
            hyperparameters=self.params.model_dump(mode="json"),
            metrics=metrics,
        )

    # -- hooks -------------------------------------------------------------------------------

    @abstractmethod
    def _load_base(
        self,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
    ) -> Base:
        """Load (and verify) the base model; refuse data it cannot be fine-tuned on."""

    @property
    @abstractmethod
    def refit_references(self) -> bool:
        """Whether the per-element reference energies are refitted to the labels."""

    @abstractmethod
    def _linear_terms(
        self,
        base: Base,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
    ) -> tuple[LinearTerms, LinearTerms | None]:
        """The base model's linear terms on the training set and (when not empty) the
        validation set, in the units of the family's loss."""

    @abstractmethod
    def _bake(
        self,
        base: Base,
        scale: float,
        shift: np.ndarray | None,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
    ) -> dict[str, Any]:
        """Put the fitted scale (and reference ``shift``, in the order of the terms'
        features) into the model; returns the family's own metrics entries."""

    @abstractmethod
    def _baked_terms(
        self, base: Base, checkpoint: Path, checkpoint_sha256: str, first: LabelledStructure
    ) -> LinearTerms:
        """The linear terms of the first training structure from the baked model (as saved,
        where the family can load it back)."""

    def _scale_terms(
        self,
        base: Base,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        scope: str,
        train: LinearTerms,
        val: LinearTerms | None,
    ) -> tuple[ScaleTerms, ScaleTerms | None]:
        """The linear terms split per group: per chemical system from the totals (every
        family); per element only where the family splits its energy into site energies."""
        from pestle.structures import chemical_system

        if scope != "system":
            raise ValueError(f"{self.family} offers no linear correction per {scope}")
        groups = sorted({chemical_system(ls.atoms) for ls in train_set})
        st_train = ScaleTerms.by_system(train, [chemical_system(ls.atoms) for ls in train_set])
        st_val = (
            ScaleTerms.by_system(val, [chemical_system(ls.atoms) for ls in val_set], groups)
            if val is not None
            else None
        )
        return st_train, st_val

    def _save_scaled(
        self, base: Base, workdir: Path, fit: ScaleFit, train_set: Sequence[LabelledStructure]
    ) -> tuple[Path, str, dict[str, Any]]:
        """Save the base with the reference shift baked in and the scales applied by a
        model that loads the file: (checkpoint, registered potential name, metrics)."""
        raise ValueError(f"{self.family} offers no linear correction per {fit.scope}")

    def _scaled_terms(
        self, checkpoint: Path, checkpoint_sha256: str, first: LabelledStructure
    ) -> LinearTerms:
        """The saved scaled model's terms of the first training structure (totals)."""
        raise NotImplementedError

    @abstractmethod
    def _train(
        self,
        base: Base,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        device: str,
    ) -> FineTuned:
        """Fine-tune with the library's own training; leave the kept epoch's weights in the
        model (or in the file the library saved)."""

    @abstractmethod
    def _save(
        self,
        base: Base,
        workdir: Path,
        *,
        best_epoch: int | None = None,
        linear_scale: float | None = None,
    ) -> Path:
        """Write the checkpoint the family's Potential loads; returns its path."""

    def _checksum(self, checkpoint: Path) -> str:
        return sha256_file(checkpoint)

    def _after_save(self, base: Base, checkpoint: Path, checkpoint_sha256: str) -> dict[str, Any]:
        """Check the saved model; returns the family's metrics entries about it."""
        return {}

    @abstractmethod
    def _potential_params(self, base: Base) -> dict[str, Any]:
        """Params of ``potential_name`` that load the checkpoint (besides its path)."""


def linear_facts(
    mode: str,
    train_set: Sequence[LabelledStructure],
    val_set: Sequence[LabelledStructure],
    weights: dict[str, float],
) -> dict[str, Any]:
    """What every linear correction records of its data, whatever its scope."""
    return {
        "mode": mode,
        "val_source": "val_set" if val_set else "none (val_set was empty)",
        "n_train": len(train_set),
        "n_val": len(val_set),
        "targets": "efs" if weights["s"] > 0 else "ef",
    }
