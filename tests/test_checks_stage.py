"""The convergence gate and the equation-of-state check inside a campaign run: a system whose
labeller settings are not converged is not labelled (and the message says what to raise), or
with auto_raise it labels at the raised settings; every seed's equation of state is computed
once by the labeller and compared with each model's."""

from __future__ import annotations

from pathlib import Path

import pytest

from pestle.config import CampaignConfig
from pestle.dispatch.cluster import make_client
from pestle.engine.run import run_campaign
from pestle.store import Store


def config(tmp_path: Path, database: str, **overrides: object) -> CampaignConfig:
    raw = {
        "name": "checks", "seed": 4, "work_dir": str(tmp_path / "work"),
        "seeds": [{"name": "Si", "bulk": "Si", "crystalstructure": "diamond", "a": 5.43,
                   "cubic": False}],
        "samplers": [{"name": "rattle", "params": {"amplitudes": [0.05, 0.1], "per_amplitude": 2}}],
        "potential": {"name": "chgnet", "params": {"model": "0.3.0"}},
        # A 2-atom cell at a cutoff far too low for silicon: the gate must notice.
        "labeller": {"name": "gpaw", "params": {"ecut": 120, "kpoint_density": 1.0,
                                                "spinpol": False}},
        "selection": {"per_system": 1},
        "evaluation": {"evaluation_set": {"per_system": 2, "min_structures": 2}},
        "finetune": {"enabled": False},
        "eos": {"points": 5, "volume_range": 0.06},
        "store": {"database": database},
        "dask": {"n_workers": 2},
        **overrides,
    }  # fmt: skip
    return CampaignConfig.model_validate(raw)


@pytest.mark.slow
def test_an_unconverged_system_is_not_labelled(store: Store, mongo_uri: str, tmp_path) -> None:
    settings = config(tmp_path, store.database)
    with make_client(settings.dask) as client:
        result = run_campaign(settings, store, mongo_uri, client)
    gate = result.stages["convergence"]["Si"]
    assert gate["status"] == "not_converged" and gate["passed"] is False
    assert "labeller.params.ecut" in gate["message"] and "Si" in gate["message"]
    assert result.stages["label"]["blocked"] == {"Si": gate["message"]}
    assert result.stages["label"]["dispatched"] == 0
    # Only the gate's own calculations were made; none is a label of a candidate.
    assert {label.role for label in store.labels.find()} == {"check"}
    assert result.stages["eos"]["seeds"]["Si"]["skipped"]
    # The verdict is kept: a second run does not compute the gate again.
    before = store.labels.count()
    with make_client(settings.dask) as client:
        again = run_campaign(settings, store, mongo_uri, client)
    assert store.labels.count() == before and again.stages["label"]["blocked"]
    # A verdict made under other criteria is made again, from the stored calculations.
    looser = config(tmp_path, store.database,
                    convergence={"tolerances": {"stress_max": 1e4, "pulay_stress": 1e4}})  # fmt: skip
    with make_client(looser.dask) as client:
        redecided = run_campaign(looser, store, mongo_uri, client)
    verdict = redecided.stages["convergence"]["Si"]
    assert store.labels.count() == before and verdict["passed"] is False
    assert "stress" not in verdict["unconverged_quantities"]
    assert "largest stress component" not in verdict["message"]
    assert "largest stress component" in gate["message"]


@pytest.mark.slow
def test_auto_raise_labels_at_the_raised_cutoff_and_checks_the_eos(
    store: Store, mongo_uri: str, tmp_path
) -> None:
    settings = config(tmp_path, store.database, convergence={"auto_raise": True, "max_raises": 4})
    with make_client(settings.dask) as client:
        result = run_campaign(settings, store, mongo_uri, client)
    gate = result.stages["convergence"]["Si"]
    assert gate["status"] == "raised" and gate["passed"]
    raised = gate["recommended"]["ecut"]
    assert raised > 120 and gate["recommended_fields"]["labeller.params.ecut"] == raised
    label = result.stages["label"]["by_system"]["Si"]
    for field, value in gate["recommended_fields"].items():  # k-points may be raised too
        assert label["level_of_theory"][field.rpartition(".")[2]] == value
    assert label["lot_hash"] != result.stages["label"]["lot_hash"]  # not the configured one
    candidates = [doc for doc in store.labels.find() if doc.role != "check"]
    assert len(candidates) == 3 and {doc.lot_hash for doc in candidates} == {label["lot_hash"]}
    # The equation of state: DFT at the raised settings, once, against pretrained CHGNet.
    eos = result.stages["eos"]["seeds"]["Si"]
    assert eos["reference"]["status"] == "ok" and eos["reference"]["n_points"] == 5
    assert 50 < eos["reference"]["b0"] < 150  # GPa; silicon is ~90 with PBE
    model = eos["models"]["pretrained"]
    assert model["status"] == "ok" and 0.5 < model["b0_ratio"]["value"] < 1.5
    assert eos["verdicts"]["pretrained"] in ("within", "undecided", "outside")
    assert {d.provenance.model_dump().get("purpose") for d in store.structures.find(
        {"kind": "eos"})} == {"equation of state"}  # fmt: skip
