"""MACE as a pestle potential: a MACE-MP foundation model from mace's cache or a local file.

Units: MACE predicts the total energy in eV, forces in eV/A and the stress as a 3x3 tensor in
eV/A^3 that already follows ASE's sign convention (``mace.calculators.MACECalculator`` only
reduces it to Voigt form), so converting is a 3x3 -> Voigt reduction, never a sign flip.

Safety: a MACE ``.model`` file is a full pickle of the torch module, so loading one runs
whatever code the file names. We load a file only when its sha256 matches ``model_sha256``
or when the user says ``trust_model_file: true``. Importing ``mace`` also sets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process, which would make every later
``torch.load`` (ours, chgnet's, matgl's) unpickle arbitrary objects; :func:`import_mace` is
the only way this module imports mace code, and it puts the variable back.

Offline: pretrained models are never downloaded here. A MACE-MP name resolves to the file
mace's own loader caches (``$XDG_CACHE_HOME/mace`` or ``~/.cache/mace``); when it is not
there we say which file to put where instead of letting mace try the network.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pestle.potentials import POTENTIALS, LazyModel, Prediction
from pestle.potentials.checkpoints import ChecksumError, check_sha256, sha256_file
from pestle.potentials.chgnet import pack_by_atom_count

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pestle.potentials.mace")

WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

# The same atoms.info keys MACECalculator reads as model inputs (charge-aware models).
INFO_KEYS = {"total_spin": "spin", "total_charge": "charge", "external_field": "external_field"}

_env_lock = threading.RLock()


@contextlib.contextmanager
def restored_env(name: str = WEIGHTS_ONLY_ENV) -> Iterator[None]:
    """Whatever runs inside may set or clear ``name``; afterwards it has its old value."""
    with _env_lock:
        before = os.environ.get(name)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before


def import_mace(name: str = "mace") -> ModuleType:
    """Import ``name`` (``mace`` or one of its submodules, or ``e3nn...``) without leaving
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set for the rest of the process.

    mace sets the variable on import because e3nn 0.4.4 (which mace pins) reads its own
    constants file with a bare ``torch.load`` that torch >= 2.6 refuses under the safe
    default. So the variable is on while the import runs (as mace would have it; the files
    read then ship inside the installed wheels) and restored right after.
    """
    module = sys.modules.get(name)
    if module is not None:  # imported already: no import code runs, nothing to guard
        return module
    with restored_env(), warnings.catch_warnings():
        os.environ[WEIGHTS_ONLY_ENV] = "1"
        warnings.filterwarnings("ignore", message=f"Environment variable {WEIGHTS_ONLY_ENV}")
        return importlib.import_module(name)


def mace_version() -> str:
    try:
        return version("mace-torch")
    except PackageNotFoundError:  # pragma: no cover - mace-torch is a dependency
        return "unknown"


def pretrained_model_file(name: str) -> tuple[Path, str]:
    """Where mace's own MACE-MP loader keeps (or would download) the named model, and the
    URL it downloads it from. Mirrors ``download_mace_mp_checkpoint``: the cached file name
    is the URL's basename with everything but letters, digits and ``_`` dropped."""
    foundations = import_mace("mace.calculators.foundations_models")
    urls: dict[str, str] = foundations.mace_mp_urls
    if name not in urls:
        known = ", ".join(urls)
        raise ValueError(f"unknown MACE-MP model {name!r} (known: {known}; or set model_path)")
    if name == "medium-mpa-0" and os.path.isfile(foundations.local_model_path):
        return Path(foundations.local_model_path), urls[name]  # shipped inside mace's wheel
    url = urls[name]
    file_name = "".join(c for c in os.path.basename(url) if c.isalnum() or c == "_")
    return Path(foundations.get_cache_dir()) / file_name, url


def resolve_model_file(model: str, model_path: str | Path | None) -> Path:
    """The ``.model`` file to load: ``model_path`` when given, else the cached MACE-MP file.
    Raises FileNotFoundError (and never downloads) when the file is not there."""
    if model_path is not None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"MACE model file {path} does not exist")
        return path
    path, url = pretrained_model_file(model)
    if not path.is_file():
        raise FileNotFoundError(
            f"MACE-MP model {model!r} is not in mace's cache and pestle does not download it: "
            f"put the file {url} at {path} (mace's cache is $XDG_CACHE_HOME/mace, default "
            "~/.cache/mace), or set model_path to a local .model file"
        )
    return path


def load_mace_model(
    path: str | Path,
    sha256: str | None = None,
    trust_model_file: bool = False,
    device: str = "cpu",
    default_dtype: str = "float64",
) -> torch.nn.Module:
    """The torch module pickled in ``path``, verified first, on ``device`` in ``default_dtype``."""
    path = Path(path)
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise ChecksumError(f"MACE model {path} has sha256 {actual}, expected {sha256}")
    elif not trust_model_file:
        raise ValueError(
            f"MACE model {path} is a full pickle of a torch module: loading it runs any code "
            "it names. Set model_sha256 to the file's sha256 (sha256sum prints it) so pestle "
            "can verify it first, or set trust_model_file: true if you trust its source"
        )
    else:
        log.warning("loading %s unverified: trust_model_file is set", path)
    import torch

    import_mace("mace.modules")  # the classes the pickle names, imported with the guard
    with restored_env():  # unpickling may import more mace modules
        model = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "r_max"):
        raise ValueError(f"{path} does not hold a MACE model (got {type(model).__name__})")
    model = model.double() if default_dtype == "float64" else model.float()
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


def choose_head(heads: Sequence[str], wanted: str | None) -> str:
    """The readout head to use, chosen like MACECalculator does."""
    if wanted is not None:
        if wanted not in heads:
            raise ValueError(f"MACE model has no head {wanted!r} (heads: {', '.join(heads)})")
        return wanted
    if len(heads) == 1:
        return heads[0]
    default = [head for head in heads if head.lower() == "default"]
    if not default:
        raise ValueError(
            f"MACE model has several heads ({', '.join(heads)}) and none is 'default': set head"
        )
    return default[0]


@POTENTIALS.register("mace")
class MACEPotential(LazyModel):
    supports_embeddings: ClassVar[bool] = True
    checkpoint_params: ClassVar[tuple[str, str] | None] = ("model_path", "model_sha256")
    checkpoint_unpickles: ClassVar[str] = "always"  # a .model file is a pickled module
    trust_params: ClassVar[tuple[str, ...]] = ("trust_model_file",)
    requires_extra: ClassVar[str] = "mace"  # pip install 'pestle[mace]'

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        model: str = Field(
            default="small",
            description="a MACE-MP name as mace_mp() takes it, found in mace's cache",
        )
        model_path: Path | None = Field(
            default=None, description="a local .model file; takes precedence over model"
        )
        model_sha256: str | None = Field(
            default=None, description="the .model file's sha256, checked before it is unpickled"
        )
        # .model files are pickles: without a sha256, loading needs this explicit opt-in.
        trust_model_file: bool = Field(
            default=False,
            description="load a .model file without model_sha256 (a pickle runs any code it names)",
        )
        head: str | None = Field(
            default=None, description="readout head of a multi-head model (default: 'default')"
        )
        device: str = Field(
            default="auto",
            description="auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N",
        )
        default_dtype: Literal["float32", "float64"] = Field(
            default="float64", description="precision the model is evaluated in"
        )
        max_atoms_per_batch: int = Field(
            256, ge=1, description="atoms per predicted batch (bounds memory)"
        )

        _hex_digest = field_validator("model_sha256")(check_sha256)

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self._model: torch.nn.Module | None = None
        self._model_file: Path | None = None
        self._head: str | None = None
        self._device: str | None = None
        self._sha256: str | None = self.params.model_sha256
        self._lock = threading.Lock()

    def model_file(self) -> Path:
        """The .model file behind this potential (raises FileNotFoundError when missing)."""
        if self._model_file is None:
            self._model_file = resolve_model_file(self.params.model, self.params.model_path)
        return self._model_file

    def load_model(self) -> torch.nn.Module:
        """The MACE module behind this potential, loaded on first use and kept."""
        with self._lock:
            if self._model is None:
                p = self.params
                model = load_mace_model(
                    self.model_file(),
                    p.model_sha256,
                    p.trust_model_file,
                    self.device,
                    p.default_dtype,
                )
                self._head = choose_head(list(getattr(model, "heads", ["Default"])), p.head)
                self._model = model
            return self._model

    def _graphs(self, structures: Sequence[Atoms], model: torch.nn.Module) -> list:
        """mace's AtomicData graphs for ``structures``, built in the model's dtype."""
        data = import_mace("mace.data")
        tools = import_mace("mace.tools")
        z_table = tools.utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
        known = {int(z) for z in z_table.zs}
        heads = list(getattr(model, "heads", ["Default"]))
        keys = data.KeySpecification(info_keys=dict(INFO_KEYS))
        graphs = []
        with tools.torch_tools.default_dtype(self.params.default_dtype):
            for atoms in structures:
                missing = sorted({int(z) for z in atoms.numbers} - known)
                if missing:
                    names = ", ".join(chemical_symbols[z] for z in missing)
                    raise ValueError(f"the MACE model has no parameters for element(s) {names}")
                config = data.config_from_atoms(atoms, key_specification=keys, head_name=self._head)
                graphs.append(
                    data.AtomicData.from_config(
                        config, z_table=z_table, cutoff=float(model.r_max), heads=heads
                    )
                )
        return graphs

    def _batches(
        self, structures: Sequence[Atoms], forces: bool, stress: bool | None = None
    ) -> Iterator[tuple[list[int], dict[str, torch.Tensor], np.ndarray]]:
        """Model outputs per batch of structures (bounded by atom count), with the indices
        of the structures and the batch's ``ptr`` (atom offsets per structure)."""
        loader_module = import_mace("mace.tools.torch_geometric.dataloader")
        model = self.load_model()
        sizes = [len(atoms) for atoms in structures]
        for indices in pack_by_atom_count(sizes, self.params.max_atoms_per_batch):
            graphs = self._graphs([structures[i] for i in indices], model)
            loader = loader_module.DataLoader(
                graphs, batch_size=len(graphs), shuffle=False, drop_last=False
            )
            batch = next(iter(loader)).to(self.device)
            out = model(
                batch.to_dict(),
                training=False,
                compute_force=forces,
                compute_stress=forces if stress is None else stress,
            )
            yield indices, out, batch["ptr"].cpu().numpy()

    def predict(self, structures: Sequence[Atoms], *, stress: bool = True) -> list[Prediction]:
        results: list[Prediction | None] = [None] * len(structures)
        if not structures:
            return []
        for indices, out, ptr in self._batches(structures, forces=True, stress=stress):
            energies = out["energy"].detach().cpu().numpy().astype(float)
            forces = out["forces"].detach().cpu().numpy().astype(float)
            if stress:
                stresses = out["stress"].detach().cpu().numpy().astype(float)
            for k, i in enumerate(indices):
                periodic = bool(np.all(structures[i].pbc))
                results[i] = Prediction(
                    energy=float(energies[k]),
                    forces=forces[ptr[k] : ptr[k + 1]].copy(),
                    # A stress needs a volume: none for molecules or slabs.
                    stress=np.asarray(full_3x3_to_voigt_6_stress(stresses[k]), dtype=float)
                    if periodic and stress
                    else None,
                )
        return results  # type: ignore[return-value]

    def embed(self, structures: Sequence[Atoms]) -> list[np.ndarray]:
        """Mean over atoms of MACE's invariant node features (all interaction layers, as
        ``MACECalculator.get_descriptors`` extracts them): a descriptor per structure."""
        o3 = import_mace("e3nn.o3")
        extract_invariant = import_mace("mace.modules.utils").extract_invariant
        model = self.load_model()
        irreps = o3.Irreps(str(model.products[0].linear.irreps_out))
        num_invariant = irreps.dim // (irreps.lmax + 1) ** 2
        results: list[np.ndarray | None] = [None] * len(structures)
        for indices, out, ptr in self._batches(structures, forces=False):
            features = extract_invariant(
                out["node_feats"].detach(),
                num_layers=int(model.num_interactions),
                num_features=num_invariant,
                l_max=irreps.lmax,
            )
            features = features.cpu().numpy().astype(float)
            for k, i in enumerate(indices):
                results[i] = features[ptr[k] : ptr[k + 1]].mean(axis=0)
        return results  # type: ignore[return-value]

    @classmethod
    def checkpoint_digest(cls, path: Path) -> str:
        return sha256_file(path)

    def model_sha256(self) -> str | None:
        if self._sha256 is None:
            try:
                path = self.model_file()
            except (FileNotFoundError, ValueError):
                return None
            self._sha256 = sha256_file(path)
        return self._sha256

    def describe(self) -> dict:
        p = self.params
        try:
            path: str | None = str(self.model_file())
        except (FileNotFoundError, ValueError):
            path = str(p.model_path) if p.model_path is not None else None
        return {
            "family": "mace",
            "model": None if p.model_path is not None else p.model,
            "model_path": path,
            "model_sha256": self.model_sha256(),
            "head": self._head if self._head is not None else p.head,
            "default_dtype": p.default_dtype,
            "mace_version": mace_version(),
        }
