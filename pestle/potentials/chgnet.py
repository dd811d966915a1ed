"""CHGNet as a pestle potential: pretrained weights from chgnet's wheel or a fine-tuned file.

Units are converted to ASE's (see ``pestle.potentials``): CHGNet predicts energy per atom,
forces in eV/A and stress as a 3x3 tensor in GPa. Its stress already follows ASE's sign
convention (``chgnet.model.dynamics.CHGNetCalculator`` only multiplies by ``ase.units.GPa``),
so converting is a unit factor and a 3x3 -> Voigt reduction, never a sign flip.
"""

from __future__ import annotations

import logging
import pickle
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms, units
from ase.stress import full_3x3_to_voigt_6_stress
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pestle.potentials import POTENTIALS, LazyModel, Prediction
from pestle.potentials.checkpoints import ChecksumError, check_sha256, sha256_file

if TYPE_CHECKING:
    from chgnet.model.model import CHGNet

log = logging.getLogger("pestle.potentials.chgnet")

# Names CHGNet.load accepts; their weights ship inside chgnet's wheel (no download).
PRETRAINED_MODELS = ("0.3.0", "0.2.0", "r2scan")
CHECKPOINT_FORMAT = "pestle-chgnet-1"
# A CHGNet with one scale per chemical system or element on its site energies: no stock
# CHGNet layer knows a site's element or structure at the readout, so these scales cannot be
# baked into the weights; the file keeps the model under its own key so that a plain CHGNet
# loader refuses it instead of dropping the scales.
SCALED_FORMAT = "pestle-chgnet-scaled-1"
SCALED_KEY = "scaled_chgnet"


# chgnet 0.4 builds cell volumes with torch.tensor(list of tensors); harmless, but torch
# warns on every batch.
TENSOR_TO_SCALAR_WARNING = "Converting a tensor with requires_grad=True to a scalar"


def chgnet_version() -> str:
    try:
        return version("chgnet")
    except PackageNotFoundError:  # pragma: no cover - chgnet is a dependency
        return "unknown"


def save_checkpoint(model: CHGNet, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``model`` in the layout ``CHGNet.from_file`` reads (``{"model": as_dict()}``),
    plus our provenance. Only tensors, containers and plain scalars go in, so the file
    loads back with ``torch.load(weights_only=True)``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.as_dict(),
        "pestle": {"format": CHECKPOINT_FORMAT, "chgnet_version": chgnet_version(), **metadata},
    }
    torch.save(state, path)
    return path


def load_chgnet(
    model: str = "0.3.0",
    checkpoint: str | Path | None = None,
    checkpoint_sha256: str | None = None,
    device: str = "cpu",
) -> CHGNet:
    """A CHGNet on ``device``: the checkpoint when given, else the named pretrained model."""
    import torch
    from chgnet.model.model import CHGNet

    if checkpoint is None:
        # Pretrained weights come from chgnet's own wheel, which we trust like its code.
        return CHGNet.load(model_name=model, use_device=device, verbose=False)

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"CHGNet checkpoint {path} does not exist")
    if checkpoint_sha256 is not None:
        actual = sha256_file(path)
        if actual != checkpoint_sha256.lower():
            raise ChecksumError(
                f"CHGNet checkpoint {path} has sha256 {actual}, expected {checkpoint_sha256}"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Files written by chgnet's own Trainer may pickle arbitrary objects in
        # trainer_args. Executing a pickle is only acceptable for a file we can prove is
        # the one we recorded.
        if checkpoint_sha256 is None:
            raise ValueError(
                f"CHGNet checkpoint {path} holds more than tensors and plain data; refusing "
                "to unpickle it without checkpoint_sha256 to verify it first (a stored model "
                "version: `pestle models trust ID` signs it if you trust where it came from)"
            ) from exc
        log.warning("loading %s with full unpickling (its sha256 was verified)", path)
        state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and SCALED_KEY in state:
        raise ValueError(
            f"{path} is a CHGNet with per-{state[SCALED_KEY].get('scope', 'group')} scales "
            "(a scoped linear correction): load it with potential chgnet_scaled, which applies "
            "them; as a plain CHGNet it would silently drop the correction"
        )
    model_dict = state.get("model", state)
    if not {"state_dict", "model_args"} <= set(model_dict):
        raise ValueError(f"{path} is not a CHGNet checkpoint (no model state_dict/model_args)")
    return CHGNet.from_dict(model_dict).to(device)


def check_pretrained_name(name: str) -> str:
    if name not in PRETRAINED_MODELS:
        known = ", ".join(PRETRAINED_MODELS)
        raise ValueError(f"unknown pretrained CHGNet {name!r} (known: {known})")
    return name


def bare(atoms: Atoms) -> Atoms:
    """Numbers, positions, cell and pbc only."""
    return Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def pack_by_atom_count(sizes: Sequence[int], max_atoms: int) -> list[list[int]]:
    """Indices grouped into consecutive batches of at most ``max_atoms`` atoms.

    Memory grows with the atoms (and their neighbours) in a batch, not with the number of
    structures, so the cap is on atoms; one structure above the cap runs alone.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if current and total + size > max_atoms:
            batches.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        batches.append(current)
    return batches


@POTENTIALS.register("chgnet")
class CHGNetPotential(LazyModel):
    supports_embeddings: ClassVar[bool] = True
    checkpoint_params: ClassVar[tuple[str, str] | None] = ("checkpoint", "checkpoint_sha256")
    # pestle's own checkpoints are plain; chgnet Trainer files may need a full unpickle.
    checkpoint_unpickles: ClassVar[str] = "fallback"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        model: str = Field(
            default="0.3.0",
            description="a pretrained CHGNet shipped in chgnet's wheel: 0.3.0, 0.2.0, r2scan",
        )
        checkpoint: Path | None = Field(
            default=None, description="a fine-tuned checkpoint file; takes precedence over model"
        )
        checkpoint_sha256: str | None = Field(
            default=None, description="the checkpoint's sha256, checked before it is loaded"
        )
        device: str = Field(
            default="auto",
            description="auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N",
        )
        # Peak memory is roughly proportional to atoms x neighbours: ~25 MB per atom for
        # dense LiF on CPU (chgnet builds a double-backward graph even at inference).
        max_atoms_per_batch: int = Field(
            128, ge=1, description="atoms per predicted batch (bounds memory)"
        )

        _known_model = field_validator("model")(check_pretrained_name)

        _hex_digest = field_validator("checkpoint_sha256")(check_sha256)

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self._model: CHGNet | None = None
        self._device: str | None = None
        self._sha256: str | None = self.params.checkpoint_sha256
        self._lock = threading.Lock()

    def load_model(self) -> CHGNet:
        """The CHGNet behind this potential, loaded on first use and kept."""
        with self._lock:
            if self._model is None:
                model = load_chgnet(
                    self.params.model,
                    self.params.checkpoint,
                    self.params.checkpoint_sha256,
                    self.device,
                )
                # Forces and stress are autograd derivatives w.r.t. positions and strain,
                # so torch.no_grad is impossible; freezing the weights at least keeps
                # autograd from recording graphs back to the parameters.
                model.requires_grad_(False)
                model.eval()
                # Same tolerance as chgnet's ASE calculator: a sampler may make a sparse cell.
                model.graph_converter.set_isolated_atom_response("warn")
                self._model = model
            return self._model

    def _raw_outputs(self, structures: Sequence[Atoms], **options: Any) -> Iterator[dict]:
        """chgnet's ``predict_structure`` output per structure, in order, computed in
        batches bounded by atom count."""
        from pymatgen.io.ase import AseAtomsAdaptor

        model = self.load_model()
        sizes = [len(atoms) for atoms in structures]
        for batch in pack_by_atom_count(sizes, self.params.max_atoms_per_batch):
            # Bare geometry: the adaptor would otherwise carry labels (calculator) and warn
            # about MD constraints (FixCom) that mean nothing to a single-point prediction.
            pmg = [AseAtomsAdaptor.get_structure(bare(structures[i])) for i in batch]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=TENSOR_TO_SCALAR_WARNING)
                raw = model.predict_structure(pmg, batch_size=len(pmg), **options)
            yield from ([raw] if isinstance(raw, dict) else raw)

    def predict(self, structures: Sequence[Atoms], *, stress: bool = True) -> list[Prediction]:
        if not structures:
            return []
        per_atom = self.load_model().is_intensive  # CHGNet's energy is per atom when intensive
        task = "efs" if stress else "ef"
        results = []
        for atoms, out in zip(structures, self._raw_outputs(structures, task=task), strict=True):
            n_atoms = len(atoms)
            voigt = None
            if stress:
                full = np.asarray(out["s"], dtype=float) * units.GPa
                voigt = np.asarray(full_3x3_to_voigt_6_stress(full), dtype=float)
            results.append(
                Prediction(
                    energy=float(out["e"]) * (n_atoms if per_atom else 1),
                    forces=np.asarray(out["f"], dtype=float).reshape(n_atoms, 3),
                    stress=voigt,
                )
            )
        return results

    def embed(self, structures: Sequence[Atoms]) -> list[np.ndarray]:
        """CHGNet's crystal feature vector per structure (the pooled atom features its
        readout sees): a descriptor for diversity selection."""
        outputs = self._raw_outputs(structures, task="e", return_crystal_feas=True)
        return [np.asarray(out["crystal_fea"], dtype=float).ravel() for out in outputs]

    @classmethod
    def checkpoint_digest(cls, path: Path) -> str:
        return sha256_file(path)

    def checkpoint_sha256(self) -> str | None:
        if self.params.checkpoint is None:
            return None
        if self._sha256 is None and Path(self.params.checkpoint).is_file():
            self._sha256 = sha256_file(self.params.checkpoint)
        return self._sha256

    def describe(self) -> dict:
        checkpoint = self.params.checkpoint
        return {
            "family": "chgnet",
            "model": None if checkpoint is not None else self.params.model,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "checkpoint_sha256": self.checkpoint_sha256(),
            "chgnet_version": chgnet_version(),
        }


# -- CHGNet with per-system or per-element scales -----------------------------------------------


def install_scales(model: CHGNet, scope: str, scales: Mapping[str, float]) -> CHGNet:
    """Scale ``model``'s site energies (the network part, not the AtomRef references) in
    place: by the site's element (``scope`` ``"element"``, keys element symbols) or by its
    structure's chemical system (``"system"``, keys like ``F-Li``); 1 for keys not given.
    Forces and stress are autograd derivatives of the scaled energy, so they stay exact.

    How: ``_compute`` is wrapped to note each site's scale from the batch's atomic numbers
    and owners; a forward hook on the readout MLP (``mlp_first``: it maps each site's
    features to its energy) multiplies its output by them."""
    import torch
    from ase.data import atomic_numbers as numbers_of

    if scope not in ("element", "system"):
        raise ValueError(f"scope must be element or system, not {scope!r}")
    if not model.mlp_first:
        raise ValueError("per-site scales need a CHGNet whose readout is per site (mlp_first)")
    if getattr(model, "_pestle_scales", None) is not None:
        raise ValueError("this CHGNet already carries scales")
    table = torch.ones(120, dtype=torch.float64)
    if scope == "element":
        for symbol, value in scales.items():
            table[numbers_of[symbol]] = float(value)
    state: dict[str, Any] = {"factor": None}
    original = model._compute

    def per_site(g: Any) -> Any:
        z = g.atomic_numbers.detach().cpu()
        if scope == "element":
            return table[z]
        owners = g.atom_owners.detach().cpu().long()
        per_graph = []
        for j in range(int(owners.max()) + 1 if owners.numel() else 0):
            symbols = sorted({chemical_symbols_of(int(n)) for n in z[owners == j]})
            per_graph.append(float(scales.get("-".join(symbols), 1.0)))
        return torch.tensor(per_graph, dtype=torch.float64)[owners]

    def _compute(g: Any, **options: Any) -> dict:
        state["factor"] = per_site(g).view(-1, 1)
        try:
            return original(g, **options)
        finally:
            state["factor"] = None

    def scale_sites(module: Any, inputs: Any, output: Any) -> Any:
        factor = state["factor"]
        if factor is None:
            return output
        return output * factor.to(dtype=output.dtype, device=output.device)

    model._compute = _compute  # type: ignore[method-assign]
    model.mlp.register_forward_hook(scale_sites)
    model._pestle_scales = {"scope": scope, "scales": dict(scales)}  # type: ignore[attr-defined]
    return model


def chemical_symbols_of(number: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[number]


def save_scaled_checkpoint(
    model: CHGNet,
    path: str | Path,
    scope: str,
    scales: Mapping[str, float],
    metadata: dict[str, Any],
) -> Path:
    """``model`` (without scales installed) and its scales in one file that
    ``ScaledCHGNetPotential`` loads (tensors and plain data only: ``weights_only`` loads
    it)."""
    import torch

    if getattr(model, "_pestle_scales", None) is not None:
        raise ValueError("save the CHGNet without its installed scales")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        SCALED_KEY: {
            "model": model.as_dict(),
            "scope": scope,
            "scales": {str(k): float(v) for k, v in scales.items()},
        },
        "pestle": {"format": SCALED_FORMAT, "chgnet_version": chgnet_version(), **metadata},
    }
    torch.save(state, path)
    return path


def load_scaled_chgnet(
    checkpoint: str | Path, checkpoint_sha256: str | None = None, device: str = "cpu"
) -> CHGNet:
    """The CHGNet of a scaled checkpoint with its scales installed."""
    import torch
    from chgnet.model.model import CHGNet

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"scaled CHGNet checkpoint {path} does not exist")
    if checkpoint_sha256 is not None and sha256_file(path) != checkpoint_sha256.lower():
        raise ChecksumError(f"scaled CHGNet checkpoint {path} is not the recorded one (sha256)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or SCALED_KEY not in state:
        raise ValueError(f"{path} is not a scaled CHGNet checkpoint ({SCALED_FORMAT})")
    entry = state[SCALED_KEY]
    model = CHGNet.from_dict(entry["model"]).to(device)
    return install_scales(model, entry["scope"], entry["scales"])


@POTENTIALS.register("chgnet_scaled")
class ScaledCHGNetPotential(CHGNetPotential):
    """CHGNet with one scale per chemical system or per element on its site energies (the
    scoped linear correction, ``linear_scope: system | element``), from the file the CHGNet
    trainer writes. For ASE: ``pestle.potentials.calculator.PotentialCalculator(this)``, or
    chgnet's own ``CHGNetCalculator(model=this.load_model())``."""

    class Params(CHGNetPotential.Params):
        checkpoint: Path = Field(
            description="the scaled CHGNet file the CHGNet trainer wrote (linear_scope system "
            "or element); required: the scales live in it"
        )

    def load_model(self) -> CHGNet:
        with self._lock:
            if self._model is None:
                model = load_scaled_chgnet(
                    self.params.checkpoint, self.params.checkpoint_sha256, self.device
                )
                model.requires_grad_(False)
                model.eval()
                model.graph_converter.set_isolated_atom_response("warn")
                self._model = model
            return self._model

    def describe(self) -> dict:
        out = super().describe()
        out["family"] = "chgnet_scaled"
        model = self.load_model()
        out["scales"] = dict(model._pestle_scales)  # type: ignore[attr-defined]
        return out
