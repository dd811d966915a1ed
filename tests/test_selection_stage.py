"""The engine's score and select stages with a committee, descriptors, a softening prior and
a diversity selector, on real CHGNet models; then `pestle explain` on the outcome."""

from __future__ import annotations

from typer.testing import CliRunner

from pestle.config import CampaignConfig
from pestle.stages import (
    EvaluationSetStage,
    RunContext,
    SampleStage,
    ScoreStage,
    SeedStage,
    SelectStage,
    run_stages,
)


def test_committee_descriptors_and_fps_selection(
    store, mongo_uri, tmp_path, monkeypatch, raw_db
) -> None:
    config = CampaignConfig.model_validate(
        {
            "name": "scoring", "work_dir": str(tmp_path), "seed": 5,
            "seeds": [{"bulk": "Si", "crystalstructure": "diamond", "a": 5.43, "cubic": False}],
            "samplers": [{"name": "rattle", "params": {"amplitudes": [0.02, 0.3], "per_amplitude": 4}}],
            "potential": {"name": "chgnet", "params": {"model": "0.3.0"}},
            "scoring": {
                "committee": [{"name": "chgnet", "params": {"model": "0.2.0"}}],
                "embeddings": True,
                "weights": {"committee_force": 2.0, "expected_softening_error": 1.0},
                "softening_prior": 0.8,
            },
            "selection": {"selector": {"name": "fps", "params": {"score": "combined"}}, "per_system": 3},
            "labeller": {"name": "emt"},
            "evaluation": {"evaluation_set": {"per_system": 2}},
        }
    )  # fmt: skip
    campaign = RunContext(config, store, mongo_uri)
    campaign.start()
    stages = [SeedStage(), SampleStage(), ScoreStage(), EvaluationSetStage(), SelectStage()]
    outputs = run_stages(campaign, stages)
    picks = outputs["selected"]
    # The evaluation set: one of each rattle amplitude, drawn at random, never picked.
    (evaluation,) = outputs["evaluation_set"].values()
    assert len(evaluation) == 2 and not set(evaluation) & set(picks)
    amplitudes = {
        raw_db["structures"].find_one({"_id": i})["provenance"]["params"]["amplitude"]
        for i in evaluation
    }
    assert amplitudes == {0.02, 0.3}
    assert len(picks) == 3
    docs = {d["_id"]: d for d in raw_db["structures"].find({"kind": "candidate"})}
    key = campaign.model_key
    for doc in docs.values():
        assert {"committee_force", "committee_energy", "max_force", "pressure"} <= set(
            doc["scores"][key]
        )
        assert len(doc["embeddings"][key]) == 64
    # The committee disagrees more on the strongly rattled structures, and FPS starts there.
    first = next(
        p for p in docs.values() if p.get("selection", {}).get(campaign.run_id, {}).get("rank") == 0
    )
    assert first["provenance"]["params"]["amplitude"] == 0.3
    select = store.runs.require(campaign.run_id).stages["select"]
    # Per sampler and amplitude; nothing labelled yet, so the prior.
    assert {k: v["source"] for k, v in select["softening_estimates"].items()} == {
        "Si/rattle@0.02": "prior",
        "Si/rattle@0.3": "prior",
    }
    chosen = docs[picks[0]]["selection"][campaign.run_id]
    assert (
        chosen["scores"]["expected_softening_error"] > 0 and 0 <= chosen["scores"]["combined"] <= 1
    )

    # explain: a picked and an unpicked candidate, through the CLI against the same store.
    from pestle.cli import app

    monkeypatch.setenv("PESTLE_MONGODB_URI", mongo_uri)
    config_file = tmp_path / "scoring.yaml"
    config_file.write_text(
        "name: scoring\nseeds: [{bulk: Si, crystalstructure: diamond, a: 5.43}]\n"
        f"samplers: [{{name: rattle}}]\nstore: {{database: {store.database}}}\n"
    )
    runner = CliRunner()
    picked = runner.invoke(
        app, ["explain", picks[0][:10], "-c", str(config_file)], env={"COLUMNS": "200"}
    )
    assert picked.exit_code == 0, picked.output
    assert "selected" in picked.output and "committee_force=" in picked.output
    unpicked_id = next(i for i in docs if i not in picks)
    unpicked = runner.invoke(
        app, ["explain", unpicked_id, "-c", str(config_file)], env={"COLUMNS": "200"}
    )
    assert "not selected" in unpicked.output and "fps" in unpicked.output
    member = runner.invoke(
        app, ["explain", evaluation[0], "-c", str(config_file)], env={"COLUMNS": "200"}
    )
    assert "in the evaluation set of scoring" in member.output
    assert "not a candidate for picking (evaluation set)" in member.output
    missing = runner.invoke(app, ["explain", "zzzz", "-c", str(config_file)])
    assert missing.exit_code == 3 and "no structures match" in missing.output
