"""matgl as a pestle potential: a matgl ``Potential`` (TensorNet, M3GNet, CHGNet, QET...) from
matgl's model cache or from a folder written by ``Potential.save``.

Units: matgl's ``Potential`` returns the total energy in eV, forces in eV/A and the stress as
3x3 blocks in GPa with ASE's sign (compressive negative; it is (1/V) dE/d(strain), the same
derivative ASE's stress is). ``matgl.ext.ase.PESCalculator(stress_unit="eV/A3")`` only
multiplies by ``ase.units.GPa``, and so do we: a unit factor and a 3x3 -> Voigt reduction.

Loading is safe by construction: matgl reads ``model.pt``/``state.pt`` with
``torch.load(weights_only=True)``. Offline: matgl 4 fetches pretrained models from the
Hugging Face Hub into ``MATGL_CACHE`` (``~/.cache/matgl``) and, without a
network, retries for about 46 s per load. We look in that cache ourselves and raise at once
when the model is not there, and we load cached files by path so matgl never goes online.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from ase import Atoms, units
from ase.stress import full_3x3_to_voigt_6_stress
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pestle.potentials import POTENTIALS, LazyModel, Prediction
from pestle.potentials.checkpoints import ChecksumError, check_sha256, files_sha256
from pestle.potentials.chgnet import pack_by_atom_count

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pestle.potentials.matgl")

# The three files of a model saved by matgl's IOMixIn.save (and of a Hub model repo).
MODEL_FILES = ("model.json", "model.pt", "state.pt")
# Bare names are looked up in this Hugging Face organisation, as matgl.load_model does.
HUB_ORGANISATION = "materialyze"
# A TensorNet trained on MatPES-PBE, retrained for matgl >= 3 (whose corrected message
# passing invalidates older weights, e.g. TensorNet-MatPES-PBE-v2025.1-PES).
DEFAULT_MODEL = "TensorNet-PES-MatPES-PBE-2025.2"


def matgl_version() -> str:
    try:
        return version("matgl")
    except PackageNotFoundError:  # pragma: no cover - matgl is a dependency
        return "unknown"


def folder_sha256(folder: str | Path) -> str:
    """One digest for a saved matgl model: sha256 over each file's name and sha256."""
    return files_sha256(folder, MODEL_FILES)


def hub_repo_id(name: str) -> str:
    return name if "/" in name else f"{HUB_ORGANISATION}/{name}"


def cached_model_folder(name: str) -> Path:
    """The folder of matgl's cache holding all files of the named pretrained model.

    Raises FileNotFoundError at once (no network) when any file is missing."""
    from huggingface_hub import try_to_load_from_cache
    from matgl.utils import io  # the cache location matgl's Hub loader uses

    cache = io.MATGL_CACHE
    repo_id = hub_repo_id(name)
    found = [
        try_to_load_from_cache(repo_id, file_name, cache_dir=str(cache))
        for file_name in MODEL_FILES
    ]
    paths = [Path(f) for f in found if isinstance(f, str)]
    if len(paths) == len(MODEL_FILES) and len({p.parent for p in paths}) == 1:
        return paths[0].parent
    raise FileNotFoundError(
        f"matgl model {name!r} (Hugging Face repo {repo_id}) is not in matgl's cache "
        f"{cache} and pestle does not download it: on a machine with a network "
        f"run `huggingface-cli download {repo_id} --cache-dir {cache}` (or "
        f"matgl.load_model({name!r}).save(folder)), or set model_path to a folder holding "
        f"{', '.join(MODEL_FILES)}"
    )


def check_model_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"matgl model folder {folder} lacks {', '.join(missing)} (a folder written by "
            "matgl's Potential.save holds model.json, model.pt and state.pt)"
        )
    return folder


def check_model_classes(folder: str | Path) -> None:
    """Refuse a model folder that names anything but matgl's own model classes.

    matgl reads tensors with ``weights_only=True``, but it imports the module and calls the
    class that ``model.json`` names, and does the same for every ``{"@module", "@class",
    "init_args"}`` entry of ``model.pt``: a folder naming ``subprocess.Popen`` would run a
    command. So before matgl sees the folder, every named class must be a torch module
    defined in matgl."""
    import importlib
    import json

    import matgl.utils.io  # noqa: F401 - registers the numpy types model.pt may hold
    import torch

    folder = Path(folder)
    try:
        described = json.loads((folder / "model.json").read_text())
    except ValueError as exc:
        raise ValueError(f"{folder / 'model.json'} is not valid JSON: {exc}") from None
    named = [("model.json", described)] if isinstance(described, dict) else []
    if not named:
        raise ValueError(f"{folder / 'model.json'} does not describe a matgl model")
    args = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    if isinstance(args, dict):
        named += [(f"model.pt {key}", value) for key, value in args.items()
                  if isinstance(value, dict) and ("@module" in value or "@class" in value)]  # fmt: skip
    for where, entry in named:
        module, name = entry.get("@module"), entry.get("@class")
        if not isinstance(module, str) or not isinstance(name, str):
            raise ValueError(f"{folder}: {where} names no model class")
        if module.split(".")[0] != "matgl":
            raise ValueError(
                f"{folder}: {where} names {module}.{name}, not a matgl model class; refusing "
                "to load it (matgl would import and call it)"
            )
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            found = None
        if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
            raise ValueError(f"{folder}: {where} names {module}.{name}, not a matgl model class")


def load_matgl_potential(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """The matgl ``Potential`` saved in ``folder``, on ``device`` in ``dtype``."""
    from matgl.apps.pes import Potential
    from matgl.utils.io import load_model

    check_model_classes(check_model_folder(folder))
    potential = load_model(folder)
    if not isinstance(potential, Potential):
        raise ValueError(
            f"{folder} holds a matgl {type(potential).__name__}, not a Potential: only a "
            "Potential predicts forces and stresses"
        )
    if dtype == "float64":
        potential = potential.double()  # Potential.forward follows the model's dtype
    potential = potential.to(device)
    # What pestle needs from every model, whatever flags it was saved with.
    potential.calc_forces = True
    potential.calc_stresses = True
    potential.calc_hessian = False
    potential.requires_grad_(False)
    potential.eval()
    return potential


@POTENTIALS.register("matgl")
class MatGLPotential(LazyModel):
    supports_embeddings: ClassVar[bool] = True
    # A saved matgl model is a folder; its digest is folder_sha256's.
    checkpoint_params: ClassVar[tuple[str, str] | None] = ("model_path", "model_sha256")
    checkpoint_unpickles: ClassVar[str] = "never"  # weights_only, classes checked first
    requires_extra: ClassVar[str] = "matgl"  # pip install 'pestle[matgl]'
    _transient = ("_potential", "_device")
    _locks = ("_lock", "_run_lock")

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        model: str = Field(
            default=DEFAULT_MODEL,
            description='a pretrained matgl model name, or an "owner/name" Hub repo id, found in '
            "matgl's cache",
        )
        model_path: Path | None = Field(
            default=None,
            description="a folder written by Potential.save; takes precedence over model",
        )
        model_sha256: str | None = Field(
            default=None, description="the folder's sha256 (pestle's folder digest), checked first"
        )
        device: str = Field(
            default="auto",
            description="auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N",
        )
        # matgl's graphs carry float32 coordinates either way; float64 evaluates the model
        # itself in double precision.
        default_dtype: Literal["float32", "float64"] = Field(
            default="float32", description="precision the model is evaluated in"
        )
        max_atoms_per_batch: int = Field(
            256, ge=1, description="atoms per predicted batch (bounds memory)"
        )

        _hex_digest = field_validator("model_sha256")(check_sha256)

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self._potential: Any = None
        self._folder: Path | None = None
        self._device: str | None = None
        self._sha256: str | None = self.params.model_sha256
        self._lock = threading.Lock()
        # A forward pass leaves its features on the model (feature_dict): one at a time.
        self._run_lock = threading.Lock()

    def model_folder(self) -> Path:
        """The folder of model files behind this potential (FileNotFoundError if missing)."""
        if self._folder is None:
            p = self.params
            if p.model_path is not None:
                self._folder = check_model_folder(p.model_path)
            else:
                self._folder = cached_model_folder(p.model)
        return self._folder

    def load_model(self):
        """The matgl ``Potential`` behind this potential, loaded on first use and kept."""
        with self._lock:
            if self._potential is None:
                folder = self.model_folder()
                expected = self.params.model_sha256
                if expected is not None:
                    actual = folder_sha256(folder)
                    if actual != expected:
                        raise ChecksumError(
                            f"matgl model {folder} has sha256 {actual}, expected {expected}"
                        )
                self._potential = load_matgl_potential(
                    folder, self.device, self.params.default_dtype
                )
                log.info("loaded matgl model from %s on %s", folder, self.device)
            return self._potential

    def _batches(
        self, structures: Sequence[Atoms], features: bool, stress: bool = True
    ) -> Iterator[tuple[list[int], tuple, np.ndarray, torch.Tensor | None]]:
        """``Potential`` outputs per batch of structures (bounded by atom count), with the
        structures' indices, atom offsets per structure and, when asked, pooled features."""
        import torch
        from matgl.ext.ase import Atoms2Graph
        from torch_geometric.data import Batch

        potential = self.load_model()
        model = potential.model
        converter = Atoms2Graph(tuple(model.element_types), float(model.cutoff))
        sizes = [len(atoms) for atoms in structures]
        for indices in pack_by_atom_count(sizes, self.params.max_atoms_per_batch):
            graphs, lattices, states = [], [], []
            for i in indices:
                atoms = structures[i]
                check_structure(atoms, model.element_types)
                graph, lattice, state = converter.get_graph(atoms)
                graphs.append(graph)
                lattices.append(torch.as_tensor(lattice).reshape(-1, 3, 3))
                states.append(torch.as_tensor(np.asarray(state)))
            g = Batch.from_data_list(graphs)
            lattice = torch.cat(lattices)
            state = torch.stack(states)
            kwargs = {}
            if potential.calc_charge:  # as PESCalculator: total charge from initial charges
                charges = [float(structures[i].get_initial_charges().sum()) for i in indices]
                kwargs["total_charge"] = torch.tensor(charges, dtype=lattice.dtype)
            with self._run_lock:
                potential.calc_stresses = stress
                try:
                    out = potential(g, lattice, state, **kwargs)
                finally:
                    potential.calc_stresses = True
                pooled = pooled_features(model, g) if features else None
            offsets = np.concatenate([[0], np.cumsum([sizes[i] for i in indices])])
            yield indices, out, offsets, pooled

    def predict(self, structures: Sequence[Atoms], *, stress: bool = True) -> list[Prediction]:
        if not structures:
            return []
        results: list[Prediction | None] = [None] * len(structures)
        for indices, out, offsets, _ in self._batches(structures, features=False, stress=stress):
            energies = out[0].detach().cpu().numpy().astype(float).reshape(-1)
            forces = out[1].detach().cpu().numpy().astype(float)
            if stress:
                stresses = out[2].detach().cpu().numpy().astype(float).reshape(-1, 3, 3)
            for k, i in enumerate(indices):
                voigt = None
                # matgl treats anything not periodic in 3D as a molecule: no volume, no stress.
                if stress and np.all(structures[i].pbc):
                    voigt = np.asarray(full_3x3_to_voigt_6_stress(stresses[k] * units.GPa))
                results[i] = Prediction(
                    energy=float(energies[k]),
                    forces=forces[offsets[k] : offsets[k + 1]].copy(),
                    stress=voigt,
                )
        return results  # type: ignore[return-value]

    def embed(self, structures: Sequence[Atoms]) -> list[np.ndarray]:
        """Mean over atoms of the model's last invariant per-atom features (node features
        of the last graph layer for M3GNet-like models, TensorNet's readout input)."""
        results: list[np.ndarray | None] = [None] * len(structures)
        for indices, _, _, pooled in self._batches(structures, features=True):
            pooled = pooled.detach().cpu().numpy().astype(float)
            for k, i in enumerate(indices):
                results[i] = pooled[k]
        return results  # type: ignore[return-value]

    @classmethod
    def checkpoint_digest(cls, path: Path) -> str:
        return folder_sha256(path)

    def model_sha256(self) -> str | None:
        if self._sha256 is None:
            try:
                self._sha256 = folder_sha256(self.model_folder())
            except FileNotFoundError:
                return None
        return self._sha256

    def describe(self) -> dict:
        p = self.params
        try:
            folder: str | None = str(self.model_folder())
        except FileNotFoundError:
            folder = str(p.model_path) if p.model_path is not None else None
        return {
            "family": "matgl",
            "model": None if p.model_path is not None else p.model,
            "model_path": folder,
            "model_sha256": self.model_sha256(),
            "architecture": None
            if self._potential is None
            else type(self._potential.model).__name__,
            "default_dtype": p.default_dtype,
            "matgl_version": matgl_version(),
        }


def check_structure(atoms: Atoms, element_types: Sequence[str]) -> None:
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any() and not pbc.all():
        raise ValueError(
            "matgl's graph converter handles fully periodic or non-periodic structures only; "
            f"this one has pbc={pbc.tolist()}"
        )
    missing = sorted(set(atoms.get_chemical_symbols()) - set(element_types))
    if missing:
        raise ValueError(f"the matgl model has no parameters for element(s) {', '.join(missing)}")


def pooled_features(model: Any, g: Any):
    """Per-structure mean of the per-atom invariant features the last forward pass left
    on ``model.feature_dict``."""
    import torch

    feature_dict = model.feature_dict
    num_nodes = g.num_nodes
    layers = sorted(int(key[3:]) for key in feature_dict if key.startswith("gc_"))
    last = feature_dict.get(f"gc_{layers[-1]}") if layers else None
    readout = feature_dict.get("readout")
    if isinstance(last, dict) and torch.is_tensor(last.get("node_feat")):
        per_atom = last["node_feat"]  # M3GNet, CHGNet, MEGNet
    elif torch.is_tensor(readout) and readout.dim() == 2 and readout.shape[0] == num_nodes:
        per_atom = readout  # TensorNet, QET: invariant norms of the atom tensors
    else:
        raise NotImplementedError(
            f"no per-atom invariant features found for matgl {type(model).__name__}"
        )
    per_atom = per_atom.detach().reshape(num_nodes, -1)
    batch = g.batch.to(per_atom.device, torch.long)
    sums = torch.zeros(
        g.num_graphs, per_atom.shape[1], dtype=per_atom.dtype, device=per_atom.device
    )
    sums.index_add_(0, batch, per_atom)
    counts = torch.bincount(batch, minlength=g.num_graphs).to(per_atom.dtype).unsqueeze(1)
    return sums / counts
