"""Reproduce the headline of Deng et al., npj Comput. Mater. 11:9 (2025), "Systematic softening
in universal machine learning interatomic potentials", on this machine: pretrained CHGNet
under-predicts DFT forces (softening scale < 1), and fine-tuning on ONE DFT structure, either a
single linear correction or the full fine-tune, moves the scale towards 1 on held-out
structures.

For rock-salt LiF and diamond Si (8-atom cubic cells) pestle's samplers make candidates
(rattled and strained), GPAW labels them (PBE, 650 eV, as configs/quickstart.yaml), the one
with the largest pretrained-CHGNet max force per system is the training structure, and the
pretrained and both fine-tuned models are compared on the other structures of that system.

    GPAW_SETUP_PATH=/usr/share/gpaw-setups nice python benchmarks/bench_reproduce_softening.py \
        [--work DIR] [--epochs 100] [--ecut 650]

GPAW labels are cached in ``DIR/labels.json`` keyed by structure fingerprint and level of
theory, so a rerun skips DFT: the first run took 36 minutes on 2 shared cores (16 GPAW
labels of 45-190 s each), a rerun about 1 minute (the full fine-tunes: 40 s LiF, 12 s Si).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from pestle.evaluation.compare import compare_models
from pestle.evaluation.intervals import format_estimate
from pestle.labellers import LABELLERS, level_of_theory_hash
from pestle.potentials import POTENTIALS
from pestle.samplers import SAMPLERS, Seed
from pestle.structures import atoms_from_dict, atoms_to_dict, chemical_system, fingerprint
from pestle.trainers import TRAINERS, LabelledStructure

SYSTEMS = {
    "LiF": {"formula": "LiF", "crystalstructure": "rocksalt", "a": 4.03},
    "Si": {"formula": "Si", "crystalstructure": "diamond", "a": 5.43},
}
# 6 rattled (two per amplitude) and 2 strained candidates per system: quickstart's samplers.
SAMPLER_SPECS = [
    ("rattle", {"amplitudes": [0.05, 0.1, 0.2], "per_amplitude": 2}),
    ("strain", {"max_strain": 0.06, "count": 2, "rattle": 0.03}),
]


def candidates(name: str, spec: dict, rng_seed: int) -> list[Atoms]:
    ideal = bulk(spec["formula"], spec["crystalstructure"], a=spec["a"], cubic=True)
    seed = Seed(atoms=ideal, id=fingerprint(ideal), name=name)
    out = []
    for index, (sampler, params) in enumerate(SAMPLER_SPECS):
        for candidate in SAMPLERS.build(sampler, params).sample(seed, rng_seed + index):
            atoms = candidate.atoms
            atoms.info["sampler"] = candidate.sampler
            out.append(atoms)
    return out


def label_all(structures: list[Atoms], labeller_spec: dict, work: Path) -> list[LabelledStructure]:
    """GPAW labels, from ``work/labels.json`` when this structure was labelled at this level
    of theory before."""
    labeller = LABELLERS.build("gpaw", labeller_spec)
    lot = level_of_theory_hash(labeller)
    cache_file = work / "labels.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    out = []
    for index, atoms in enumerate(structures):
        key = f"{fingerprint(atoms)}-{lot}"
        if key not in cache:
            started = time.perf_counter()
            result = labeller.label(atoms, work / "gpaw" / key)
            cache[key] = {
                "atoms": atoms_to_dict(atoms),
                "energy": result.energy,
                "forces": np.asarray(result.forces).tolist(),
                "stress": None if result.stress is None else np.asarray(result.stress).tolist(),
                "seconds": time.perf_counter() - started,
            }
            cache_file.write_text(json.dumps(cache))  # after every label: safe to interrupt
            print(f"  labelled {chemical_system(atoms)} #{index} in {cache[key]['seconds']:.0f} s",
                  flush=True)  # fmt: skip
        entry = cache[key]
        labelled = atoms_from_dict(entry["atoms"])
        labelled.info.update(atoms.info)
        labelled.calc = SinglePointCalculator(
            labelled,
            energy=entry["energy"],
            forces=np.asarray(entry["forces"]),
            stress=None if entry["stress"] is None else np.asarray(entry["stress"]),
        )
        out.append(LabelledStructure(labelled, structure_id=key, label_id=f"{key}-label"))
    return out


def max_force(forces: np.ndarray) -> float:
    return float(np.linalg.norm(forces, axis=1).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "pestle-softening"
    )
    parser.add_argument("--epochs", type=int, default=100, help="full fine-tune epochs")
    parser.add_argument("--ecut", type=float, default=650.0)
    parser.add_argument("--kpoint-density", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    labeller_spec = {"xc": "PBE", "ecut": args.ecut, "kpoint_density": args.kpoint_density,
                     "smearing": "fermi-dirac", "smearing_width": 0.05}  # fmt: skip
    started = time.perf_counter()
    pretrained = POTENTIALS.build("chgnet", {"model": "0.3.0", "device": "cpu"})

    rows, tables, timings = [], [], {}
    for name, spec in SYSTEMS.items():
        print(f"{name}: sampling and labelling", flush=True)
        t0 = time.perf_counter()
        labelled = label_all(candidates(name, spec, args.seed), labeller_spec, work)
        timings[f"{name} labels (incl. cache)"] = time.perf_counter() - t0

        scores = [max_force(p.forces) for p in pretrained.predict([ls.atoms for ls in labelled])]
        pick = int(np.argmax(scores))
        train, held_out = [labelled[pick]], labelled[:pick] + labelled[pick + 1 :]
        print(f"  training structure: #{pick} ({train[0].atoms.info['sampler']}), pretrained max "
              f"|F| {scores[pick]:.2f} eV/A; {len(held_out)} held out", flush=True)  # fmt: skip

        models = {"pretrained CHGNet 0.3.0": pretrained}
        for mode, params in (
            ("linear_correction", {"mode": "linear_correction"}),
            ("full", {"mode": "full", "epochs": args.epochs}),
        ):
            t0 = time.perf_counter()
            result = TRAINERS.build("chgnet", params).train(train, [], work / f"{name}-{mode}")
            seconds = time.perf_counter() - t0
            timings[f"{name} {mode}"] = seconds
            extra = (f"s = {result.metrics['linear_scale']:.4f}" if mode == "linear_correction"
                     else f"best epoch {result.metrics['best_epoch']}")  # fmt: skip
            print(f"  {mode}: {seconds:.0f} s, {extra}", flush=True)
            models[f"{mode} ({extra})"] = POTENTIALS.build(
                "chgnet",
                {
                    "checkpoint": str(result.checkpoint),
                    "device": "cpu",
                    "checkpoint_sha256": result.metrics["checkpoint_sha256"],
                },  # fmt: skip
            )
        comparison = compare_models(
            models, held_out, groups=("sampler",), plot_dir=work / "plots" / name
        )
        tables.append(f"### {name}\n\n{comparison['table']}")
        for model_name, m in comparison["overall"].items():
            soft, boot = m["softening"], m["softening_bootstrap"]
            figures = m["intervals"]
            rows.append(
                f"| {name} | {model_name} | {format_estimate(figures['softening'])} | "
                f"[{soft['component_ci_low']:.3f}, {soft['component_ci_high']:.3f}] | "
                f"[{boot['low']:.3f}, {boot['high']:.3f}] | "
                f"{format_estimate(figures['force_mae'])} | "
                f"{format_estimate(figures['energy_mae_per_atom_offset_removed'], 1, 1000.0)} | "
                f"{format_estimate(figures['stress_mae_gpa'], 2)} |"
            )

    total = time.perf_counter() - started
    print("\n## Softening on held-out GPAW structures (trained on one structure per system)\n")
    print("| system | model | softening [95% CI, structures] | component t CI (too narrow) | "
          "structure-bootstrap 95% CI | force MAE (eV/Å) | energy MAE, offset removed "
          "(meV/atom) | stress MAE (GPa) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nTimes: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f"; total wall time {total:.0f} s ({os.cpu_count()} CPUs)")  # fmt: skip
    print("\n## Per sampler\n")
    print("\n".join(tables))
    print(f"Parity plots: {work / 'plots'}")


if __name__ == "__main__":
    main()
