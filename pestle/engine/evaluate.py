"""``pestle evaluate``: a model (stored version or pretrained potential) against its parent on
labelled structures (its held-out labels by default, a label query, or an extxyz file), per
chemical system and sampler; the result is recorded on a stored model's evaluations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pestle.stages.models import resolve_model
from pestle.store import Store, StoreError
from pestle.structures import LabelledStructure


def needs_store(model: str, data: str | None, parent: str | None = None) -> bool:
    """Whether evaluating ``model`` (against ``parent``) on ``data`` reads the store: a stored
    model on either side, or labels from the store (a query, or the held-out labels) rather
    than an extxyz file."""
    data_is_file = data is not None and Path(data).is_file()
    return model.startswith("model-") or (parent or "").startswith("model-") or not data_is_file


def labelled_data(
    store: Store | None, data: str | dict[str, Any] | None, model_id: str | None
) -> tuple[list[LabelledStructure], dict[str, str]]:
    """(labelled structures, structure id -> sampler) from an extxyz path, a label filter,
    or (``data`` None) the held-out labels of the stored model ``model_id``."""
    from pestle.evaluation.compare import read_labelled_extxyz

    if isinstance(data, str):
        return read_labelled_extxyz(data), {}
    if store is None:
        raise StoreError("a label query needs the store")
    label_filter = data
    if label_filter is None:
        doc = store.models.get(model_id) if model_id else None
        if doc is None and model_id is None:
            raise ValueError("--data is needed: an extxyz file or a label query")
        if doc is None:
            raise StoreError(f"no model {model_id} in the store (see `pestle models`)")
        if not doc.training.holdout_label_ids:
            raise ValueError("--data is needed: an extxyz file or a label query")
        label_filter = {"_id": {"$in": doc.training.holdout_label_ids}}
    stored = list(store.labels.labelled(label_filter))
    if not stored:
        raise ValueError(f"no labels match {label_filter}")
    return [s.labelled() for s in stored], {s.structure_id: s.sampler for s in stored}


def evaluate_model(
    store: Store | None,
    model: str,
    out: Path,
    *,
    data: str | dict[str, Any] | None = None,
    parent: str | None = None,
) -> dict[str, Any]:
    """Compare ``model`` with ``parent`` (default: a stored model's parent) on the data;
    writes the markdown table, JSON and parity plots to ``out`` and returns the comparison."""
    from bson import json_util

    from pestle.evaluation.compare import compare_models

    doc = store.models.get(model) if store is not None and model.startswith("model-") else None
    labelled, samplers = labelled_data(store, data, model if model.startswith("model-") else None)
    if parent is None and doc is not None and doc.parent.get("model"):
        parent = f"{doc.parent['family']}:{doc.parent['model']}"
    models = {}
    if parent is not None:
        models[parent] = resolve_model(parent, store, out / "models")
    models[model] = resolve_model(model, store, out / "models")
    result = compare_models(models, labelled, samplers=samplers or None, plot_dir=out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.md").write_text(result["table"] + "\n")
    (out / "evaluation.json").write_text(json_util.dumps(result, indent=1))
    if doc is not None:
        store.models.record_evaluation(
            model, "cli", [ls.label_id for ls in labelled], result["overall"][model]
        )
    result["n_structures"] = len(labelled)
    return json.loads(json_util.dumps(result))
