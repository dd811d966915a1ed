"""Convergence gate on real GPAW PBE labels: for each system, the representative structure
(8-atom Si, LiF, MgO; 4-atom Al, Cu; 0.05 Å rattle, 2 % strain) checked at the configured
cutoff and k-point density with auto-raise, and LiF at 350 eV for the failure message. One
calculation at a time; every calculation's wall time is recorded.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_convergence.py --out results/
        [--systems Si LiF MgO Al Cu LiF-350] [--ecut 600] [--kpoint-density 3]
    python benchmarks/bench_convergence.py --out results/ --table   # markdown from the JSON
    python benchmarks/bench_convergence.py --out results/ --systems Cu --verify kpoint_density

Writes ``<out>/<system>.json`` (the report's ``as_dict()``) as each system finishes and
keeps every label in ``<out>/labels/``, so a long run can be resumed (finished systems are
skipped, finished labels reused; ``--again`` redoes the reports from the stored labels) and
tabulated at any time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk

from pestle.labellers import LABELLERS, Labeller, LabelResult, level_of_theory_hash
from pestle.labellers.convergence import check_convergence, representative
from pestle.structures import fingerprint

# Conventional cubic cells near the PBE lattice constants (Å).
SEEDS = {
    "Si": lambda: bulk("Si", "diamond", a=5.47, cubic=True),
    "LiF": lambda: bulk("LiF", "rocksalt", a=4.07, cubic=True),
    "MgO": lambda: bulk("MgO", "rocksalt", a=4.26, cubic=True),
    "Al": lambda: bulk("Al", "fcc", a=4.04, cubic=True),
    "Cu": lambda: bulk("Cu", "fcc", a=3.63, cubic=True),
}


def logged_label_fn(log_path: Path, workdir: Path, cache: Path):
    """Label, log, and keep every label on disk by (structure, level of theory): a rerun
    (after a crash, or to re-render a report) computes nothing twice and reports each label's
    original wall time (``extra["label_seconds"]``)."""
    cache.mkdir(parents=True, exist_ok=True)

    def label(labeller: Labeller, atoms: Atoms) -> LabelResult:
        key = f"{fingerprint(atoms)}-{level_of_theory_hash(labeller)}"
        stored = cache / f"{key}.json"
        if stored.is_file():
            data = json.loads(stored.read_text())
            return LabelResult(
                energy=data["energy"],
                forces=np.asarray(data["forces"]),
                stress=None if data["stress"] is None else np.asarray(data["stress"]),
                extra=data["extra"],
            )
        lot = labeller.level_of_theory()
        started, cpu_started = time.perf_counter(), time.process_time()
        result = labeller.label(atoms, workdir / key)
        seconds = time.perf_counter() - started
        result.extra["label_seconds"] = round(seconds, 2)
        # CPU time too: wall time on a shared machine includes other people's jobs.
        result.extra["cpu_seconds"] = round(time.process_time() - cpu_started, 2)
        stored.write_text(json.dumps({
            "energy": result.energy,
            "forces": np.asarray(result.forces).tolist(),
            "stress": None if result.stress is None else np.asarray(result.stress).tolist(),
            "extra": result.extra,
        }, default=str))  # fmt: skip
        line = (
            f"{time.strftime('%H:%M:%S')} {atoms.get_chemical_formula(mode='metal'):8s} "
            f"ecut={lot['ecut']:g} kd={lot['kpoint_density']:g} "
            f"kpts={result.extra.get('kpts')} E/atom={result.energy / len(atoms):.5f} "
            f"{seconds:.1f} s wall, {result.extra['cpu_seconds']:.1f} s CPU"
        )
        print(line, flush=True)
        with open(log_path, "a") as handle:
            handle.write(line + "\n")
        return result

    return label


def run(system: str, args: argparse.Namespace, out: Path) -> dict:
    failing_case = system == "LiF-350"
    seed = SEEDS["LiF" if failing_case else system]()
    rep = representative(seed)
    params = {
        "ecut": 350.0 if failing_case else args.ecut,
        "kpoint_density": args.kpoint_density,
        "spinpol": False,
        "smearing": "fermi-dirac",
        "smearing_width": 0.05,
    }
    labeller = LABELLERS.build("gpaw", params)
    workdir = out / "work" / system
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = check_convergence(
        labeller,
        rep.structure,
        reference=rep.reference,
        label_fn=logged_label_fn(out / "calculations.log", workdir, out / "labels"),
        auto_raise=not failing_case,
        max_raises=args.max_raises,
        settings=["ecut"] if failing_case else None,
    )
    data = report.as_dict()
    data["params"] = params
    data["wall_seconds"] = round(time.perf_counter() - started, 1)
    data["auto_raise"] = not failing_case
    (out / f"{system}.json").write_text(json.dumps(data, indent=1, default=str))
    print(report.message, flush=True)
    return data


def verify(system: str, setting_name: str, args: argparse.Namespace, out: Path) -> str:
    """Was agreement with the next rung fortuitous? Label the representative one rung above
    the highest tested for ``setting_name`` (at the other settings the gate recommended) and
    compare every tested rung against it with the gate's own checks."""
    from pestle.labellers.convergence import ConvergenceTolerances, compare_labels

    data = json.loads((out / f"{system}.json").read_text())
    rep = representative(SEEDS[system]())
    params = {**data["params"], **data["recommended"]}
    [entry] = [s for s in data["settings"] if s["setting"]["name"] == setting_name]
    labeller = LABELLERS.build("gpaw", params)
    [setting] = [s for s in labeller.convergence_settings() if s.name == setting_name]
    tested = [c["value"] for c in entry["calculations"]]
    top = setting.next_value(max(tested))
    label = logged_label_fn(out / "calculations.log", out / "work" / system, out / "labels")
    truth = labeller.with_setting(setting_name, top)
    high, high_ref = label(truth, rep.structure), label(truth, rep.reference)
    rows = [
        f"{system}: every tested {setting_name} against {top:g} (other settings: "
        f"{ {k: v for k, v in data['recommended'].items() if k != setting_name} })",
        "",
        "| value | vs | ΔE rel. (meV/atom) | max abs(ΔF) (eV/Å) | ΔF RMS / F RMS | force slope "
        "| max abs(Δσ) (GPa) | Pulay estimate (GPa) | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for value in tested:
        lower = labeller.with_setting(setting_name, value)
        checks, _ = compare_labels(
            rep.structure, label(lower, rep.structure), high, ConvergenceTolerances(),
            lower_reference=label(lower, rep.reference), higher_reference=high_ref,
            cutoffs=(value, top) if setting.plane_wave_cutoff else None,
            reference_volume=rep.reference.get_volume(),
        )  # fmt: skip
        passed = all(c.passed is not False for c in checks.values())
        pulay = checks.get("pulay_stress")
        rows.append(
            f"| {value:g} | {top:g} | {1000 * checks['energy'].difference:.2f} | "
            f"{checks['force_max'].difference:.3f} | "
            f"{100 * checks['force_rms_ratio'].difference:.2f} % | "
            f"{checks['force_slope'].difference:.4f} | {checks['stress_max'].difference:.2f} | "
            f"{'' if pulay is None else f'{pulay.difference:.2f}'} | {'yes' if passed else 'NO'} |"
        )
    return "\n".join(rows)


def table(data: dict) -> str:
    rows = [
        "| setting | value | k-points | E/atom (eV) | E rel./atom (meV) | vs | ΔE rel. (meV/atom) "
        "| ΔE abs. (meV/atom) | max abs(ΔF) (eV/Å) | ΔF RMS / F RMS | max abs(Δσ) (GPa) "
        "| Pulay estimate (GPa) | pass | wall s (structure + reference) "
        "| CPU s (structure + reference) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown: dict[str, str] = {}  # level-of-theory hash -> the row that computed it
    for setting in data["settings"]:
        name = setting["setting"]["name"]
        comparisons = {c["value"]: c for c in setting["comparisons"]}
        for calc in setting["calculations"]:
            c = comparisons.get(calc["value"])
            wall = f"{calc['seconds']:.0f} + {calc['reference_seconds'] or 0:.0f}"
            cpu = (
                f"{calc['extra'].get('cpu_seconds', 0):.0f} + "
                f"{calc['reference_extra'].get('cpu_seconds', 0):.0f}"
            )
            cached = ""
            lot = calc["level_of_theory_hash"]
            if lot in shown:
                wall, cpu, cached = "—", "—", f" (= {shown[lot]} row, not recomputed)"
            shown.setdefault(lot, f"{name} {calc['value']:g}")
            rel = calc["relative_energy_per_atom"]
            if c is None:
                tail = "| — | | | | | | | | "
            else:
                k = c["checks"]
                tail = (
                    f"| {c['against']:g} | {1000 * k['energy']['difference']:.2f} | "
                    f"{1000 * k['absolute_energy']['difference']:.1f} | "
                    f"{k['force_max']['difference']:.3f} | "
                    f"{100 * k['force_rms_ratio']['difference']:.2f} % | "
                    f"{k['stress_max']['difference']:.2f} | "
                )
                pulay = k.get("pulay_stress")
                tail += "" if pulay is None else f"{pulay['difference']:.2f}"
                tail += f" | {'yes' if c['passed'] else 'NO'} | "
            rows.append(
                f"| {name} | {calc['value']:g} | {calc['extra'].get('kpts')} | "
                f"{calc['energy_per_atom']:.4f} | {1000 * rel:.2f} {tail}"
                f"{wall}{cached} | {cpu} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--systems", nargs="+", default=[*SEEDS, "LiF-350"])
    parser.add_argument("--ecut", type=float, default=600.0)
    parser.add_argument("--kpoint-density", type=float, default=3.0)
    parser.add_argument("--max-raises", type=int, default=3)
    parser.add_argument("--table", action="store_true", help="only print tables from the JSON")
    parser.add_argument(
        "--verify",
        metavar="SETTING",
        help="after the gate, compare every tested rung of SETTING (e.g. kpoint_density) "
        "against one rung above the highest tested",
    )
    parser.add_argument(
        "--again", action="store_true", help="redo finished systems (labels come from the cache)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for system in args.systems:
        path = args.out / f"{system}.json"
        if args.table:
            if not path.is_file():
                print(f"## {system}: not measured yet\n")
                continue
            data = json.loads(path.read_text())
        elif path.is_file() and not args.again:
            print(f"{system}: done before, skipped ({path})", file=sys.stderr)
            continue
        else:
            data = run(system, args, args.out)
        print(f"## {system} ({data['formula']}, {data['n_atoms']} atoms): {data['status']}\n")
        print(table(data) + "\n")
        print(f"recommended: {data['recommended']}; converged: {data['converged_quantities']}; "
              f"total {data['seconds']:.0f} s of calculations\n")  # fmt: skip
        print(f"> {data['message']}\n", flush=True)
        if args.verify:
            print(verify(system, args.verify, args, args.out) + "\n", flush=True)


if __name__ == "__main__":
    main()
