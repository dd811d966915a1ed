"""The report stage: the run's report beside its plots in the run folder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pestle.stages.context import RunContext


class ReportStage:
    name = "report"
    requires = ("evaluation", "model_id")
    provides = ("report",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pestle.reports.run_report import write_report

        run = ctx.store.runs.require(ctx.run_id)
        path = write_report(
            run.model_dump(by_alias=True), run.stages.get("evaluate", {}),
            ctx.outputs["model_id"], ctx.run_dir, store=ctx.store,
        )  # fmt: skip
        ctx.record("report", {"path": str(path)})
        return {"report": path}
