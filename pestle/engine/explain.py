"""Why a candidate was, or was not, picked for labelling in each run it took part in: read
from what the select stage recorded, never re-derived."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pestle.store import Store, StoreError
from pestle.store.documents import LabelDoc, StructureDoc


@dataclass
class RunVerdict:
    run_id: str
    reached_selection: bool
    selected: bool = False
    rank: int | None = None
    reason: str = ""
    selector: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None
    picked_in_system: int = 0
    weights: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Explanation:
    structure: StructureDoc
    runs: list[RunVerdict]
    label: LabelDoc | None


def explain_structure(store: Store, structure_id: str) -> Explanation:
    """``structure_id``: a full id or a unique prefix."""
    matches = store.structures.by_prefix(structure_id, limit=2)
    if len(matches) != 1:
        more = " (give more characters)" if matches else ""
        raise StoreError(f"{len(matches) or 'no'} structures match {structure_id!r}{more}")
    doc = matches[0]
    verdicts = []
    for run_id in doc.runs:
        run = store.runs.get(run_id)
        stages = run.stages if run is not None else {}
        select = stages.get("select")
        if select is None:
            verdicts.append(RunVerdict(run_id, reached_selection=False))
            continue
        key = (stages.get("score") or {}).get("model_key")
        verdict = RunVerdict(
            run_id,
            reached_selection=True,
            selector=select["selector"],
            budget=select["per_system"],
            weights=select.get("weights", {}),
            scores=dict(doc.scores.get(key, {})),
        )
        picked = doc.selection.get(run_id)
        if picked is not None:
            verdict.selected, verdict.rank, verdict.reason = True, picked.rank, picked.reason
            verdict.scores = dict(picked.scores) or verdict.scores
        else:
            systems = store.structures.chemical_systems(s["id"] for s in select["selected"])
            verdict.picked_in_system = sum(v == doc.chemical_system for v in systems.values())
        verdicts.append(verdict)
    return Explanation(doc, verdicts, store.labels.for_structure(doc.id))
