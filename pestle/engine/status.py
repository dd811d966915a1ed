"""What is in a store, as ``pestle status`` and ``pestle models`` show it: document counts,
job states, recent runs; model versions with their latest held-out softening scales."""

from __future__ import annotations

from dataclasses import dataclass, field

from pestle.store import Store
from pestle.store.documents import RunDoc


@dataclass
class StoreStatus:
    uri: str  # password masked
    database: str
    counts: dict[str, int]
    jobs: dict[str, int]
    runs: list[RunDoc] = field(default_factory=list)


def store_status(store: Store, recent_runs: int = 5) -> StoreStatus:
    return StoreStatus(
        store.uri_masked,
        store.database,
        store.counts(),
        dict(sorted(store.jobs.counts().items())),
        store.runs.recent(recent_runs),
    )


@dataclass
class ModelVersion:
    id: str
    family: str
    parent: str
    train_labels: int
    softening: dict[str, float]  # chemical system -> slope, of the latest evaluation
    current: bool


def model_versions(store: Store) -> list[ModelVersion]:
    """Every stored model version with the softening scales of its latest evaluation (whoever
    made it: a run, the daemon, ``pestle evaluate``) and whether it is its family's current."""
    promoted = {d["family"]: d["model_id"] for d in store.models.promoted_all()}
    out = []
    for doc in store.models.all():
        evaluation = doc.evaluations[-1].metrics if doc.evaluations else {}
        softening = {
            system: float(m["softening"]["slope"])
            for system, m in sorted(evaluation.items())
            if isinstance(m, dict) and "softening" in m
        }
        out.append(
            ModelVersion(
                doc.id,
                doc.family,
                str(doc.parent.get("model") or doc.parent.get("checkpoint_sha256") or ""),
                len(doc.training.label_ids),
                softening,
                promoted.get(doc.family) == doc.id,
            )
        )
    return out
