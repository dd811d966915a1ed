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
the copy is verified against ``foundation_model_sha256`` (or accepted because
``trust_model_file`` says so) before mace or we unpickle it, so the file mace loads is the
file we checked.

Level of theory: with ``e0s: refit`` we shift the foundation's isolated-atom energies (E0s)
by a least-squares fit over compositions of the label-minus-foundation energy residuals on
the training set, as mace's ``--E0s=estimated`` does, and pass them to mace as a dict. We
fit them ourselves so that elements absent from the training set keep their foundation E0s
when ``keep_foundation_elements`` is on (mace's estimate covers only the training elements
and would leave the others at 0 eV).

Multihead fine-tuning: mace switches multihead replay off *silently* for a local foundation
file unless ``--pt_train_file`` names the pretraining data, and then fine-tunes naively. We
refuse ``mode: multihead`` without ``replay_file`` and, after training, check that the saved
model has mace's ``pt_head`` beside the fine-tuned head (and that mace's log says it used
the multihead mode); otherwise the run fails instead of passing off a naive fine-tune.
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
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pestle.potentials.chgnet import ChecksumError, sha256_file
from pestle.potentials.mace import MACEPotential, choose_head, load_mace_model, mace_version
from pestle.trainers import TRAINERS, LabelledStructure, TrainedModel

log = logging.getLogger("pestle.trainers.mace")

RUN_NAME = "mace_finetuned"
CHECKPOINT_NAME = f"{RUN_NAME}.model"
FINETUNE_HEAD = "Default"  # the head mace gives the fine-tuning data (prepare_default_head)
REPLAY_HEAD = "pt_head"  # the head mace trains on the replay data in multihead mode
MULTIHEAD_LOG_LINE = "Using multiheads finetuning mode"


def reference_labels(ls: LabelledStructure) -> tuple[float, np.ndarray, np.ndarray | None]:
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
        if stress.shape != (6,):
            raise ValueError(f"{where}: stress has shape {stress.shape}, not (6,) or (3, 3)")
        if not np.all(ls.atoms.pbc):
            stress = None  # no volume, no stress
    return float(results["energy"]), forces, stress


def composition_matrix(structures: Sequence[Atoms], numbers: Sequence[int]) -> np.ndarray:
    """Atom counts per structure (rows) and element (columns, in ``numbers`` order)."""
    column = {int(z): i for i, z in enumerate(numbers)}
    counts = np.zeros((len(structures), len(numbers)))
    for row, atoms in enumerate(structures):
        for z in atoms.numbers:
            counts[row, column[int(z)]] += 1
    return counts


def least_squares_shift(
    structures: Sequence[Atoms], residuals: Sequence[float], numbers: Sequence[int]
) -> np.ndarray:
    """Per-element energies c minimising |counts @ c - residuals|; the minimum-norm solution,
    so an element absent from ``structures`` gets 0 and elements that always appear in the
    same ratio (Li and F in LiF) share their sum equally."""
    counts = composition_matrix(structures, numbers)
    shift, *_ = np.linalg.lstsq(counts, np.asarray(residuals, dtype=float), rcond=None)
    return shift


def _labelled_frame(ls: LabelledStructure) -> Atoms:
    """A clean copy of the geometry with the labels under mace's REF_ keys."""
    energy, forces, stress = reference_labels(ls)
    atoms = Atoms(
        numbers=ls.atoms.numbers, positions=ls.atoms.positions, cell=ls.atoms.cell, pbc=ls.atoms.pbc
    )
    atoms.info["REF_energy"] = energy
    atoms.arrays["REF_forces"] = forces
    if stress is not None:
        atoms.info["REF_stress"] = stress
    atoms.info["pestle_structure_id"] = str(ls.structure_id)
    atoms.info["pestle_label_id"] = str(ls.label_id)
    return atoms


def _replay_frames(path: Path, limit: int | None, seed: int) -> list[Atoms]:
    """The pretraining (replay) structures with their labels under REF_ keys.

    Accepts extended XYZ (or anything ASE reads) whose labels sit either under the REF_ keys
    or in the calculator results ASE makes of plain ``energy``/``forces``/``stress`` keys.
    """
    from ase.io import read

    frames = read(path, index=":")
    if not frames:
        raise ValueError(f"replay file {path} holds no structures")
    if limit is not None and len(frames) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(frames), limit, replace=False))
        frames = [frames[i] for i in keep]
    out = []
    for index, atoms in enumerate(frames):
        results = atoms.calc.results if atoms.calc is not None else {}
        energy = atoms.info.get("REF_energy", results.get("energy"))
        forces = atoms.arrays.get("REF_forces", results.get("forces"))
        stress = atoms.info.get("REF_stress", results.get("stress"))
        if energy is None or forces is None:
            raise ValueError(
                f"replay file {path}: structure {index} has no energy or forces (looked for "
                "REF_energy/REF_forces and for ASE calculator results)"
            )
        frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell,
                      pbc=atoms.pbc)  # fmt: skip
        frame.info["REF_energy"] = float(energy)
        frame.arrays["REF_forces"] = np.asarray(forces, dtype=float)
        if stress is not None and np.all(atoms.pbc):
            frame.info["REF_stress"] = np.asarray(stress, dtype=float).reshape(-1)
        for key in ("config_type", "config_weight"):
            if key in atoms.info:
                frame.info[key] = atoms.info[key]
        out.append(frame)
    return out


def _write_extxyz(path: Path, frames: Sequence[Atoms]) -> Path:
    from ase.io import write

    write(path, list(frames), format="extxyz")
    return path


@TRAINERS.register("mace")
class MACETrainer:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        foundation_model: Path  # a MACE .model file (a MACE-MP download or your own)
        foundation_model_sha256: str | None = None
        # .model files are pickles: without a sha256, using one needs this explicit opt-in.
        trust_model_file: bool = False
        foundation_head: str | None = None  # which head of a multi-head foundation to start from
        mode: Literal["naive", "multihead"] = "naive"
        replay_file: Path | None = None  # pretraining data for multihead replay (extxyz)
        replay_max_structures: int | None = Field(None, ge=1)  # random subset of the replay
        replay_weight: float = Field(1.0, ge=0)  # mace's --weight_pt_head
        # refit: foundation E0s shifted by a least-squares fit to the labels (new level of
        # theory); foundation: keep the foundation's E0s (same level of theory).
        e0s: Literal["refit", "foundation"] = "refit"
        # Keep every element of the foundation (else mace keeps only the training elements).
        keep_foundation_elements: bool = True
        epochs: int = Field(10, ge=1)
        learning_rate: float = Field(1e-3, gt=0)
        batch_size: int = Field(4, ge=1)
        # mace's own defaults: its loss weighs forces 100x the per-atom energy.
        energy_weight: float = Field(1.0, ge=0)
        force_weight: float = Field(100.0, ge=0)
        stress_weight: float = Field(1.0, ge=0)
        ema: bool = False  # exponential moving average of the weights (mace's --ema)
        ema_decay: float = Field(0.99, gt=0, lt=1)
        default_dtype: Literal["float32", "float64"] = "float64"
        seed: int = 0
        # Threads of mace's training process (OMP_NUM_THREADS); None: torch's default. One
        # thread is fastest for small models on a busy CPU.
        cpu_threads: int | None = Field(None, ge=1)

        @field_validator("foundation_model_sha256")
        @classmethod
        def _hex_digest(cls, value: str | None) -> str | None:
            if value is None:
                return None
            value = value.strip().lower()
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError("foundation_model_sha256 must be 64 hexadecimal characters")
            return value

        @model_validator(mode="after")
        def _replay_for_multihead(self) -> MACETrainer.Params:
            if self.mode == "multihead" and self.replay_file is None:
                raise ValueError(
                    "mode 'multihead' needs replay_file (the pretraining data, passed to mace "
                    "as --pt_train_file): without it mace silently turns multihead replay off "
                    "for a local foundation model and fine-tunes naively. Set replay_file, or "
                    "use mode 'naive'"
                )
            if self.mode == "naive" and self.replay_file is not None:
                raise ValueError("replay_file is only used with mode 'multihead'")
            return self

    def __init__(self, params: Params) -> None:
        self.params = params
        self._foundation_head: str | None = None

    def train(
        self,
        train_set: Sequence[LabelledStructure],
        val_set: Sequence[LabelledStructure],
        workdir: Path,
        device: str = "cpu",
    ) -> TrainedModel:
        from pestle.devices import pick_device

        p = self.params
        if not train_set:
            raise ValueError("cannot fine-tune MACE on an empty training set")
        if p.mode == "multihead" and p.replay_file is None:  # Params refuses it; belt and braces
            raise ValueError("mode 'multihead' needs replay_file")
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        device = pick_device(device)
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
        foundation_e0s = self._e0s(model, foundation_heads.index(head))

        train_frames = [_labelled_frame(ls) for ls in train_set]
        val_source = "val_set" if val_set else "train_set (val_set was empty)"
        val_frames = [_labelled_frame(ls) for ls in val_set] if val_set else train_frames
        replay_frames = (
            _replay_frames(p.replay_file, p.replay_max_structures, p.seed)
            if p.mode == "multihead" and p.replay_file is not None
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
        model_zs = (
            sorted(foundation_zs) if p.keep_foundation_elements else sorted(data_zs | replay_zs)
        )

        e0_shift: dict[str, float] = {}
        if p.e0s == "refit":
            structures = [ls.atoms for ls in train_set]
            predicted = [pred.energy for pred in base.predict(structures)]
            residuals = [
                reference_labels(ls)[0] - e for ls, e in zip(train_set, predicted, strict=True)
            ]
            shift = least_squares_shift(structures, residuals, model_zs)
            e0s = {z: foundation_e0s[z] + float(c) for z, c in zip(model_zs, shift, strict=True)}
            e0_shift = {chemical_symbols[z]: float(c) for z, c in zip(model_zs, shift, strict=True)
                        if z in data_zs}  # fmt: skip
        else:
            e0s = {z: foundation_e0s[z] for z in model_zs}
        del model, base

        train_file = _write_extxyz(run_dir / "train.xyz", train_frames)
        valid_file = _write_extxyz(run_dir / "valid.xyz", val_frames)
        replay_file = (
            _write_extxyz(run_dir / "replay.xyz", replay_frames) if replay_frames else None
        )
        has_stress = any("REF_stress" in f.info for f in train_frames)
        loss = "stress" if has_stress and p.stress_weight > 0 else "weighted"

        argv = self._argv(run_dir, foundation, train_file, valid_file, replay_file, e0s, loss,
                          device)  # fmt: skip
        self._run(argv, run_dir, device)

        checkpoint = run_dir / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise RuntimeError(
                f"mace finished without writing {checkpoint}; see {run_dir / 'logs'}"
            )
        checkpoint_sha256 = sha256_file(checkpoint)
        tuned = load_mace_model(checkpoint, checkpoint_sha256, device="cpu")
        heads = [str(h) for h in getattr(tuned, "heads", [FINETUNE_HEAD])]
        saved_e0s = self._e0s(tuned, heads.index(FINETUNE_HEAD))
        del tuned
        log_text = self._log_text(run_dir)
        multihead_used = REPLAY_HEAD in heads and MULTIHEAD_LOG_LINE in log_text
        if p.mode == "multihead" and not multihead_used:
            raise RuntimeError(
                f"mace did not fine-tune in multihead mode with replay (heads of the saved "
                f"model: {heads}); see the log in {run_dir / 'logs'}"
            )
        if p.mode == "naive" and REPLAY_HEAD in heads:
            raise RuntimeError(f"mace trained a replay head in naive mode (heads: {heads})")

        foundation_sha256 = sha256_file(foundation)
        foundation.unlink()  # only a verified copy; the checkpoints dir holds mace's own
        history = self._history(run_dir)
        best_epoch = self._best_epoch_from_checkpoints(run_dir)
        hyperparameters = p.model_dump(mode="json")
        metrics: dict[str, Any] = {
            **history,
            "best_epoch": best_epoch,
            "selection": "lowest validation loss of the fine-tuning head (mace's checkpoint)",
            "val_source": val_source,
            "n_train": len(train_frames),
            "n_val": len(val_frames),
            "n_replay": len(replay_frames),
            "mode": p.mode,
            "multihead_replay": multihead_used,
            "heads": heads,
            "loss": "universal" if multihead_used else loss,
            "e0s": {chemical_symbols[z]: e for z, e in saved_e0s.items()},
            "e0_shift_eV": e0_shift,
            "elements": [chemical_symbols[z] for z in sorted(saved_e0s)],
            "device": device,
            "foundation_sha256": foundation_sha256,
            "checkpoint_sha256": checkpoint_sha256,
            "mace_version": mace_version(),
            "argv": argv,
        }
        return TrainedModel(
            checkpoint=checkpoint,
            potential="mace",
            potential_params={"head": FINETUNE_HEAD, "default_dtype": p.default_dtype},
            hyperparameters=hyperparameters,
            metrics=metrics,
        )

    # -- steps -----------------------------------------------------------------------------

    def _verified_copy(self, run_dir: Path) -> Path:
        """The foundation file copied into ``run_dir``, checked the way MACEPotential checks
        a model file (sha256 or an explicit trust)."""
        p = self.params
        source = Path(p.foundation_model)
        if not source.is_file():
            raise FileNotFoundError(f"MACE foundation model {source} does not exist")
        copy = run_dir / "foundation.model"
        shutil.copyfile(source, copy)
        if p.foundation_model_sha256 is not None:
            actual = sha256_file(copy)
            if actual != p.foundation_model_sha256:
                raise ChecksumError(
                    f"MACE foundation model {source} has sha256 {actual}, expected "
                    f"{p.foundation_model_sha256}"
                )
        elif not p.trust_model_file:
            raise ValueError(
                f"MACE foundation model {source} is a full pickle of a torch module: loading it "
                "runs any code it names. Set foundation_model_sha256 to the file's sha256 "
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
            "--energy_key=REF_energy",
            "--forces_key=REF_forces",
            "--stress_key=REF_stress",
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
        if p.mode == "multihead":
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

    def _run(self, argv: list[str], run_dir: Path, device: str) -> None:
        env = dict(os.environ)
        match = re.fullmatch(r"cuda:(\d+)", device)
        if match:  # mace takes "cuda" only: show it the one GPU we were given
            env["CUDA_VISIBLE_DEVICES"] = match.group(1)
        if self.params.cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(self.params.cpu_threads)
        command = [sys.executable, "-m", "mace.cli.run_train", *argv]
        log.info("running mace fine-tuning in %s", run_dir)
        with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
            completed = subprocess.run(command, cwd=run_dir, env=env, stdout=out, stderr=err,
                                       check=False)  # fmt: skip
        if completed.returncode != 0:
            tail = (run_dir / "stderr.log").read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(
                f"mace fine-tuning failed (exit code {completed.returncode}); last lines of "
                f"{run_dir / 'stderr.log'}:\n" + "\n".join(tail)
            )

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
                        for key in ("loss", "rmse_e_per_atom", "rmse_f", "rmse_stress")
                    }
        epochs = []
        for epoch in sorted(train):
            entry: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(train[epoch]))}
            for head, per_epoch in valid.items():
                if epoch in per_epoch:
                    suffix = "" if head == FINETUNE_HEAD else f"_{head}"
                    entry[f"val_loss{suffix}"] = per_epoch[epoch]["loss"]
                    entry[f"val_rmse_f{suffix}"] = per_epoch[epoch]["rmse_f"]
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

    @staticmethod
    def _best_epoch_from_checkpoints(run_dir: Path) -> int | None:
        """The epoch of the checkpoint mace kept and saved as the model: mace saves one when
        the fine-tuning head's validation loss improves and deletes the one before."""
        epochs = []
        for path in (run_dir / "checkpoints").glob(f"{RUN_NAME}*_epoch-*.pt"):
            match = re.search(r"_epoch-(\d+)\.pt$", path.name)
            if match:
                epochs.append(int(match.group(1)))
        return max(epochs) if epochs else None


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
