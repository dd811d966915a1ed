"""Bad configs fail before anything runs, naming the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pestle.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal() -> dict:
    return {
        "name": "t",
        "seeds": [{"bulk": "Si", "crystalstructure": "diamond", "a": 5.43}],
        "samplers": [{"name": "rattle", "params": {"amplitudes": [0.1]}}],
    }


def test_quickstart_config_is_valid() -> None:
    config = load_config(REPO / "configs" / "quickstart.yaml")
    assert {s.bulk for s in config.seeds} == {"Si", "LiF"}
    assert [s.name for s in config.samplers] == ["rattle", "strain"]
    assert config.labeller.name == "gpaw"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, {**minimal(), "samplerz": []})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "samplerz" in str(err.value)


def test_unknown_sampler_names_the_field(tmp_path: Path) -> None:
    data = minimal()
    data["samplers"].append({"name": "shake"})
    with pytest.raises(ConfigError, match=r"samplers\.1\.name: unknown sampler 'shake'"):
        load_config(write(tmp_path, data))


def test_bad_sampler_param_value(tmp_path: Path) -> None:
    data = minimal()
    data["samplers"][0]["params"]["amplitudes"] = [-0.1]
    with pytest.raises(ConfigError, match=r"samplers\.0\.params\.amplitudes"):
        load_config(write(tmp_path, data))


def test_unknown_labeller_param(tmp_path: Path) -> None:
    data = {**minimal(), "labeller": {"name": "gpaw", "params": {"ecutt": 300}}}
    with pytest.raises(ConfigError, match=r"labeller\.params\.ecutt"):
        load_config(write(tmp_path, data))


def test_bad_budget_and_seed(tmp_path: Path) -> None:
    data = {**minimal(), "selection": {"per_system": 0}}
    with pytest.raises(ConfigError, match=r"selection\.per_system"):
        load_config(write(tmp_path, data))
    data = minimal()
    data["seeds"] = [{"bulk": "Si", "file": "x.cif"}]
    with pytest.raises(ConfigError, match="exactly one of 'file', 'bulk' or 'mp'"):
        load_config(write(tmp_path, data))


def test_a_model_file_that_does_not_exist_is_named(tmp_path: Path) -> None:
    data = {**minimal(), "finetune": {"trainer": {"name": "mace",
                                                  "params": {"model_path": "no/such.model"}}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"finetune\.trainer\.params\.model_path: .*no/such\.model "
                                          "does not exist"):  # fmt: skip
        load_config(write(tmp_path, data))
    (tmp_path / "here.model").write_bytes(b"x")
    data["finetune"]["trainer"]["params"]["model_path"] = "here.model"
    config = load_config(write(tmp_path, data))
    assert config.finetune.trainer.params["model_path"] == str(tmp_path / "here.model")


def test_missing_seed_file_and_bad_yaml(tmp_path: Path) -> None:
    data = minimal()
    data["seeds"] = [{"file": "missing.cif"}]
    with pytest.raises(ConfigError, match="missing.cif does not exist"):
        load_config(write(tmp_path, data))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
