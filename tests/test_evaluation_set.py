"""The evaluation set: drawn at random, stratified by sampler and amplitude, from every valid
candidate of a system; kept once drawn; never selected, never trained on."""

from __future__ import annotations

from collections import Counter

import pytest

from pestle.config import CampaignConfig
from pestle.stages import (
    EvaluationSetStage,
    LabelStage,
    RunContext,
    SampleStage,
    SeedStage,
    SelectStage,
    SplitStage,
    run_stages,
)
from pestle.stages.evaluation_set import allocate, amplitude, draw, strata
from pestle.store.documents import Provenance, StructureDoc


def doc(i: int, sampler: str, **params) -> StructureDoc:
    return StructureDoc(_id=f"s{i:03d}", provenance=Provenance(sampler=sampler, params=params))


def test_strata_follow_sampler_and_amplitude() -> None:
    docs = [doc(i, "rattle", amplitude=a) for i, a in enumerate([0.05, 0.1, 0.2] * 10)]
    docs += [doc(100 + i, "strain", strain=[[0.001 * i, 0, 0], [0, 0, 0], [0, 0, 0]])
             for i in range(40)]  # fmt: skip
    groups = strata(docs)
    assert sorted(k for k in groups if k.startswith("rattle")) == [
        "rattle@0.05",
        "rattle@0.1",
        "rattle@0.2",
    ]
    strain = [k for k in groups if k.startswith("strain")]
    assert len(strain) == 6 and all(6 <= len(groups[k]) <= 7 for k in strain)  # quantile bins
    assert amplitude({"temperature_K": 600}) == 600 and amplitude({"index": 3}) is None


def test_allocation_is_proportional_and_bounded() -> None:
    assert allocate({"a": 30, "b": 10}, 8) == {"a": 6, "b": 2}
    assert allocate({"a": 1, "b": 100}, 10) == {"a": 0, "b": 10}
    assert allocate({"a": 2, "b": 2}, 10) == {"a": 2, "b": 2}  # never more than there is
    assert sum(allocate({"a": 3, "b": 3, "c": 3}, 4).values()) == 4


def test_the_draw_is_random_stratified_and_reproducible() -> None:
    docs = [doc(i, "rattle", amplitude=a) for i, a in enumerate([0.05, 0.1, 0.2] * 20)]
    docs += [doc(100 + i, "strain", strain=[[0.01, 0, 0], [0, 0, 0], [0, 0, 0]]) for i in range(30)]
    chosen = draw(docs, 9, seed=1)
    assert chosen == draw(list(reversed(docs)), 9, seed=1)  # order does not matter
    assert chosen != draw(docs, 9, seed=2)  # the seed does
    by_id = {d.id: d for d in docs}
    counts = Counter(
        (by_id[i].provenance.sampler, by_id[i].provenance.params.get("amplitude")) for i in chosen
    )
    assert counts == {("rattle", 0.05): 2, ("rattle", 0.1): 2, ("rattle", 0.2): 2,
                      ("strain", None): 3}  # fmt: skip
    # Not the largest displacements, as score-ranked picks would be: every amplitude.
    assert {by_id[i].provenance.params.get("amplitude") for i in chosen} >= {0.05, 0.1, 0.2}


@pytest.mark.slow
def test_the_set_is_labelled_once_never_picked_never_trained_on(store, mongo_uri, tmp_path) -> None:
    from pestle.dispatch.cluster import make_client

    config = CampaignConfig.model_validate(
        {
            "name": "evalset", "seed": 2, "work_dir": str(tmp_path),
            "seeds": [{"bulk": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True}],
            "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05, 0.2], "per_amplitude": 6}}],
            "potential": {"name": "emt"}, "labeller": {"name": "emt"},
            "selection": {"per_system": 3},
            "evaluation": {"evaluation_set": {"per_system": 4}, "holdout_fraction": 0.34},
            "dask": {"n_workers": 1},
        }
    )  # fmt: skip
    from pestle.stages import ScoreStage

    stages = [SeedStage(), SampleStage(), ScoreStage(), EvaluationSetStage(), SelectStage(),
              LabelStage(), SplitStage()]  # fmt: skip
    with make_client(config.dask) as client:
        run = RunContext(config, store, mongo_uri, client=client)
        run.start()
        outputs = run_stages(run, stages)
    (members,) = outputs["evaluation_set"].values()
    assert len(members) == 4 and not set(members) & set(outputs["selected"])
    evaluation_labels = [f"{sid}-{run.lot_hash}" for sid in members]
    assert set(store.labels.roles(evaluation_labels).values()) == {"evaluation"}
    split = outputs["split"]["Cu"]
    trained = set(split["train"]) | set(split["validation"]) | set(split["holdout"])
    assert not trained & set(evaluation_labels)
    # The daemon's retraining sees only trainable labels.
    trainable = store.labels.ids_by_system(run.lot_hash, ["Cu"], trainable=True)["Cu"]
    assert not set(trainable) & set(evaluation_labels) and len(trainable) == 3
    # Kept once drawn: a later round draws nothing new (its set is full).
    assert store.structures.evaluation_set("evalset") == {"Cu": sorted(members)}


def test_a_run_that_differs_downstream_picks_the_same_structures(
    store, mongo_uri, tmp_path
) -> None:
    """Changing only the fine-tuning recipe makes a new run (its science differs), but its
    picks, guided by softening fitted on the campaign's evaluation set alone, are the same:
    the labels the first run paid for are reused and nothing new is computed. (Fitted on
    every stored label, the second run would see the first run's picks and choose anew.)"""
    from pestle.dispatch.cluster import make_client
    from pestle.stages import ScoreStage

    def config(trainer: dict) -> CampaignConfig:
        return CampaignConfig.model_validate(
            {
                "name": "downstream", "seed": 3, "work_dir": str(tmp_path),
                "seeds": [{"bulk": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True}],
                "samplers": [{"name": "rattle", "params": {"amplitudes": [0.03, 0.1, 0.3],
                                                           "per_amplitude": 5}}],
                "potential": {"name": "chgnet", "params": {"model": "0.3.0"}},
                "scoring": {"weights": {"expected_softening_error": 1.0},
                            "softening_min_components": 12},
                "selection": {"selector": {"name": "topk", "params": {"score": "combined"}},
                              "per_system": 3},
                "labeller": {"name": "emt"},
                "evaluation": {"evaluation_set": {"per_system": 6}, "holdout_fraction": 0},
                "finetune": {"trainer": trainer},
                "dask": {"n_workers": 1},
            }
        )  # fmt: skip

    def picks_of(cfg: CampaignConfig) -> tuple[str, list[str], dict]:
        stages = [SeedStage(), SampleStage(), ScoreStage(), EvaluationSetStage(),
                  LabelStage("evaluation"), SelectStage(), LabelStage("picks")]  # fmt: skip
        with make_client(cfg.dask) as client:
            run = RunContext(cfg, store, mongo_uri, client=client)
            run.start()
            outputs = run_stages(run, stages)
        estimates = store.runs.require(run.run_id).stages["select"]["softening_estimates"]
        return run.run_id, sorted(outputs["selected"]), estimates

    first_run, first, first_estimates = picks_of(
        config({"name": "chgnet", "params": {"mode": "full"}})
    )
    labels_before = store.labels.count()
    second_run, second, second_estimates = picks_of(
        config({"name": "chgnet", "params": {"mode": "full", "l2sp": 1.0}})
    )
    assert first_run != second_run
    assert second == first and second_estimates == first_estimates
    # Fitted per amplitude on the evaluation set, not the prior.
    assert any(e["source"].startswith("system+") for e in first_estimates.values())
    assert store.labels.count() == labels_before == 6 + 3
