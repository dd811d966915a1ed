"""The one split policy: a campaign run and the daemon hold out the same labels, roles are
recorded on the labels once and never change, and the shares follow the config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml
from ase.build import bulk

from pestle.config import load_config
from pestle.engine.daemon import Daemon
from pestle.labellers import LABELLERS, level_of_theory_hash
from pestle.stages import RunContext, SplitStage, run_stages
from pestle.stages.split import SplitPolicy, share
from pestle.store import Store


def config_file(tmp_path: Path, database: str) -> Path:
    path = tmp_path / f"{database}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "split",
                "seed": 11,
                "work_dir": str(tmp_path / "work"),
                "seeds": [{"bulk": "Cu", "crystalstructure": "fcc", "a": 3.61}],
                "samplers": [{"name": "rattle"}],
                "labeller": {"name": "emt"},
                "evaluation": {"holdout_fraction": 0.3},
                "finetune": {"validation_fraction": 0.25},
                "store": {"database": database},
            }
        )  # fmt: skip
    )
    return path


def fill(store: Store, n_per_system: int) -> dict[str, list[str]]:
    """EMT labels of rattled Cu and Au cells, as a labelling job would store them."""
    labeller = LABELLERS.build("emt", {})
    lot, lot_hash = labeller.level_of_theory(), level_of_theory_hash(labeller)
    for element, a in (("Cu", 3.61), ("Au", 4.08)):
        for i in range(n_per_system):
            atoms = bulk(element, "fcc", a=a, cubic=True)
            atoms.rattle(0.05, seed=i)
            sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": "t"})
            result = labeller.label(atoms, Path("."))
            store.labels.put(sid, labeller="emt", level_of_theory=lot, lot_hash=lot_hash,
                             energy=result.energy, forces=result.forces, stress=result.stress)  # fmt: skip
    return store.labels.ids_by_system(lot_hash)


def test_a_campaign_and_the_daemon_hold_out_the_same_labels(mongo_uri, tmp_path) -> None:
    stores = [Store(mongo_uri, f"pestle_split_{i}_{tmp_path.name[-6:]}") for i in range(2)]
    try:
        by_system = [fill(store, 9) for store in stores]
        assert by_system[0] == by_system[1]  # the same labels in both stores
        # The campaign run's split stage.
        run_config = load_config(config_file(tmp_path, stores[0].database))
        run = RunContext(
            run_config, stores[0], mongo_uri, outputs={"labels_by_system": by_system[0]}
        )
        run.start()
        campaign_split = run_stages(run, [SplitStage()])["split"]
        # The daemon's retraining plan, then its split stage, on the other store.
        daemon = Daemon([config_file(tmp_path, stores[1].database)])
        daemon.store, daemon.store_uri = stores[1], mongo_uri
        daemon_config = next(iter(daemon.configs.values()))
        _, plan = daemon.retrain_plan(daemon_config, ["Au", "Cu"])
        retrain = daemon.context(daemon_config, suffix="t-test")
        retrain.outputs["labels_by_system"] = by_system[1]
        retrain.start()
        daemon_split = run_stages(retrain, [SplitStage()])["split"]
        assert campaign_split == plan == daemon_split
        for system, parts in campaign_split.items():
            n = len(by_system[0][system])
            assert len(parts["holdout"]) == math.ceil(0.3 * n) == 3
            assert len(parts["validation"]) == math.ceil(0.25 * (n - 3)) == 2
            assert len(parts["train"]) == 4
        # Recorded on the labels, the same in both stores.
        ids = [i for members in by_system[0].values() for i in members]
        assert stores[0].labels.roles(ids) == stores[1].labels.roles(ids)
    finally:
        for store in stores:
            store.drop()
            store.close()


def test_roles_are_recorded_once_and_never_change(store: Store, tmp_path) -> None:
    config = load_config(config_file(tmp_path, store.database))
    by_system = fill(store, 12)
    seen: dict[str, str] = {}
    for n in (2, 3, 5, 8, 12):  # labels arriving over rounds
        partial = {system: ids[:n] for system, ids in by_system.items()}
        run = RunContext(config, store, "unused", suffix=f"r{n}",
                         outputs={"labels_by_system": partial})  # fmt: skip
        run.start()
        split = run_stages(run, [SplitStage()])["split"]
        roles = store.labels.roles([i for ids in partial.values() for i in ids])
        assert all(roles[i] == role for i, role in seen.items()), "a recorded role changed"
        seen = roles
        for parts in split.values():
            assert parts["holdout"], "two labels or more: one is held out"
    held = np.mean([role == "holdout" for role in seen.values()])
    assert 0.25 <= held <= 0.4  # holdout_fraction 0.3 of every system's labels
    # A role already recorded is never overwritten, whoever asks.
    some = next(iter(seen))
    other = "train" if seen[some] != "train" else "holdout"
    assert store.labels.set_roles({some: other}, {"by": "test"}) == 0
    assert store.labels.roles([some])[some] == seen[some]


def test_share_takes_at_least_one_and_never_all() -> None:
    assert [share(0.3, n) for n in (0, 1, 2, 3, 10)] == [0, 0, 1, 1, 3]
    assert share(0.0, 10) == 0  # no held-out picks: the evaluation set judges
    assert share(0.99, 5) == 4
    policy = SplitPolicy(seed=1, holdout_fraction=0.5, validation_fraction=0.0)
    roles = policy.assign({"X": ["a", "b", "c", "d"]}, {})
    assert sorted(roles.values()) == ["holdout", "holdout", "train", "train"]


def test_a_samplers_last_label_trains_while_another_can_go() -> None:
    """Three rattled picks and one strained: the strained cell is the only one whose stress
    says anything of the bulk modulus, so validation takes a rattled one, whatever the hash
    order; with no sampler known the hash order alone decides, as before."""
    policy = SplitPolicy(seed=11, holdout_fraction=0.0, validation_fraction=0.25)
    ids = ["r1", "r2", "r3", "s1"]
    samplers = {"r1": "rattle", "r2": "rattle", "r3": "rattle", "s1": "strain"}
    blind = {seed: SplitPolicy(seed, 0.0, 0.25).assign({"X": ids}, {}) for seed in range(40)}
    assert any(roles["s1"] == "validation" for roles in blind.values()), "the case never arises"
    for seed in range(40):
        roles = SplitPolicy(seed, 0.0, 0.25).assign({"X": ids}, {}, samplers)
        assert roles["s1"] == "train"
        assert sorted(roles.values()) == ["train", "train", "train", "validation"]
        # A sampler with a single label each: someone must go, and one does.
        single = {"r1": "a", "r2": "b", "r3": "c", "s1": "d"}
        assert sorted(SplitPolicy(seed, 0.0, 0.25).assign({"X": ids}, {}, single).values()) == [
            "train", "train", "train", "validation"]  # fmt: skip
    # Held-out and validation shares together still leave every sampler a training label.
    policy = SplitPolicy(seed=3, holdout_fraction=0.3, validation_fraction=0.25)
    many = [f"r{i}" for i in range(6)] + ["s1", "s2"]
    kinds = {i: ("strain" if i.startswith("s") else "rattle") for i in many}
    roles = policy.assign({"X": many}, {}, kinds)
    assert sum(roles[i] == "train" for i in ("s1", "s2")) >= 1
    assert sorted(roles.values()).count("train") == 3  # 8 - ceil(2.4) - ceil(1.25)


def test_the_split_stage_reads_each_labels_sampler(store: Store, tmp_path) -> None:
    """Through the stage: the sampler recorded with each label keeps the one strained label
    training in every seed's order."""
    labeller = LABELLERS.build("emt", {})
    lot, lot_hash = labeller.level_of_theory(), level_of_theory_hash(labeller)
    for i in range(4):
        atoms = bulk("Cu", "fcc", a=3.61 * (1.02 if i == 3 else 1.0), cubic=True)
        atoms.rattle(0.05, seed=i)
        sampler = "strain" if i == 3 else "rattle"
        sid, _ = store.structures.add(atoms, kind="candidate", provenance={"sampler": sampler})
        result = labeller.label(atoms, Path("."))
        store.labels.put(sid, labeller="emt", level_of_theory=lot, lot_hash=lot_hash,
                         energy=result.energy, forces=result.forces, stress=result.stress)  # fmt: skip
    by_system = store.labels.ids_by_system(lot_hash)
    ids = by_system["Cu"]
    samplers = store.labels.samplers_of(ids)
    assert sorted(samplers.values()) == ["rattle", "rattle", "rattle", "strain"]
    config = load_config(config_file(tmp_path, store.database))
    config.evaluation.holdout_fraction = 0.0
    run = RunContext(config, store, "unused", suffix="s", outputs={"labels_by_system": by_system})
    run.start()
    split = run_stages(run, [SplitStage()])["split"]["Cu"]
    strained = next(i for i, s in samplers.items() if s == "strain")
    assert strained in split["train"] and len(split["validation"]) == 1
