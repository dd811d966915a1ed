"""Choose the torch device a model runs on (a GPU when one is there, else the CPU), and find
the GPUs a local cluster can offer its workers."""

from __future__ import annotations

import logging
import os
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


def visible_gpu_ids(count: int) -> list[str]:
    """The ids of the first ``count`` CUDA devices, as a worker's CUDA_VISIBLE_DEVICES takes
    them: this process's own CUDA_VISIBLE_DEVICES entries when it is set (a batch job's
    allocation, where device 0 of torch need not be physical GPU 0), else 0..count-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip()][:count]
    return [str(index) for index in range(count)]


def detect_gpus() -> list[str]:
    """The CUDA devices torch sees here, as ids for CUDA_VISIBLE_DEVICES (empty without CUDA).
    The local cluster calls this for ``dask.gpus: auto``; tests replace it to pretend."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return visible_gpu_ids(count)
