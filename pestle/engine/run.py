"""A campaign run: one pass over the stages (seed, sample, score, select, label, split,
fine-tune, evaluate, report) against one store.

Every stage is idempotent and records what it did in the run document, so running the same
config again stores nothing twice, and a run killed mid-way resumes where it stopped: the run
id is a hash of the config's scientific content, sampling is deterministic and deduplicated,
the selection is stored once and reused, labels are keyed by structure and level of theory,
label roles are recorded once, and a model is keyed by its trainer settings and labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pestle.config import CampaignConfig
from pestle.stages import RunContext, campaign_stages, run_stages
from pestle.stages.context import Progress
from pestle.store import Store


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    report: Path | None
    stages: dict[str, Any] = field(default_factory=dict)


def run_passes(ctx: RunContext, stages: list) -> dict[str, Any]:
    """Check the inputs, open the run document, run the stages, and close it as finished
    or interrupted."""
    ctx.preflight()  # a bad input stops here, before anything is stored
    ctx.start()
    try:
        outputs = run_stages(ctx, stages)
    except BaseException as exc:
        ctx.finish("interrupted", error=repr(exc))
        raise
    report = outputs.get("report")
    ctx.finish("finished", **({"report": str(report)} if report else {}))
    return outputs


def prepare_campaign(
    config: CampaignConfig, store: Store, store_uri: str, *, seeds: list[Any] | None = None
) -> RunContext:
    """A run's context with its inputs checked (ConfigError otherwise), before any cluster
    is started or anything stored; ``run_campaign(..., context=...)`` runs it."""
    ctx = RunContext(config, store, store_uri, seeds=seeds or [])
    ctx.preflight()
    return ctx


def run_campaign(
    config: CampaignConfig,
    store: Store,
    store_uri: str,
    client: Any = None,
    *,
    progress: Progress | None = None,
    seeds: list[Any] | None = None,
    context: RunContext | None = None,
) -> RunResult:
    """Run a campaign once. ``seeds``: ASE ``Atoms`` or pymatgen ``Structure`` objects, used
    beside the config's. ``client``: a ``distributed.Client`` (labelling and fine-tuning).
    ``context``: one made by ``prepare_campaign`` (its checks already done)."""
    ctx = context or RunContext(config, store, store_uri, seeds=seeds or [])
    ctx.client = client
    if progress is not None:
        ctx.progress = progress
    outputs = run_passes(ctx, campaign_stages())
    run = store.runs.require(ctx.run_id)
    return RunResult(ctx.run_id, ctx.run_dir, outputs.get("report"), run.stages)
