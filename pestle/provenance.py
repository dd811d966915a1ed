"""Code versions recorded with every stored record."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

_TRACKED = ("pestle", "ase", "pymatgen", "numpy", "torch", "chgnet", "gpaw", "dask", "pymongo")


@functools.cache
def code_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in _TRACKED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions
