"""Fine-tuning as a Dask task that asks for a GPU and falls back to the CPU.

The task reads its training labels from the store and writes the model version back to it,
so nothing large travels through the scheduler and a remote worker needs only the store URI.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pestle.dispatch.gpus import describe, gpu_request, placement, workers_with_gpu

__all__ = ["pick_training_placement", "run_training_job", "train_model", "workers_with_gpu"]

# Where each fine-tune runs: INFO on its own logger, which the command line shows by default.
log = logging.getLogger("pestle.placement")


def run_training_job(
    store_uri: str,
    database: str,
    model_id: str,
    trainer: dict[str, Any],
    train_label_ids: list[str],
    val_label_ids: list[str],
    workdir: str,
    record: dict[str, Any],
    device_preference: str = "auto",
    leave_out: list[str] | None = None,
    seeds: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train and store the model; returns ``{"model_id", "placement", "trained"}`` (where it
    ran, see ``pestle.dispatch.gpus.placement``, also stored with the model). ``leave_out``:
    reference quantities (``stress``) taken off every label before training (not converged at
    the labels' settings). ``seeds``: the campaign's seed structures (``atoms_to_dict``),
    passed to a trainer whose ``train`` takes ``seeds`` (replay)."""
    import inspect

    from pestle.devices import pick_device
    from pestle.store import Store
    from pestle.structures import atoms_from_dict
    from pestle.trainers import TRAINERS, LabelledStructure

    with Store(store_uri, database) as store:
        existing = store.models.get(model_id)
        if existing is not None:  # a duplicated task or a resumed run
            stored = existing.model_dump().get("placement")
            return {"model_id": model_id, "placement": stored, "trained": False}

        def labelled(ids: list[str]) -> list[LabelledStructure]:
            out = [s.labelled() for s in store.labels.labelled({"_id": {"$in": ids}})]
            for ls in out:
                for quantity in leave_out or ():
                    ls.atoms.calc.results.pop(quantity, None)
            return out

        device = pick_device(device_preference)
        where = placement(device_preference, device)
        implementation = TRAINERS.build(trainer["name"], trainer.get("params", {}))
        extra: dict[str, Any] = {}
        if seeds and "seeds" in inspect.signature(implementation.train).parameters:
            extra["seeds"] = [atoms_from_dict(seed) for seed in seeds]
        trained = implementation.train(
            labelled(train_label_ids), labelled(val_label_ids), Path(workdir), device=device,
            **extra,
        )  # fmt: skip
        store.models.put(
            model_id,
            trained.checkpoint,
            {
                **record,
                "potential": trained.potential,
                "potential_params": trained.potential_params,
                "hyperparameters": trained.hyperparameters,
                "metrics": trained.metrics,
                "device": device,
                "placement": where,
            },
        )
    return {"model_id": model_id, "placement": where, "trained": True}


def pick_training_placement(client) -> tuple[dict[str, int] | None, str]:
    """(Dask resources to ask for, device preference): a GPU worker when the cluster has one."""
    resources, device = gpu_request(client)
    if resources is None:
        log.info(
            "no worker offers a GPU: fine-tuning on a CPU worker (dask.gpus for the local "
            "cluster; --resources GPU=1 on your own workers)"
        )
    return resources, device


def train_model(client, **job: Any) -> str:
    """Run ``run_training_job`` on a GPU worker when the cluster has one, else on any worker;
    logs where it ran. Returns the model id."""
    resources, device = pick_training_placement(client)
    if resources is not None:
        log.info("fine-tuning %s: asking for a GPU worker (%d offer one)", job["model_id"],
                 len(workers_with_gpu(client)))  # fmt: skip
    future = client.submit(
        run_training_job, **job, device_preference=device, resources=resources, pure=False
    )
    done = future.result()
    where = done["placement"]
    if done["trained"]:
        log.info("fine-tuned %s on %s", done["model_id"], describe(where))
    else:
        log.info("%s was already stored%s", done["model_id"],
                 f" (trained on {describe(where)})" if where else "")  # fmt: skip
    return done["model_id"]
