"""The daemon: campaigns in rounds, scheduled retraining with a promotion rule, one per store.

Each step of a campaign, in order:

1. *retrain* when due (every N new labels and/or cron times): fine-tune the configured
   pretrained potential on the campaign's labels (a Dask job asking for a GPU), evaluate it
   and the promoted model on the same held-out labels, promote it when the configured rule
   says it is better; after a promotion, re-score the labels still queued with the new model
   and withdraw those no longer worth a DFT calculation;
2. *drain* labelling jobs left by an earlier, killed daemon (their leases are re-queued);
3. *round*: seed, sample (fresh random streams per round), score with the promoted model,
   select within the per-round budget, label; then decide per chemical system whether it is
   finished (softening scale inside the band and committee spread under the threshold).

Every decision goes to the store's ``decisions`` collection with its reason; the daemon's
position (next round, finished systems, last retraining) lives in ``meta`` as
``daemon:<campaign>``, so a restarted daemon resumes where the last one stopped. A round
interrupted by SIGKILL is run again under the same id (its stored selection is reused and
only the missing labels are computed). SIGTERM stops after the current step.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pestle.config import CampaignConfig, ConfigError, load_config
from pestle.engine.campaign import Campaign, stable_seed
from pestle.labellers import level_of_theory_hash
from pestle.store import JOB_QUEUED, JOB_RUNNING, Store, resolve_uri
from pestle.structures import settings_hash

log = logging.getLogger("pestle.daemon")

LEASE_SECONDS = 60.0
STATE_PREFIX = "daemon:"


def daemon_dir(config: CampaignConfig) -> Path:
    return Path(config.work_dir).resolve() / "daemon"


def pid_file(config: CampaignConfig) -> Path:
    return daemon_dir(config) / "daemon.pid"


def log_file(config: CampaignConfig) -> Path:
    return daemon_dir(config) / "daemon.log"


def campaign_runs(config: CampaignConfig) -> dict[str, Any]:
    """Filter on ``run_id`` for the runs (one-shot and rounds) of this campaign."""
    return {"run_id": {"$regex": f"^{re.escape(config.name)}-"}}


def is_holdout(config: CampaignConfig, label_id: str) -> bool:
    """Whether a label is held out from training, decided by the label alone, so that a label
    the daemon trained on never becomes a held-out label for a later model."""
    fraction = config.evaluation.holdout_fraction
    return stable_seed(config.seed, "holdout", label_id) < fraction * 2**63


def split_labels(config: CampaignConfig, by_system: dict[str, list[str]]) -> dict[str, list[str]]:
    """Held-out, validation and training label ids for a retraining.

    Held out: labels whose hash falls under ``evaluation.holdout_fraction``; a system with at
    least two labels and none under it holds out its lowest-hash label (which can only move to
    a newer label later, never to one already trained on). Validation (epoch choice) is a share
    of the rest, training the remainder."""
    holdout, validation, train = [], [], []
    for ids in by_system.values():
        ordered = sorted(ids, key=lambda i: stable_seed(config.seed, "holdout", i))
        held = [i for i in ordered if is_holdout(config, i)]
        if not held and len(ordered) >= 2:
            held = ordered[:1]
        rest = [i for i in ordered if i not in held]
        rest.sort(key=lambda i: stable_seed(config.seed, "validation", i))
        share = config.finetune.validation_fraction
        n_val = (
            min(max(1, round(share * len(rest))), len(rest) - 1) if share and len(rest) > 2 else 0
        )
        holdout += held
        validation += rest[:n_val]
        train += rest[n_val:]
    return {"holdout": sorted(holdout), "validation": sorted(validation), "train": sorted(train)}


def _pooled(results: dict[str, dict]) -> dict[str, float]:
    """Force MAE over every held-out component and mean |1 - s| over systems."""
    reference = np.concatenate([r["arrays"]["reference"] for r in results.values()])
    predicted = np.concatenate([r["arrays"]["predicted"] for r in results.values()])
    return {
        "force_mae": float(np.mean(np.abs(predicted - reference))),
        "softening_distance": float(
            np.mean([abs(1.0 - r["softening"]["slope"]) for r in results.values()])
        ),
    }


def _strip(results: dict[str, dict]) -> dict[str, dict]:
    return {s: {k: v for k, v in m.items() if k != "arrays"} for s, m in results.items()}


class Daemon:
    """Runs the campaigns of ``config_paths`` against their (shared) store until stopped."""

    def __init__(
        self,
        config_paths: Sequence[str | os.PathLike],
        *,
        exit_when_idle: bool = False,
        idle_poll_seconds: float = 30.0,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.paths = [Path(p).resolve() for p in config_paths]
        if not self.paths:
            raise ConfigError("the daemon needs at least one campaign config")
        self.configs = {path: load_config(path) for path in self.paths}
        first = self.configs[self.paths[0]]
        names = [c.name for c in self.configs.values()]
        if len(set(names)) != len(names):
            raise ConfigError(f"campaign names must differ within one daemon: {names}")
        for path, config in self.configs.items():
            if (
                config.store != first.store
                or Path(config.work_dir).resolve() != Path(first.work_dir).resolve()
            ):
                raise ConfigError(
                    f"{path}: store and work_dir must be those of {self.paths[0]} "
                    "(one daemon serves one store)"
                )
        self.exit_when_idle = exit_when_idle
        self.idle_poll_seconds = idle_poll_seconds
        self.lease_seconds = lease_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()
        self.started_at = datetime.now(timezone.utc)
        self.store: Store | None = None
        self.store_uri = ""

    # -- lifecycle ------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        """Signal handler: finish the current step, then stop."""
        log.info("stop requested: finishing the current step")
        self.stopping.set()

    def _heartbeat(self) -> None:
        while not self.stopping.wait(self.lease_seconds / 3):
            if not self.store.renew_daemon_lease(self.owner, self.lease_seconds):
                log.error("lost the store's daemon lease: stopping after this step")
                self.stopping.set()

    def run(self) -> None:
        """Hold the store's lease and run rounds until stopped (or idle, if asked)."""
        from pestle.dispatch.cluster import make_client

        first = self.configs[self.paths[0]]
        self.store_uri = resolve_uri(first.work_dir, first.store.uri, first.store.uri_file)
        self.store = Store(self.store_uri, first.store.database)
        self.store.acquire_daemon_lease(
            self.owner,
            self.lease_seconds,
            {"configs": [str(p) for p in self.paths], "pid_file": str(pid_file(first))},
        )
        heartbeat = threading.Thread(target=self._heartbeat, name="daemon-lease", daemon=True)
        heartbeat.start()
        pid_path = pid_file(first)
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.write_text(f"{os.getpid()}\n")
        log.info("daemon %s holds the store %s", self.owner, self.store.uri_masked)
        try:
            with make_client(first.dask) as client:
                while not self.stopping.is_set():
                    worked = False
                    for path in self.paths:
                        if self.stopping.is_set():
                            break
                        worked |= self.guarded_step(self._reload(path), client)
                    if not worked:
                        if self.exit_when_idle:
                            log.info("every campaign is finished or at its round limit")
                            break
                        self.stopping.wait(self.idle_poll_seconds)
        finally:
            self.stopping.set()
            self.store.release_daemon_lease(self.owner)
            if pid_path.is_file() and pid_path.read_text().strip() == str(os.getpid()):
                pid_path.unlink()
            self.store.close()
            log.info("daemon stopped")

    def guarded_step(self, config: CampaignConfig, client) -> bool:
        """A step whose failure is recorded and waited out instead of ending the service:
        the other campaigns go on, and this one is tried again after ``idle_poll_seconds``."""
        try:
            return self.step(config, client)
        except Exception as exc:
            log.exception(
                "%s: step failed; retrying after %.0f s", config.name, self.idle_poll_seconds
            )
            self.store.record_decision(
                {"kind": "error", "campaign": config.name, "reason": f"step failed: {exc!r}"}
            )
            self.stopping.wait(self.idle_poll_seconds)
            return False

    def _reload(self, path: Path) -> CampaignConfig:
        """The config as it is on disk now (changes apply from the next step); the last good
        one when the file has become invalid."""
        try:
            config = load_config(path)
        except ConfigError as exc:
            log.error("keeping the previous config: %s", exc)
            return self.configs[path]
        if config.store != self.configs[path].store:
            log.error("%s: the store cannot change under a running daemon; ignored", path)
            config.store = self.configs[path].store
        self.configs[path] = config
        return config

    # -- state ----------------------------------------------------------------------------
    def state(self, config: CampaignConfig) -> dict[str, Any]:
        doc = self.store.meta.find_one({"_id": STATE_PREFIX + config.name})
        return doc or {"_id": STATE_PREFIX + config.name, "round": 0, "finished": {}}

    def _save_state(self, config: CampaignConfig, fields: dict[str, Any]) -> None:
        self.store.meta.update_one(
            {"_id": STATE_PREFIX + config.name}, {"$set": fields}, upsert=True
        )

    def _stop_check(self) -> bool:
        return self.stopping.is_set()

    # -- one step of one campaign -------------------------------------------------------
    def step(self, config: CampaignConfig, client) -> bool:
        """Retrain if due, drain leftovers, run one round; False when there was nothing to do."""
        worked = self.maybe_retrain(config, client)
        if self._stop_check():
            return True
        worked |= self.drain(config, client)
        if self._stop_check():
            return True
        state = self.state(config)
        limit = config.daemon.max_rounds
        if limit is not None and state["round"] >= limit:
            return worked
        systems = state.get("systems")
        finished = state.get("finished", {})
        if systems and all(s in finished for s in systems):
            return worked
        self.run_round(config, client, state)
        if not self._stop_check():
            self.maybe_retrain(config, client)
        return True

    def campaign(self, config: CampaignConfig, **kwargs: Any) -> Campaign:
        return Campaign(config, self.store, self.store_uri, **kwargs)

    def promoted(self, config: CampaignConfig) -> str | None:
        return self.store.promoted_model(config.finetune.trainer.name)

    def run_round(self, config: CampaignConfig, client, state: dict[str, Any]) -> None:
        index = state["round"]
        finished = state.get("finished", {})
        open_systems = set(state["systems"]) - set(finished) if state.get("systems") else None
        model_id = self.promoted(config)
        config = self.round_config(config, model_id)
        campaign = self.campaign(
            config,
            round_index=index,
            model_id=model_id,
            systems=open_systems,
            per_system=config.daemon.per_round,
        )
        log.info("%s: round %d (scoring with %s)", config.name, index, model_id or "pretrained")
        started = time.monotonic()
        stages = campaign.run_round(client)
        systems = sorted(
            {
                d["chemical_system"]
                for d in self.store.structures.find(
                    {"_id": {"$in": [s["id"] for s in stages["seed"]["seeds"]]}},
                    {"chemical_system": 1},
                )
            }
        )
        finished = {**finished, **self.finished_systems(config, campaign, stages)}
        self._save_state(
            config,
            {
                "round": index + 1,
                "systems": systems,
                "finished": finished,
                "last_round": {
                    "run_id": campaign.run_id,
                    "seconds": round(time.monotonic() - started, 1),
                    "selected": len(stages.get("select", {}).get("selected", [])),
                    "labelled": stages.get("label", {}).get("dispatched", 0),
                    "model_id": model_id,
                },
            },
        )
        self.store.update_run(campaign.run_id, {"daemon_round": index})

    def round_config(self, config: CampaignConfig, model_id: str | None) -> CampaignConfig:
        """The config a round runs: with ``daemon.md_with_promoted_model``, every md sampler
        drives its dynamics with the promoted model (a verified copy of its checkpoint)."""
        if not config.daemon.md_with_promoted_model or model_id is None:
            return config
        from pestle.engine.models import stored_model_spec

        name, params = stored_model_spec(self.store, model_id, daemon_dir(config) / "models")
        config = config.model_copy(deep=True)
        for spec in config.samplers:
            if spec.name == "md":
                spec.params = {**spec.params, "potential": {"name": name, "params": params}}
        return config

    def finished_systems(
        self, config: CampaignConfig, campaign: Campaign, stages: dict[str, Any]
    ) -> dict[str, dict]:
        """Systems that meet the stop criterion now, with the figures that decided it.

        The softening scale is measured on labels the scoring model never trained on; the
        committee spread is the mean over this round's picks."""
        stop = config.daemon.stop
        lot_hash = level_of_theory_hash(campaign.labeller())
        trained: set[str] = set()
        if campaign.model_id is not None:
            doc = self.store.models.find_one({"_id": campaign.model_id}, {"training": 1})
            training = doc.get("training", {})
            trained = set(training.get("label_ids", [])) | set(
                training.get("validation_label_ids", [])
            )
        picks = [s["id"] for s in stages.get("select", {}).get("selected", [])]
        spread: dict[str, list[float]] = defaultdict(list)
        for doc in self.store.structures.find(
            {"_id": {"$in": picks}}, {"chemical_system": 1, "scores": 1}
        ):
            value = (doc.get("scores") or {}).get(campaign.model_key, {}).get("committee_force")
            if value is not None:
                spread[doc["chemical_system"]].append(value)
        by_system: dict[str, list] = defaultdict(list)
        for atoms, _, label in self.store.labelled_atoms({"lot_hash": lot_hash}):
            if label["_id"] not in trained:
                by_system[label["chemical_system"]].append(atoms)
        from pestle.evaluation.metrics import softening_scale

        finished = {}
        for system, members in by_system.items():
            if len(members) < stop.min_labels:
                continue
            predictions = campaign.potential.predict(members, stress=False)
            fit = softening_scale(
                np.concatenate([p.forces.ravel() for p in predictions]),
                np.concatenate([a.calc.results["forces"].ravel() for a in members]),
            )
            low, high = stop.softening_band
            committee = float(np.mean(spread[system])) if spread.get(system) else None
            if not low <= fit.slope <= high:
                continue
            if stop.committee_force_below is not None and (
                committee is None or committee >= stop.committee_force_below
            ):
                continue
            reason = (
                f"softening scale {fit.slope:.3f} in [{low}, {high}] on {len(members)} labels "
                "the model did not train on"
                + (f"; committee spread {committee:.3f} eV/A" if committee is not None else "")
            )
            finished[system] = {"slope": fit.slope, "committee_force": committee, "reason": reason}
            self.store.record_decision(
                {"kind": "finished", "campaign": config.name, "chemical_system": system,
                 "model_id": campaign.model_id, "reason": reason}
            )  # fmt: skip
            log.info("%s: %s finished: %s", config.name, system, reason)
        return finished

    # -- leftovers ------------------------------------------------------------------------
    def drain(self, config: CampaignConfig, client) -> bool:
        """Compute the labelling jobs an earlier daemon left queued or running."""
        from pestle.dispatch.labelling import label_jobs

        leftovers = defaultdict(list)
        for job in self.store.jobs.find(
            {
                "kind": "label",
                "state": {"$in": [JOB_QUEUED, JOB_RUNNING]},
                **campaign_runs(config),
            },
            {"run_id": 1},
        ):
            leftovers[job["run_id"]].append(job["_id"])
        if not leftovers:
            return False
        labeller = self.campaign(config).labeller()
        for run_id, job_ids in sorted(leftovers.items()):
            log.info("%s: %d unfinished labels of %s", config.name, len(job_ids), run_id)
            label_jobs(
                client,
                self.store,
                sorted(job_ids),
                store_uri=self.store_uri,
                work_root=str(Path(config.work_dir).resolve() / "runs" / run_id / "jobs"),
                job_timeout_seconds=config.dask.job_timeout_seconds,
                cpus_per_job=getattr(labeller, "cpus", lambda: 1)(),
            )
        return True

    # -- retraining -----------------------------------------------------------------------
    def retrain_due(self, config: CampaignConfig, n_labels: int, state: dict) -> str | None:
        spec = config.daemon.retrain
        last = state.get("retrain") or {}
        new = n_labels - last.get("n_labels", 0)
        if new <= 0:
            return None
        if spec.every_n_labels is not None and new >= spec.every_n_labels:
            return f"{new} new labels (every_n_labels {spec.every_n_labels})"
        if spec.cron is not None:
            from croniter import croniter

            since = last.get("at") or state.get("created_at") or self.started_at
            if since.tzinfo is None:
                since = since.replace(tzinfo=timezone.utc)
            due = croniter(spec.cron, since).get_next(datetime)
            if due <= datetime.now(timezone.utc):
                return f"cron {spec.cron!r} fell due at {due:%Y-%m-%d %H:%M} UTC"
        return None

    def maybe_retrain(self, config: CampaignConfig, client) -> bool:
        state = self.state(config)
        if not config.finetune.enabled or not state.get("systems"):
            return False
        if "created_at" not in state:
            self._save_state(config, {"created_at": datetime.now(timezone.utc)})
        campaign = self.campaign(config)
        labeller = campaign.labeller()
        lot_hash = level_of_theory_hash(labeller)
        by_system: dict[str, list[str]] = defaultdict(list)
        for doc in self.store.labels.find(
            {"lot_hash": lot_hash, "chemical_system": {"$in": state["systems"]}},
            {"chemical_system": 1},
        ):
            by_system[doc["chemical_system"]].append(doc["_id"])
        n_labels = sum(len(v) for v in by_system.values())
        why = self.retrain_due(config, n_labels, state)
        if why is None:
            return False
        split = split_labels(config, by_system)
        decision: dict[str, Any] = {
            "kind": "retrain",
            "campaign": config.name,
            "family": config.finetune.trainer.name,
            "trigger": why,
            "n_labels": n_labels,
            "split": {k: len(v) for k, v in split.items()},
        }
        retrain_state = {"n_labels": n_labels, "at": datetime.now(timezone.utc)}
        if len(split["train"]) < config.daemon.retrain.min_train_labels or not split["holdout"]:
            if state.get("postponed_at_labels") == n_labels:
                return False  # decided already for exactly these labels
            self._save_state(config, {"postponed_at_labels": n_labels})
            decision["outcome"] = "postponed"
            decision["reason"] = (
                f"{len(split['train'])} training and {len(split['holdout'])} held-out labels: "
                f"need {config.daemon.retrain.min_train_labels} and 1"
            )
            self.store.record_decision(decision)
            log.info("%s: retraining postponed: %s", config.name, decision["reason"])
            return False
        log.info("%s: retraining (%s)", config.name, why)
        try:
            model_id = campaign.train_model(
                client,
                split["train"],
                split["validation"],
                split["holdout"],
                lot={"hash": lot_hash, "theory": labeller.level_of_theory()},
                workdir=daemon_dir(config) / "training",
            )
        except Exception as exc:  # a failed fine-tune must not kill the dataset growth
            log.exception("%s: retraining failed", config.name)
            self.store.record_decision({**decision, "outcome": "failed", "reason": repr(exc)})
            self._save_state(config, {"retrain": {**retrain_state, "error": repr(exc)}})
            return True
        decision.update(self.judge(config, campaign, model_id, split["holdout"]))
        self.store.record_decision(decision)
        self._save_state(
            config,
            {"retrain": {**retrain_state, "model_id": model_id, "outcome": decision["outcome"]}},
        )
        log.info("%s: %s %s: %s", config.name, decision["outcome"], model_id, decision["reason"])
        if decision["outcome"] == "promoted":
            self.store.promote_model(model_id, decision["reason"])
            self.withdraw_unworthy(config, model_id)
        return True

    def judge(
        self, config: CampaignConfig, campaign: Campaign, model_id: str, holdout_ids: list[str]
    ) -> dict[str, Any]:
        """Candidate vs. promoted model (the pretrained one before any promotion) on the same
        held-out labels, by the configured rule; parity plots of both."""
        from pestle.evaluation.metrics import evaluate_potential
        from pestle.evaluation.plots import parity_plot

        rule = config.daemon.retrain
        incumbent_id = self.promoted(config)
        holdout = campaign._labelled(holdout_ids)
        candidate = campaign.fine_tuned_potential(model_id)
        incumbent = (
            campaign.fine_tuned_potential(incumbent_id)
            if incumbent_id is not None
            else campaign.base_potential()
        )
        results = {
            "candidate": evaluate_potential(candidate, holdout),
            "incumbent": evaluate_potential(incumbent, holdout),
        }
        pooled = {name: _pooled(r) for name, r in results.items()}
        key = "force_mae" if rule.rule == "force_mae" else "softening_distance"
        new, old = pooled["candidate"][key], pooled["incumbent"][key]
        better = new < old * (1.0 - rule.min_improvement)
        incumbent_name = incumbent_id or "the pretrained model"
        reason = (
            f"{key} {new:.4f} vs {old:.4f} of {incumbent_name} on {len(holdout)} held-out "
            f"labels: {'better' if better else 'not better'} by the rule "
            f"(improvement > {rule.min_improvement:.0%})"
        )
        plots = {}
        plot_dir = daemon_dir(config) / "plots"
        for system in results["candidate"]:
            reference = results["candidate"][system]["arrays"]["reference"]
            path = parity_plot(
                reference,
                {
                    incumbent_name: results["incumbent"][system]["arrays"]["predicted"],
                    model_id: results["candidate"][system]["arrays"]["predicted"],
                },
                plot_dir / f"parity-{model_id}-{system}.png",
                title=f"{system}: held-out forces, candidate vs promoted",
            )
            plots[system] = str(path)
        self.store.models.update_one(
            {"_id": model_id},
            {
                "$set": {
                    f"evaluation.daemon-{settings_hash(holdout_ids)[:10]}": _strip(
                        results["candidate"]
                    )
                }
            },
        )
        return {
            "model_id": model_id,
            "incumbent": incumbent_id,
            "rule": rule.rule,
            "metrics": {name: _strip(r) for name, r in results.items()},
            "pooled": pooled,
            "holdout_label_ids": holdout_ids,
            "plots": plots,
            "outcome": "promoted" if better else "kept",
            "reason": reason,
        }

    def withdraw_unworthy(self, config: CampaignConfig, model_id: str) -> None:
        """Re-score the campaign's queued labels with the newly promoted model; withdraw those
        whose expected softening error falls under ``daemon.withdraw_below``."""
        from pestle.scoring import softening_error

        queued = list(
            self.store.jobs.find(
                {"kind": "label", "state": JOB_QUEUED, **campaign_runs(config)},
                {"payload.structure_id": 1},
            )
        )
        if not queued:
            return
        campaign = self.campaign(config, model_id=model_id)
        ids = [j["payload"]["structure_id"] for j in queued]
        docs = {d["_id"]: d for d in self.store.structures.find({"_id": {"$in": ids}})}
        atoms = [self.store.atoms_from_doc(docs[i]) for i in ids]
        predictions = campaign.potential.predict(atoms, stress=False)
        softening = campaign.softening_model(sorted({d["chemical_system"] for d in docs.values()}))
        threshold = config.daemon.withdraw_below
        withdrawn = 0
        for job, sid, prediction in zip(queued, ids, predictions, strict=True):
            doc = docs[sid]
            max_force = float(np.linalg.norm(prediction.forces, axis=1).max())
            estimate = softening.estimate(doc["chemical_system"], doc["provenance"]["sampler"])
            error = softening_error(max_force, estimate.slope)
            self.store.set_scores(
                sid,
                campaign.model_key,
                {"max_force": max_force, "expected_softening_error": error},
            )
            if threshold is not None and error < threshold:
                reason = (
                    f"expected softening error {error:.3f} eV/A under promoted {model_id} "
                    f"(s = {estimate.slope:.3f}) is below withdraw_below {threshold}"
                )
                withdrawn += self.store.withdraw_job(job["_id"], reason)
        self.store.record_decision(
            {"kind": "rescore", "campaign": config.name, "model_id": model_id,
             "queued": len(queued), "withdrawn": withdrawn,
             "reason": f"re-scored {len(queued)} queued labels after promoting {model_id}"}
        )  # fmt: skip
