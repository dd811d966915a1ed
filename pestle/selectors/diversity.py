"""Diverse batches in a descriptor (embedding) space, per chemical system:

- ``fps``: farthest-point sampling, seeded with the best-scoring candidate;
- ``direct``: DIRECT-style stratification: PCA of the embeddings, k-means into as many
  clusters as the budget, the best-scoring candidate of each cluster.

Each candidate's ``extra["embedding"]`` holds its descriptor (e.g. CHGNet's crystal
features). Learned features share one scale, so distances use them as they are; ``standardise``
rescales each feature to unit variance first (for hand-made descriptors in mixed units), at
the price of inflating near-constant, noisy features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pestle.selectors import SELECTORS, ScoredCandidate, Selection, group_by_system


def embeddings(group: Sequence[ScoredCandidate], standardise: bool = False) -> np.ndarray:
    """Centred descriptors of a group (one row per candidate)."""
    missing = [c.id for c in group if "embedding" not in c.extra]
    if missing:
        raise KeyError(f"diversity selection needs extra['embedding'] (missing for {missing[0]})")
    x = np.array([np.asarray(c.extra["embedding"], dtype=float) for c in group])
    x = x - x.mean(axis=0)
    if standardise:
        spread = x.std(axis=0)
        x = x / np.where(spread > 0, spread, 1.0)
    return x


def farthest_points(x: np.ndarray, start: int, count: int) -> list[tuple[int, float]]:
    """Indices picked by farthest-point sampling from ``start``, with each pick's distance
    to the nearest earlier pick (inf for the first)."""
    picks = [(start, float("inf"))]
    nearest = np.linalg.norm(x - x[start], axis=1)
    while len(picks) < min(count, len(x)):
        index = int(np.argmax(nearest))  # argmax takes the first of equals: deterministic
        picks.append((index, float(nearest[index])))
        nearest = np.minimum(nearest, np.linalg.norm(x - x[index], axis=1))
    return picks


@SELECTORS.register("fps")
class FarthestPointSelector:
    """Farthest-point sampling in the embedding space, per chemical system, seeded with the
    best-scoring candidate."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        score: str = Field(default="max_force", description="picks the starting candidate")
        standardise: bool = Field(
            default=False,
            description="rescale each embedding feature to unit variance first (descriptors in "
            "mixed units; inflates near-constant, noisy features)",
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def select(
        self, candidates: Sequence[ScoredCandidate], per_system_budget: int
    ) -> list[Selection]:
        key = self.params.score
        picks = []
        for system, group in group_by_system(candidates, key, "fps").items():
            x = embeddings(group, self.params.standardise)
            start = max(range(len(group)), key=lambda i: (group[i].scores[key], group[i].id))
            for rank, (index, distance) in enumerate(farthest_points(x, start, per_system_budget)):
                reason = (
                    f"highest {key}={group[index].scores[key]:.3f} in {system}: FPS start"
                    if rank == 0
                    else f"farthest point #{rank + 1} in {system}: {distance:.3g} from the "
                    "nearest earlier pick in descriptor space"
                )
                picks.append(Selection(id=group[index].id, rank=rank, reason=reason))
        return picks


@SELECTORS.register("direct")
class StratifiedSelector:
    """DIRECT-style stratification, per chemical system: PCA of the embeddings, k-means into as
    many clusters as the budget, the best-scoring candidate of each cluster."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        score: str = Field(default="max_force", description="best of each cluster by this")
        explained_variance: float = Field(
            default=0.9,
            gt=0,
            le=1,
            description="PCA keeps the leading components that explain this share of variance",
        )
        standardise: bool = Field(
            default=False,
            description="rescale each embedding feature to unit variance first (descriptors in "
            "mixed units; inflates near-constant, noisy features)",
        )
        seed: int = Field(default=0, description="random seed of the first k-means start")
        restarts: int = Field(
            default=10, ge=1, description="k-means++ starts; the tightest clustering is kept"
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def select(
        self, candidates: Sequence[ScoredCandidate], per_system_budget: int
    ) -> list[Selection]:
        from scipy.cluster.vq import kmeans2

        p = self.params
        picks = []
        for system, group in group_by_system(candidates, p.score, "direct").items():
            x = embeddings(group, p.standardise)
            k = min(per_system_budget, len(group))
            # PCA: keep the leading components that explain the requested variance.
            _, singular, vt = np.linalg.svd(x, full_matrices=False)
            share = np.cumsum(singular**2) / max(float((singular**2).sum()), 1e-300)
            n_components = int(np.searchsorted(share, p.explained_variance) + 1)
            projected = x @ vt[:n_components].T
            # k-means++ from several starts, the tightest clustering kept: one start can
            # settle in a poor local minimum that merges two clusters.
            best_inertia, labels = np.inf, None
            for start in range(p.restarts):
                centres, trial = kmeans2(projected, k, rng=p.seed + start, minit="++")
                inertia = float(((projected - centres[trial]) ** 2).sum())
                if inertia < best_inertia - 1e-12:
                    best_inertia, labels = inertia, trial
            best = {}
            for index, label in enumerate(labels):
                current = best.get(label)
                if current is None or group[index].scores[p.score] > group[current].scores[p.score]:
                    best[label] = index
            chosen = sorted(best.items(), key=lambda kv: -group[kv[1]].scores[p.score])
            for rank, (label, index) in enumerate(chosen):
                picks.append(
                    Selection(
                        id=group[index].id,
                        rank=rank,
                        reason=f"best {p.score}={group[index].scores[p.score]:.3f} of cluster "
                        f"{label} ({int((labels == label).sum())} candidates, "
                        f"{n_components} principal components) in {system}",
                    )
                )
        return picks
