"""The pipeline's stages as units: each declares what it needs from earlier stages of the
same pass (``requires``) and what it hands on (``provides``), reads the rest from the store
through the ``RunContext`` and records its outcome in the run document.

A campaign run is one pass over ``CAMPAIGN``; a daemon round is ``ROUND``; the daemon's
retraining is ``RETRAIN`` over every label of the campaign. Composition lives outside the
units (``pestle.engine``), in the spirit of maggma's Builders and jobflow's Makers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pestle.stages.context import Round, RunContext
from pestle.stages.convergence import ConvergenceStage
from pestle.stages.eos import EOSReferenceStage, EOSStage
from pestle.stages.evaluate import EvaluateStage
from pestle.stages.evaluation_set import EvaluationSetStage
from pestle.stages.finetune import FinetuneStage
from pestle.stages.label import LabelStage
from pestle.stages.report import ReportStage
from pestle.stages.sample import SampleStage
from pestle.stages.score import ScoreStage
from pestle.stages.seed import SeedStage
from pestle.stages.select import SelectStage
from pestle.stages.split import SplitStage


class Stage(Protocol):
    name: str
    requires: tuple[str, ...]
    provides: tuple[str, ...]

    def run(self, ctx: RunContext) -> dict[str, Any]: ...


def run_stages(ctx: RunContext, stages: Sequence[Stage]) -> dict[str, Any]:
    """Run ``stages`` in order on one context; returns everything they provided."""
    for stage in stages:
        missing = [key for key in stage.requires if key not in ctx.outputs]
        if missing:
            raise RuntimeError(f"stage {stage.name} needs {missing} from an earlier stage")
        produced = stage.run(ctx)
        unexpected = set(produced) - set(stage.provides)
        if unexpected:
            raise RuntimeError(f"stage {stage.name} provided undeclared {sorted(unexpected)}")
        ctx.outputs.update(produced)
    return ctx.outputs


def campaign_stages() -> list[Stage]:
    """A campaign run: the labeller's settings checked per system, candidates sampled and
    scored, the evaluation set drawn and labelled first (its labels measure the softening
    that guides the picks), the picks selected and labelled with the seeds' reference E-V
    scans, split, fine-tuned, judged on the evaluation set and by the equation of state,
    reported."""
    return [SeedStage(), ConvergenceStage(), SampleStage(), ScoreStage(), EvaluationSetStage(),
            LabelStage("evaluation"), SelectStage(), LabelStage("picks"), EOSReferenceStage(),
            SplitStage(), FinetuneStage(), EvaluateStage("pretrained"), EOSStage("pretrained"),
            ReportStage()]  # fmt: skip


__all__ = [
    "ConvergenceStage",
    "EOSReferenceStage",
    "EOSStage",
    "EvaluateStage",
    "EvaluationSetStage",
    "FinetuneStage",
    "LabelStage",
    "ReportStage",
    "Round",
    "RunContext",
    "SampleStage",
    "ScoreStage",
    "SeedStage",
    "SelectStage",
    "SplitStage",
    "Stage",
    "campaign_stages",
    "run_stages",
]
