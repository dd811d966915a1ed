"""Fine-tuning as a Dask task that asks for a GPU and falls back to the CPU.

The task reads its training labels from the store and writes the model version back to it,
so nothing large travels through the scheduler and a remote worker needs only the store URI.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("pestle.dispatch")


def workers_with_gpu(client) -> list[str]:
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return [
        addr for addr, info in workers.items() if (info.get("resources") or {}).get("GPU", 0) >= 1
    ]


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
) -> str:
    """``leave_out``: reference quantities (``stress``) taken off every label before training
    (not converged at the labels' settings). ``seeds``: the campaign's seed structures
    (``atoms_to_dict``), passed to a trainer whose ``train`` takes ``seeds`` (replay)."""
    import inspect

    from pestle.devices import pick_device
    from pestle.store import Store
    from pestle.structures import atoms_from_dict
    from pestle.trainers import TRAINERS, LabelledStructure

    with Store(store_uri, database) as store:
        if store.models.exists(model_id):
            return model_id  # a duplicated task or a resumed run: the model already exists

        def labelled(ids: list[str]) -> list[LabelledStructure]:
            out = [s.labelled() for s in store.labels.labelled({"_id": {"$in": ids}})]
            for ls in out:
                for quantity in leave_out or ():
                    ls.atoms.calc.results.pop(quantity, None)
            return out

        device = pick_device(device_preference)
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
            },
        )
    return model_id


def pick_training_placement(client) -> tuple[dict[str, int] | None, str]:
    """(Dask resources to ask for, device preference): a GPU worker when the cluster has one."""
    if workers_with_gpu(client):
        return {"GPU": 1}, "cuda"
    log.info("no worker offers a GPU: fine-tuning on a CPU worker")
    return None, "cpu"


def train_model(client, **job: Any) -> str:
    """Run ``run_training_job`` on a GPU worker when the cluster has one, else on any worker."""
    resources, device = pick_training_placement(client)
    future = client.submit(
        run_training_job, **job, device_preference=device, resources=resources, pure=False
    )
    return future.result()
