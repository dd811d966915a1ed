"""What a user reads and writes of every plugin's params: one spelling of each option across
the trainers (the old spellings still read, with a deprecation warning), and a description
for every parameter ``pestle plugins`` lists."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pestle.config import load_config
from pestle.labellers import LABELLERS
from pestle.plugins import describe_plugins, old_names
from pestle.potentials import POTENTIALS
from pestle.samplers import SAMPLERS
from pestle.selectors import SELECTORS
from pestle.trainers import TRAINERS

REGISTRIES = (SAMPLERS, POTENTIALS, SELECTORS, LABELLERS, TRAINERS)

# The spellings every trainer uses for the model fine-tuning starts from and for refitting the
# per-element reference energies; an old spelling -> (trainer, the field it now is).
OLD_SPELLINGS = {
    ("chgnet", "base_model"): "model",
    ("chgnet", "base_checkpoint"): "model_path",
    ("chgnet", "refit_atom_ref"): "refit_element_refs",
    ("mace", "foundation_model"): "model_path",
    ("mace", "foundation_model_sha256"): "model_sha256",
    ("mace", "e0s"): "refit_element_refs",
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch) -> None:
    """Each deprecation is logged once per process; every test here starts afresh."""
    monkeypatch.setattr("pestle.plugins._warned", set())


def test_trainers_spell_the_shared_options_alike() -> None:
    for name in ("chgnet", "mace", "matgl"):
        fields = TRAINERS.get(name).Params.model_fields
        assert {"model_path", "refit_element_refs"} <= set(fields), name
    assert {(t, old): new for t in ("chgnet", "mace", "matgl")
            for old, new in old_names(TRAINERS.get(t).Params).items()} == OLD_SPELLINGS  # fmt: skip


@pytest.mark.parametrize(("trainer", "old"), sorted(OLD_SPELLINGS))
def test_old_spellings_are_read_with_a_warning(trainer: str, old: str, caplog) -> None:
    new = OLD_SPELLINGS[trainer, old]
    values = {"base_model": "0.3.0", "base_checkpoint": "/m/ckpt.pt", "refit_atom_ref": False,
              "foundation_model": "/m/f.model", "foundation_model_sha256": "ab" * 32,
              "e0s": "foundation"}  # fmt: skip
    required = {"mace": {"model_path": "/m/f.model"}}.get(trainer, {})
    params = TRAINERS.get(trainer).Params
    with caplog.at_level(logging.WARNING, logger="pestle.plugins"):
        read = params.model_validate({**required, old: values[old]} if new not in required
                                     else {old: values[old]})  # fmt: skip
    expected = {"e0s": False, "refit_atom_ref": False}.get(old, values[old])
    assert str(getattr(read, new)) == str(expected)
    assert f"trainer {trainer}: params.{old} is deprecated, it is now params.{new}" in caplog.text
    assert old not in read.model_dump() and new in read.model_dump()  # recorded as the new name
    with pytest.raises(ValidationError, match=f"give {new} or its old name {old}, not both"):
        params.model_validate({**required, old: values[old], new: values[old]})


def test_an_old_spelling_in_a_config_resolves_its_path_and_warns(tmp_path: Path, caplog) -> None:
    config = {
        "name": "t",
        "seeds": [{"bulk": "Cu", "crystalstructure": "fcc", "a": 3.6}],
        "samplers": [{"name": "rattle"}],
        "finetune": {"trainer": {"name": "mace", "params": {
            "foundation_model": "models/f.model", "trust_model_file": True, "e0s": "refit"}}},
    }  # fmt: skip
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "f.model").write_bytes(b"")  # a model file must exist to be named
    with caplog.at_level(logging.WARNING, logger="pestle.plugins"):
        loaded = load_config(path)
    params = TRAINERS.get("mace").Params.model_validate(loaded.finetune.trainer.params)
    assert params.model_path == tmp_path / "models" / "f.model"  # relative to the config
    assert params.refit_element_refs is True
    assert "params.foundation_model is deprecated" in caplog.text


def test_every_plugin_parameter_has_a_description() -> None:
    missing = [
        f"{registry.kind} {info.name}: {param.name}"
        for registry in REGISTRIES
        for info in describe_plugins(registry)
        for param in info.params
        if not param.description.strip()
    ]
    assert not missing, "params without a description:\n" + "\n".join(missing)
