"""CLI pieces that need no campaign: query parsing, the embedded server commands."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pestle.cli import app, parse_query


def test_parse_query_terms_and_json() -> None:
    assert parse_query(["chemical_system=F-Li", "natoms>=8", "natoms<100", "kind!=seed"]) == {
        "chemical_system": "F-Li",
        "natoms": {"$gte": 8, "$lt": 100},
        "kind": {"$ne": "seed"},
    }
    assert parse_query(['{"max_force": {"$gt": 1.5}}']) == {"max_force": {"$gt": 1.5}}
    assert parse_query(["converged=true", "x=1.5"]) == {"converged": True, "x": 1.5}
    with pytest.raises(ValueError, match="not key=value"):
        parse_query(["natoms"])
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_query(["{nope"])


def test_db_start_status_stop(tmp_path) -> None:
    runner = CliRunner()
    work = str(tmp_path / "work")
    assert runner.invoke(app, ["db", "status", "-w", work]).exit_code == 1
    started = runner.invoke(app, ["db", "start", "-w", work])
    assert started.exit_code == 0, started.output
    assert "127.0.0.1" in started.output
    again = runner.invoke(app, ["db", "start", "-w", work])  # reuses the same server
    assert again.output.split("pid")[1] == started.output.split("pid")[1]
    assert runner.invoke(app, ["db", "status", "-w", work]).exit_code == 0
    assert "stopped" in runner.invoke(app, ["db", "stop", "-w", work]).output
    assert runner.invoke(app, ["db", "status", "-w", work]).exit_code == 1


def test_bad_config_exits_with_clear_message(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nseeds: []\nsamplers: []\n")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 3  # bad input, not a usage error
    assert str(path) in result.output and "seeds" in result.output


def test_samplers_lists_every_sampler_with_defaults() -> None:
    from pestle.samplers import SAMPLERS

    result = CliRunner().invoke(app, ["samplers"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in SAMPLERS.names():
        assert f"│ {name} " in result.output
        for field in SAMPLERS.get(name).Params.model_fields:
            assert field in result.output
    assert "[0.05, 0.1, 0.2]" in result.output and "list[float]" in result.output
