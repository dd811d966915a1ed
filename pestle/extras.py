"""Optional parts of pestle and the pip extra that installs each.

``pip install pestle`` is the core: CHGNet, ase, pymatgen, dask, pymongo and the embedded
store server, enough to run a campaign with CHGNet and an EMT or potential labeller. The
rest are extras (``pip install 'pestle[gpaw,mace]'``, or ``pestle[all]``); a plugin or seed
that needs one names it (``requires_extra`` on a registered class), and using it without the
extra installed fails with :class:`MissingExtra`, which says what to install.
"""

from __future__ import annotations

import importlib.util

# extra -> (what it brings, the top-level modules whose absence means it is not installed)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpaw": ("GPAW", ("gpaw",)),
    "vasp": ("custodian (VASP's error handlers)", ("custodian",)),
    "mace": ("mace-torch", ("mace", "e3nn")),
    "matgl": ("matgl", ("matgl", "lightning", "torch_geometric")),
    "mp": ("mp-api (Materials Project queries)", ("mp_api",)),
    "phonon": ("phonopy", ("phonopy",)),
}

# What pip alone does not bring.
NOTES = {
    "gpaw": " (GPAW compiles against libxc, BLAS/LAPACK and FFTW and needs its PAW setups: "
    "on Debian, scripts/bootstrap.sh installs them, or apt-get install gpaw-data libxc-dev "
    "libblas-dev liblapack-dev libfftw3-dev)",
    "vasp": " (and a VASP executable and POTCARs of your own)",
    "mp": " (and an API key in MP_API_KEY)",
}


class MissingExtra(ImportError):
    """Something pestle was asked to use is in an extra that is not installed."""

    def __init__(self, extra: str, needed_by: str, missing: list[str]) -> None:
        what = EXTRAS[extra][0]
        super().__init__(
            f"{needed_by} needs {what}, which is not installed (no module "
            f"{', '.join(missing)}): pip install 'pestle[{extra}]'{NOTES.get(extra, '')}",
            name=missing[0],
        )
        self.extra = extra


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty: it is installed)."""
    return [m for m in EXTRAS[extra][1] if not _importable(m)]


def require(extra: str, needed_by: str) -> None:
    """Raise :class:`MissingExtra` when ``extra`` is not installed. ``needed_by`` names what
    wanted it as a user would recognise it: ``labeller 'gpaw'``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r} (known: {', '.join(EXTRAS)})")
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(extra, needed_by, missing)
