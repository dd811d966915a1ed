"""The split policy and stage: which labels train a model, which choose its epoch
(validation) and which are held out to judge it.

One policy for every caller (a campaign run, the daemon's retraining, ``pestle evaluate``,
the reports). A label's role is decided once and recorded on the label; it never changes,
so a label a model trained on never becomes a held-out label for a later model. Per chemical
system, labels without a role, taken in the order of a stable hash of their id, first fill
the held-out share of the system's labels (at least one, never all), then the validation
share of the rest; the remainder trains. Given the same labels and fractions, a campaign and
the daemon hold out the same labels.

Labels made by different samplers teach different things (a strained cell's stress carries
the bulk modulus; a rattled one at the seed's volume does not), so a label is not taken out
of training when it is its sampler's last one and another label can go instead: with three
rattled picks and one strained, the strained one trains.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pestle.stages.context import stable_seed
from pestle.store import ROLE_HOLDOUT, ROLE_TRAIN, ROLE_VALIDATION

if TYPE_CHECKING:
    from pestle.config import CampaignConfig
    from pestle.stages.context import RunContext


def share(fraction: float, n: int) -> int:
    """How many of ``n`` items a fraction takes: at least one (unless the fraction is 0),
    never all."""
    if fraction <= 0 or n <= 1:
        return 0
    return min(max(1, math.ceil(fraction * n)), n - 1)


@dataclass(frozen=True)
class SplitPolicy:
    seed: int
    holdout_fraction: float
    validation_fraction: float

    @classmethod
    def from_config(cls, config: CampaignConfig) -> SplitPolicy:
        return cls(
            config.seed,
            config.evaluation.holdout_fraction,
            config.finetune.validation_fraction,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def order(self, label_ids: list[str]) -> list[str]:
        return sorted(label_ids, key=lambda i: stable_seed(self.seed, "holdout", i))

    def assign(
        self,
        by_system: Mapping[str, list[str]],
        existing: Mapping[str, str],
        samplers: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Roles of every label in ``by_system``: ``existing`` roles kept, new ones decided.
        ``samplers`` (label id -> sampler) keeps each sampler's last label training."""
        samplers = samplers or {}
        roles: dict[str, str] = {}
        for ids in by_system.values():
            kept = {i: existing[i] for i in ids if i in existing}
            roles.update(kept)
            new = self.order([i for i in ids if i not in existing])
            # Labels per sampler that would train if nothing more were taken out.
            training = Counter(
                samplers.get(i) for i in ids if kept.get(i, ROLE_TRAIN) == ROLE_TRAIN
            )
            held = sum(r == ROLE_HOLDOUT for r in kept.values())
            n_hold = max(0, share(self.holdout_fraction, len(ids)) - held)
            holdout = _take_out(new, n_hold, samplers, training)
            rest = [i for i in new if i not in holdout]
            n_rest = len(ids) - held - len(holdout)
            validating = sum(r == ROLE_VALIDATION for r in kept.values())
            n_val = (
                max(0, share(self.validation_fraction, n_rest) - validating)
                if self.validation_fraction
                else 0
            )
            validation = _take_out(rest, n_val, samplers, training)
            roles.update(dict.fromkeys(holdout, ROLE_HOLDOUT))
            roles.update(dict.fromkeys(validation, ROLE_VALIDATION))
            roles.update(dict.fromkeys((i for i in rest if i not in validation), ROLE_TRAIN))
        return roles


def _take_out(
    ordered: list[str], n: int, samplers: Mapping[str, str], training: Counter[str | None]
) -> list[str]:
    """``n`` of ``ordered`` (in order) to take out of training, passing over a label that is
    the last of its sampler to train while another can go; ``training`` is updated."""
    taken: list[str] = []
    for spare_only in (True, False):
        for i in ordered:
            if len(taken) == n:
                return taken
            sampler = samplers.get(i)
            if i in taken or (spare_only and sampler is not None and training[sampler] <= 1):
                continue
            taken.append(i)
            training[sampler] -= 1
    return taken


def split_by_role(
    by_system: Mapping[str, list[str]], roles: Mapping[str, str]
) -> dict[str, dict[str, list[str]]]:
    """{system: {"holdout": [...], "validation": [...], "train": [...]}} (sorted ids)."""
    return {
        system: {
            role: sorted(i for i in ids if roles.get(i) == role)
            for role in (ROLE_HOLDOUT, ROLE_VALIDATION, ROLE_TRAIN)
        }
        for system, ids in sorted(by_system.items())
    }


def pooled(split: Mapping[str, Mapping[str, list[str]]], role: str) -> list[str]:
    """Every system's labels of one role, sorted."""
    return sorted(i for part in split.values() for i in part[role])


class SplitStage:
    name = "split"
    requires = ("labels_by_system",)
    provides = ("split",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        by_system: dict[str, list[str]] = ctx.outputs["labels_by_system"]
        policy = SplitPolicy.from_config(ctx.config)
        ids = [i for members in by_system.values() for i in members]
        existing = ctx.store.labels.roles(ids)
        decided = policy.assign(by_system, existing, ctx.store.labels.samplers_of(ids))
        ctx.store.labels.set_roles(
            {i: r for i, r in decided.items() if i not in existing}, policy.as_dict()
        )
        # What is stored is the truth (another process may have decided a role meanwhile).
        split = split_by_role(by_system, ctx.store.labels.roles(ids))
        ctx.record("split", split)
        return {"split": split}
