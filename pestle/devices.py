"""Choose the torch device a model runs on: a GPU when one is there, else the CPU."""

from __future__ import annotations

import logging
import re

log = logging.getLogger("pestle.devices")

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def pick_device(preference: str = "auto") -> str:
    """Resolve ``"auto" | "cpu" | "cuda" | "cuda:N"`` to a device torch can use now.

    Asking for a GPU that is not there is not an error: a campaign configured for a GPU
    cluster must still run on a laptop, so we warn and fall back to the CPU.
    """
    import torch  # imported here so that reading configs does not pay for torch

    choice = preference.strip().lower()
    if choice == "cpu":
        return "cpu"
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = _CUDA.match(choice)
    if match is None:
        raise ValueError(f"unknown device {preference!r} (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        log.warning("device %r requested but CUDA is not available: using the CPU", preference)
        return "cpu"
    index = match.group(1)
    if index is not None and int(index) >= torch.cuda.device_count():
        log.warning(
            "device %r requested but only %d CUDA device(s) exist: using the CPU",
            preference,
            torch.cuda.device_count(),
        )
        return "cpu"
    return choice
