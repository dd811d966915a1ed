"""Fine-tuning that fixes one system without breaking another (issue 16), on real CHGNet:

* the linear correction per element recovers known per-element scalings of the model (labels
  made by the model with those scales on its site energies, on another code's energy zero),
  and the saved chgnet_scaled model loads in pestle and in ASE, while a plain CHGNet loader
  refuses it;
* one model-wide scale is refused, naming the systems and their scales, when the systems'
  own scales disagree, and accepted when they agree; per system it fits both;
* replay is used (its structures, weighted) and keeps the replayed structures closer to the
  pretrained model; L2-SP keeps the weights closer to the pretrained ones;
* worst-system epoch selection keeps the base model unless every system improves;
* the stopping part of the evaluation set is stable, disjoint from what is judged, and the
  pipeline's training job passes seeds only to trainers that take them.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from pydantic import BaseModel

from pestle.plugins import Resources
from pestle.potentials import POTENTIALS, from_checkpoint
from pestle.potentials.calculator import PotentialCalculator
from pestle.potentials.chgnet import CHGNetPotential, install_scales, load_chgnet
from pestle.stages.evaluation_set import stopping_split
from pestle.trainers import TRAINERS, LabelledStructure, TrainedModel
from pestle.trainers.base import BestEpoch
from pestle.trainers.chgnet import _Criterion, label_weight
from pestle.trainers.linear import DisagreeingScales
from pestle.trainers.replay import replay_structures


@pytest.fixture(scope="module")
def base() -> CHGNetPotential:
    return POTENTIALS.build("chgnet", {"device": "cpu"})


def scaled_teacher(scope: str, scales: dict[str, float]) -> CHGNetPotential:
    """CHGNet 0.3.0 with ``scales`` on its site energies: labels whose per-element (or
    per-system) softening relative to the pretrained model is known exactly."""
    teacher = CHGNetPotential(CHGNetPotential.Params(device="cpu"))
    model = install_scales(load_chgnet(), scope, scales)
    model.requires_grad_(False)
    model.eval()
    teacher._model = model
    return teacher


def rattled(formula: str, structure: str, a: float, seed: int, amplitude: float = 0.08,
            cubic: bool = True) -> Atoms:  # fmt: skip
    atoms = bulk(formula, structure, a=a, cubic=cubic)
    atoms.rattle(amplitude, seed=seed)
    return atoms


def label(model, atoms: Atoms, tag: str, offset: dict[str, float] | None = None,
          factor: float = 1.0) -> LabelledStructure:  # fmt: skip
    """Labels from ``model``; forces and stress times ``factor`` (energy unchanged: only
    forces and stress decide these fits' scales at the paper's loss weights), plus a
    per-element energy ``offset`` (another code's zero)."""
    p = model.predict([atoms])[0]
    energy = p.energy + sum((offset or {}).get(s, 0.0) for s in atoms.get_chemical_symbols())
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=p.forces * factor,
                                       stress=p.stress * factor)  # fmt: skip
    return LabelledStructure(atoms, f"s-{tag}", f"l-{tag}")


pytestmark = pytest.mark.slow


# -- linear correction per element / per system ----------------------------------------------


def test_per_element_scales_are_recovered_and_load_in_pestle_and_ase(tmp_path: Path) -> None:
    truth = {"Li": 1.25, "F": 0.9, "Si": 0.93}
    offset = {"Li": 0.3, "F": -0.2, "Si": 0.5}
    teacher = scaled_teacher("element", truth)
    train = [
        label(teacher, rattled("LiF", "rocksalt", 4.07, seed), f"lif{seed}", offset)
        for seed in (1, 2)
    ] + [
        label(teacher, rattled("Si", "diamond", 5.47, seed), f"si{seed}", offset) for seed in (3, 4)
    ]
    trainer = TRAINERS.build(
        "chgnet", {"mode": "linear_correction", "linear_scope": "element", "linear_ridge": 0.0}
    )
    result = trainer.train(train, [], tmp_path)

    scales = result.metrics["linear_scales"]
    assert set(scales) == {"Li", "F", "Si"}
    for symbol, value in truth.items():
        assert scales[symbol]["scale"] == pytest.approx(value, abs=2e-3), scales
        assert scales[symbol]["n_structures"] == 2
    # The offsets went into the references, not the scales (Li and F only as their sum).
    shift = result.metrics["atom_ref_shift_eV_per_atom"]
    assert shift["Si"] == pytest.approx(0.5, abs=2e-3)
    assert shift["Li"] + shift["F"] == pytest.approx(0.1, abs=4e-3)
    assert result.potential == "chgnet_scaled"
    assert result.metrics["train_mae_after"]["f"] < 1e-3 < result.metrics["train_mae_before"]["f"]

    tuned = from_checkpoint(result.potential, {**result.potential_params, "device": "cpu"},
                            result.checkpoint)  # fmt: skip
    held_out = [
        rattled("LiF", "rocksalt", 4.07, 42, 0.12),
        rattled("Si", "diamond", 5.47, 43, 0.12),
    ]
    for atoms, got, want in zip(held_out, tuned.predict(held_out), teacher.predict(held_out),
                                strict=True):  # fmt: skip
        np.testing.assert_allclose(got.forces, want.forces, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(got.stress, want.stress, rtol=2e-3, atol=2e-6)
        extra = sum(offset[s] for s in atoms.get_chemical_symbols())
        assert got.energy == pytest.approx(want.energy + extra, abs=2e-3 * len(atoms))
    assert tuned.describe()["scales"] == {"scope": "element",
                                          "scales": {k: v["scale"] for k, v in scales.items()}}  # fmt: skip

    # ASE loads it through pestle's calculator, with the same results.
    atoms = held_out[0].copy()
    atoms.calc = PotentialCalculator(tuned)
    np.testing.assert_allclose(atoms.get_forces(), tuned.predict([held_out[0]])[0].forces)

    # A plain CHGNet would drop the scales: it refuses the file and says what loads it.
    plain = POTENTIALS.build("chgnet", {"checkpoint": str(result.checkpoint), "device": "cpu"})
    with pytest.raises(ValueError, match="chgnet_scaled"):
        plain.predict(held_out[:1])


def test_one_scale_is_refused_naming_the_systems_that_disagree(
    base: CHGNetPotential, tmp_path: Path
) -> None:
    def labels(factors: dict[str, float]) -> list[LabelledStructure]:
        return [
            label(base, rattled("LiF", "rocksalt", 4.07, seed), f"lif{seed}",
                  factor=factors["F-Li"])
            for seed in (1, 2, 3)
        ] + [
            label(base, rattled("Si", "diamond", 5.47, seed), f"si{seed}", factor=factors["Si"])
            for seed in (4, 5, 6)
        ]  # fmt: skip

    disagreeing = labels({"F-Li": 0.9, "Si": 1.25})
    model_wide = TRAINERS.build("chgnet", {"mode": "linear_correction"})
    with pytest.raises(DisagreeingScales) as refused:
        model_wide.train(disagreeing, [], tmp_path / "refused")
    message = str(refused.value)
    assert "F-Li 0.900 [" in message and "Si 1.250 [" in message, message
    assert "no overlap: F-Li vs Si" in message and "linear_scope: system or element" in message
    assert not (tmp_path / "refused" / "chgnet_finetuned.pth.tar").exists()

    per_system = TRAINERS.build("chgnet", {"mode": "linear_correction", "linear_scope": "system"})
    result = per_system.train(disagreeing, [], tmp_path / "system")
    assert result.potential == "chgnet_scaled"
    scales = result.metrics["linear_scales"]
    assert scales["F-Li"]["scale"] == pytest.approx(0.9, abs=2e-3)
    assert scales["Si"]["scale"] == pytest.approx(1.25, abs=2e-3)
    tuned = from_checkpoint(result.potential, {**result.potential_params, "device": "cpu"},
                            result.checkpoint)  # fmt: skip
    probe = rattled("Si", "diamond", 5.47, 44, 0.12)
    np.testing.assert_allclose(tuned.predict([probe])[0].forces,
                               1.25 * base.predict([probe])[0].forces, rtol=2e-3, atol=2e-4)  # fmt: skip

    # Systems that agree keep the paper's one scale, and its record lists theirs.
    agreeing = labels({"F-Li": 1.1, "Si": 1.1})
    result = TRAINERS.build("chgnet", {"mode": "linear_correction"}).train(
        agreeing, [], tmp_path / "agree"
    )
    assert result.potential == "chgnet"
    assert result.metrics["linear_scale"] == pytest.approx(1.1, abs=2e-3)
    assert set(result.metrics["system_scales"]) == {"F-Li", "Si"}


def test_linear_only_options_are_refused_elsewhere() -> None:
    params = TRAINERS.get("chgnet").Params
    with pytest.raises(ValueError, match="linear_scope apply to mode linear_correction only"):
        params(mode="full", linear_scope="element")
    with pytest.raises(ValueError, match="replay_weight"):
        params(mode="linear_correction", replay_weight=1.0)


# -- full fine-tuning that does not drift ----------------------------------------------------


def test_weighted_loss_is_chgnets_with_weights_one_and_weights_each_structure() -> None:
    from chgnet.trainer.trainer import CombinedLoss

    torch.manual_seed(0)
    combined = CombinedLoss(target_str="efs", energy_loss_ratio=0.1, force_loss_ratio=100,
                            stress_loss_ratio=0.1)  # fmt: skip
    targets = {
        "e": torch.randn(2),
        "f": [torch.randn(3, 3), torch.randn(5, 3)],
        "s": [torch.randn(3, 3), torch.full((3, 3), float("nan"))],
        "k": torch.tensor([0, 1]),
    }
    prediction = {"e": torch.randn(2), "f": [torch.randn(3, 3), torch.randn(5, 3)],
                  "s": [torch.randn(3, 3), torch.randn(3, 3)]}  # fmt: skip
    training = SimpleNamespace(training=True)
    ones = _Criterion(combined, training, weighted=True)
    expected = CombinedLoss(target_str="efs", energy_loss_ratio=0.1, force_loss_ratio=100,
                            stress_loss_ratio=0.1, allow_missing_labels=True)  # fmt: skip
    same = ones({**targets, "w": torch.ones(2)}, prediction)["loss"]
    assert float(same) == pytest.approx(float(expected(targets, prediction)["loss"]), rel=1e-6)

    weighted = _Criterion(combined, training, weighted=True)
    w = torch.tensor([1.0, 3.0])
    got = float(weighted({**targets, "w": w}, prediction)["loss"])
    e = 0.1 * float(torch.mean(w * (prediction["e"] - targets["e"]) ** 2))
    f = 100 * float(torch.cat([((prediction["f"][j] - targets["f"][j]) ** 2).sum().reshape(1)
                               * w[j] for j in range(2)]).sum() / 24)  # fmt: skip
    s = 0.1 * float(((prediction["s"][0] - targets["s"][0]) ** 2).mean())  # NaN stress skipped
    assert got == pytest.approx(e + f + s, rel=1e-5)


@pytest.fixture(scope="module")
def drift(base: CHGNetPotential, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same short fine-tune on Si labels 1/0.7 stiffer than the model, plain, with
    replay and with L2-SP."""
    ideal = bulk("Si", "diamond", a=5.47)  # 2-atom cell: cheap
    train = []
    for seed in (1, 2):
        atoms = ideal.copy()
        atoms.rattle(0.1, seed=seed)
        train.append(label(base, atoms, f"si{seed}", factor=1 / 0.7))
    # The last epoch kept, so every run is compared after the same number of steps.
    common = {"mode": "custom", "epochs": 3, "learning_rate": 2e-3, "freeze": "none",
              "energy_weight": 0.1, "force_weight": 100.0, "stress_weight": 0.1,
              "select_epoch": "last"}  # fmt: skip
    runs = {}
    for name, extra in (("plain", {}), ("replay", {"replay_weight": 20.0}),
                        ("l2sp", {"l2sp": 100.0}), ("relative", {"relative_loss_above": 0.2}),
                        ("no_label_stress", {"stress_below_force": 0.01})):  # fmt: skip
        trainer = TRAINERS.build("chgnet", {**common, **extra})
        result = trainer.train(train, [], tmp_path_factory.mktemp(name), seeds=[ideal])
        runs[name] = (trainer.model, result)
    return {"runs": runs, "seeds": [ideal]}


def test_replay_is_used_weighted_and_keeps_the_replayed_structures(
    base: CHGNetPotential, drift: dict
) -> None:
    replayed = replay_structures(drift["seeds"], ["Si"], per_structure=2, rng_seed=0)
    _, result = drift["runs"]["replay"]
    info = result.metrics["replay"]
    assert info["n_structures"] == len(replayed) == 2
    assert info["weight"] == 20.0 and info["from_seeds"] == 1
    assert info["origins"] == ["seed Si"]
    assert drift["runs"]["plain"][1].metrics["replay"] == {}

    def drift_on_replayed(model) -> float:
        tuned = CHGNetPotential(CHGNetPotential.Params(device="cpu"))
        tuned._model = model
        return float(np.mean([np.abs(a.forces - b.forces).mean() for a, b in zip(
            tuned.predict(replayed), base.predict(replayed), strict=True)]))  # fmt: skip

    plain, with_replay = (
        drift_on_replayed(drift["runs"]["plain"][0]),
        drift_on_replayed(drift["runs"]["replay"][0]),
    )
    assert with_replay < 0.7 * plain, (with_replay, plain)


def test_replay_without_stress_leaves_the_volume_to_the_labels(base: CHGNetPotential) -> None:
    """``replay_stress: false``: the replayed structures keep their forces and energies,
    and their stresses become NaN, which the loss skips."""
    si = bulk("Si", "diamond", a=5.47)
    train = [label(base, rattled("Si", "diamond", 5.47, 1, cubic=False), "r")]
    targets = {}
    for stress in (True, False):
        trainer = TRAINERS.build("chgnet", {"replay_weight": 1.0, "replay_stress": stress})
        trainer.seeds = [si]
        data, info = trainer._replay(load_chgnet(), train)
        assert info["stress"] is stress and len(data) == 2
        targets[stress] = data.targets
    for kept, dropped in zip(targets[True], targets[False], strict=True):
        assert torch.isfinite(kept["s"]).all() and torch.isnan(dropped["s"]).all()
        assert torch.equal(kept["f"], dropped["f"]) and torch.equal(kept["e"], dropped["e"])


def strained_si_labels(base: CHGNetPotential, si: Atoms) -> list[LabelledStructure]:
    """CHGNet's own labels of ``si`` at 0.94 and 1.06 of its volume, with 1 GPa and 20 GPa
    per unit compression more pressure: the labels' pressure line is 1 - 20 * strain."""
    train = []
    for factor in (0.94, 1.06):
        cell = si.copy()
        cell.set_cell(si.cell.array * factor ** (1 / 3), scale_atoms=True)
        labelled = label(base, cell, f"v{factor}")
        stress = labelled.atoms.calc.results["stress"].copy()
        stress[:3] -= (1.0 + 20.0 * (1 - factor)) * units.GPa  # more pressure
        labelled.atoms.calc.results["stress"] = stress
        train.append(labelled)
    return train


def test_replayed_stresses_take_the_pressure_the_strained_labels_measure(
    base: CHGNetPotential,
) -> None:
    """``replay_pressure_from_labels``: CHGNet's own stresses on Si cells at 0.94 and 1.06
    of the seed's volume, plus 1 GPa and 20 GPa per unit compression more pressure, shift
    the replayed copies at 0.97 and 1.03 by 1.6 and 0.4 GPa; forces and energies stay."""
    si = bulk("Si", "diamond", a=5.47)
    train = strained_si_labels(base, si)
    targets, infos = {}, {}
    for corrected in (False, True):
        trainer = TRAINERS.build("chgnet", {"replay_weight": 1.0,
                                            "replay_pressure_from_labels": corrected})  # fmt: skip
        trainer.seeds = [si]
        data, infos[corrected] = trainer._replay(load_chgnet(), train)
        targets[corrected] = data.targets
    (fit,) = infos[True]["pressure_from_labels"]
    assert fit["applied"] and "pressure_from_labels" not in infos[False]
    assert fit["offset_gpa"] == pytest.approx(1.0, abs=0.02)
    assert fit["slope_gpa"] == pytest.approx(-20.0, abs=0.3)
    for plain, shifted, expected in zip(targets[False], targets[True], (1.6, 0.4), strict=True):
        change = (shifted["s"] - plain["s"]).numpy()
        assert np.allclose(change, -expected * np.eye(3), atol=0.02), change
        assert torch.equal(plain["f"], shifted["f"]) and torch.equal(plain["e"], shifted["e"])


def test_replay_volume_strain_spreads_the_copies_over_the_labels_range(
    base: CHGNetPotential,
) -> None:
    """``replay_volume_strain`` 0.06 with 3 copies: the copies sit at 0.94, 1 and 1.06 of the
    seed's volume (the labels' range, not the default +-3 %), and each takes the labels'
    pressure line at its own strain: 2.2, 1.0 and -0.2 GPa more pressure."""
    si = bulk("Si", "diamond", a=5.47)
    train = strained_si_labels(base, si)
    targets = {}
    for corrected in (False, True):
        trainer = TRAINERS.build("chgnet", {"replay_weight": 1.0, "replay_per_structure": 3,
                                            "replay_volume_strain": 0.06,
                                            "replay_pressure_from_labels": corrected})  # fmt: skip
        trainer.seeds = [si]
        data, _ = trainer._replay(load_chgnet(), train)
        targets[corrected] = data.targets
    volumes = [abs(float(torch.linalg.det(g.lattice.detach()))) for g in data.graphs]
    assert np.allclose(np.array(volumes) / si.get_volume(), (0.94, 1.0, 1.06), atol=1e-4)
    for plain, shifted, expected in zip(targets[False], targets[True], (2.2, 1.0, -0.2),
                                        strict=True):  # fmt: skip
        change = (shifted["s"] - plain["s"]).numpy()
        assert np.allclose(change, -expected * np.eye(3), atol=0.03), change
    with pytest.raises(ValueError, match="replay_volume_strain"):
        TRAINERS.build("chgnet", {"replay_weight": 1.0, "replay_volume_strain": 0.3})


def test_stress_below_force_trains_no_stress_of_a_strongly_displaced_label(
    drift: dict,
) -> None:
    """``stress_below_force``: a label whose largest force exceeds it trains energy and
    forces only. Here both labels exceed it, so every batch lacks a stress: chgnet's own MSE
    over no stress is NaN, which must not stop the training (it did)."""
    _, plain = drift["runs"]["plain"]
    model, dropped = drift["runs"]["no_label_stress"]
    assert plain.metrics["label_stresses"] == {"below_force": None, "trained": 2, "labels": 2}
    assert dropped.metrics["label_stresses"] == {"below_force": 0.01, "trained": 0, "labels": 2}
    assert dropped.metrics["best_epoch"] == 2 and dropped.metrics["stopped"] is None
    assert all(math.isfinite(e["train_loss"]) for e in dropped.metrics["epochs"])
    # The stress term mattered: without it the same seed and steps train otherwise.
    assert plain.metrics["epochs"][-1]["train_loss"] != dropped.metrics["epochs"][-1]["train_loss"]


def test_l2sp_keeps_the_weights_closer_to_the_pretrained_ones(drift: dict) -> None:
    pretrained = load_chgnet().state_dict()

    def distance(model) -> float:
        return float(sum(((v.float() - pretrained[k].float()) ** 2).sum()
                         for k, v in model.state_dict().items()
                         if not k.startswith("composition_model") and v.is_floating_point()))  # fmt: skip

    plain_model, plain = drift["runs"]["plain"]
    l2sp_model, anchored = drift["runs"]["l2sp"]
    assert plain.metrics["best_epoch"] == anchored.metrics["best_epoch"] == 2
    assert anchored.metrics["l2sp"] == 100.0
    # Zero at the first step (the weights are the anchors), then it pulls.
    penalties = [e["l2sp_penalty"] for e in anchored.metrics["epochs"]]
    assert penalties[0] >= 0 and all(p > 0 for p in penalties[1:])
    assert distance(l2sp_model) < 0.5 * distance(plain_model)


def test_relative_loss_weights_each_label_by_its_force_scale(drift: dict) -> None:
    """Above ``relative_loss_above`` a label weighs (F0 / RMS force)^2, below it 1; the
    weights reach the loss (the same seed and steps train differently)."""
    forces = np.array([[3.0, 0.0, 0.0], [-3.0, 0.0, 0.0]])  # RMS sqrt(3)
    assert label_weight(forces, None) == 1.0
    assert label_weight(forces, 2.0) == 1.0
    assert label_weight(forces, 0.5) == pytest.approx(0.25 / 3.0)
    _, plain = drift["runs"]["plain"]
    _, relative = drift["runs"]["relative"]
    weights = relative.metrics["label_weights"]
    assert weights["relative_loss_above"] == 0.2 and 0 < weights["min"] <= weights["mean"] < 1
    assert plain.metrics["label_weights"]["min"] == 1.0
    losses = [[e["train_loss"] for e in r.metrics["epochs"]] for r in (plain, relative)]
    assert losses[1][0] < 0.5 * losses[0][0], losses  # every label weighs less than 1
    with pytest.raises(ValueError, match="relative_loss_above"):
        TRAINERS.get("chgnet").Params(mode="linear_correction", relative_loss_above=1.0)


def test_worst_system_selection_keeps_the_base_unless_every_system_improves() -> None:
    best = BestEpoch("full", "worst_system")
    assert not best.offer(0, val_loss=1.0, val_force_mae=0.1, worst_system_ratio=1.2)
    assert not best.offer(1, val_loss=0.5, val_force_mae=0.05, worst_system_ratio=1.01)
    assert best.epoch is None and best.waited(1) == 2  # the base model is kept
    assert best.offer(2, val_loss=0.9, val_force_mae=0.2, worst_system_ratio=0.9)
    assert not best.offer(3, val_loss=0.1, val_force_mae=0.01, worst_system_ratio=0.95)
    assert best.epoch == 2 and "worst-system" in best.criterion
    assert BestEpoch("full").by == "val_force_mae" and BestEpoch("custom").by == "val_loss"
    last = BestEpoch("custom", "last")
    assert all(last.offer(e, val_loss=9.0 - e % 2, val_force_mae=None) for e in range(3))
    assert last.epoch == 2
    assert not last.offer(3, val_loss=float("nan"), val_force_mae=None) and last.epoch == 2


# -- the pipeline's part -----------------------------------------------------------------------


def test_stopping_split_is_stable_partial_and_never_everything() -> None:
    members = {"Si": [f"si{i}" for i in range(10)], "F-Li": ["a", "b"], "Cu": ["c"]}
    split = stopping_split(members, 0.3, seed=11)
    assert len(split["Si"]) == 3 and set(split["Si"]) <= set(members["Si"])
    assert len(split["F-Li"]) == 1 and split["Cu"] == []  # never a system's whole set
    again = stopping_split({k: list(reversed(v)) for k, v in members.items()}, 0.3, seed=11)
    assert again == split
    assert stopping_split(members, 0.3, seed=12)["Si"] != split["Si"]
    assert stopping_split(members, 0.0, seed=11) == {"Cu": [], "F-Li": [], "Si": []}
    with pytest.raises(ValueError):
        stopping_split(members, 1.0, seed=11)


def test_evaluation_figures_leave_out_the_stopping_part() -> None:
    from pestle.stages.evaluate import evaluation_set_labels

    members = {"Si": [f"si{i}" for i in range(10)]}
    asked: list[list[str]] = []

    class Labels:
        def labelled(self, query):
            ids = query["structure_id"]["$in"]
            asked.append(ids)
            return [SimpleNamespace(structure_id=i, label_id=f"label-{i}") for i in ids]

    ctx = SimpleNamespace(
        config=SimpleNamespace(name="c", seed=11,
                               finetune=SimpleNamespace(stopping_fraction=0.3)),
        store=SimpleNamespace(structures=SimpleNamespace(evaluation_set=lambda name, s: members),
                              labels=Labels()),
        systems_by_lot_hash=lambda systems: {"lot": sorted(systems)},
    )  # fmt: skip
    judging = {s.structure_id for s in evaluation_set_labels(ctx)}
    stopping = {s.structure_id for s in evaluation_set_labels(ctx, part="stopping")}
    assert stopping == set(stopping_split(members, 0.3, 11)["Si"])
    assert judging == set(members["Si"]) - stopping and len(judging) == 7
    assert {s.structure_id for s in evaluation_set_labels(ctx, part="all")} == set(members["Si"])
    ctx.config.finetune.stopping_fraction = 0.0
    assert evaluation_set_labels(ctx, part="stopping") == []
    assert {s.structure_id for s in evaluation_set_labels(ctx)} == set(members["Si"])


class _Recording:
    """A trainer that records what it was given and writes a one-byte checkpoint."""

    class Params(BaseModel):
        pass

    seen: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Any = None) -> None:
        self.params = params

    def resources(self) -> Resources:
        return Resources(cpus=1)

    def _done(self, workdir: Path) -> TrainedModel:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "model.bin").write_bytes(b"x")
        return TrainedModel(workdir / "model.bin", "emt", {}, {})


@TRAINERS.register("test-recording-with-seeds")
class _WithSeeds(_Recording):
    def train(self, train_set, val_set, workdir, device="cpu", *, seeds=()) -> TrainedModel:
        self.seen["with"] = {"seeds": list(seeds), "val": len(val_set)}
        return self._done(Path(workdir))


@TRAINERS.register("test-recording-without-seeds")
class _WithoutSeeds(_Recording):
    def train(self, train_set, val_set, workdir, device="cpu") -> TrainedModel:
        self.seen["without"] = {"val": len(val_set)}
        return self._done(Path(workdir))


def test_the_training_job_passes_seeds_to_trainers_that_take_them(
    store, mongo_uri: str, database_name: str, tmp_path: Path
) -> None:
    from pestle.dispatch.training import run_training_job
    from pestle.store import label_id
    from pestle.structures import atoms_to_dict

    seed = bulk("Si", "diamond", a=5.47)
    atoms = seed.copy()
    atoms.rattle(0.05, seed=1)
    sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": "rattle"})
    store.labels.put(sid, labeller="test", level_of_theory={}, lot_hash="lot", energy=-10.0,
                     forces=np.zeros((2, 3)), stress=None)  # fmt: skip
    lid = label_id(sid, "lot")
    for name in ("with", "without"):
        run_training_job(
            mongo_uri, database_name, f"model-{name}", {"name": f"test-recording-{name}-seeds"},
            [lid], [lid], str(tmp_path / name), {}, seeds=[atoms_to_dict(seed)],
        )  # fmt: skip
    (given,) = _Recording.seen["with"]["seeds"]
    assert isinstance(given, Atoms) and np.allclose(given.positions, seed.positions)
    assert _Recording.seen["without"] == {"val": 1}  # called as before, without seeds
    assert store.models.exists("model-with") and store.models.exists("model-without")
