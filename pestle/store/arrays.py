"""Numeric arrays in documents: inline lists when small, GridFS files (``.npy``, never
pickles) when they would bring a document near MongoDB's 16 MB limit."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import gridfs
import numpy as np

# ~0.5 MB of BSON doubles; bigger arrays are written to GridFS and referenced.
INLINE_ARRAY_LIMIT = 30_000


class ArrayCodec:
    def __init__(self, fs: gridfs.GridFS) -> None:
        self.fs = fs

    def put(self, array: Any, name: str) -> Any:
        if array is None:
            return None
        array = np.asarray(array, dtype=float)
        if array.size <= INLINE_ARRAY_LIMIT:
            return array.tolist()
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        file_id = self.fs.put(
            buffer.getvalue(), filename=f"{name}.npy", content_type="application/x-npy"
        )
        return {"gridfs": file_id, "shape": list(array.shape)}

    def get(self, value: Any) -> np.ndarray | None:
        if value is None:
            return None
        if isinstance(value, Mapping) and "gridfs" in value:
            data = self.fs.get(value["gridfs"]).read()
            return np.load(io.BytesIO(data), allow_pickle=False)
        return np.asarray(value, dtype=float)
