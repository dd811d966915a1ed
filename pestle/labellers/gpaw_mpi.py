"""Run one GPAW labelling calculation under MPI: ``mpiexec -n N python -m
pestle.labellers.gpaw_mpi WORKDIR``. The labeller writes ``input.json`` (structure and
parameters) into WORKDIR; rank 0 writes ``result.json`` (numbers or the error)."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def main(workdir: str) -> None:
    from gpaw.mpi import world

    from pestle.labellers import LABELLERS, LabelError
    from pestle.structures import atoms_from_dict

    folder = Path(workdir)
    request = json.loads((folder / "input.json").read_text())
    params = {**request["params"], "parallel_ranks": 1}  # this process is one of the ranks
    labeller = LABELLERS.build("gpaw", params)
    try:
        result = labeller.label(atoms_from_dict(request["atoms"]), folder)
        reply = {
            "energy": result.energy,
            "forces": result.forces.tolist(),
            "stress": None if result.stress is None else result.stress.tolist(),
            "extra": {**result.extra, "mpi_ranks": world.size},
        }
    except LabelError as exc:
        reply = {"label_error": str(exc)}
    except Exception as exc:
        reply = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if world.rank == 0:
        (folder / "result.json").write_text(json.dumps(reply))


if __name__ == "__main__":
    main(sys.argv[1])
