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
from pestle.engine import service
from pestle.engine.run import run_passes
from pestle.plugins import PluginSpec
from pestle.stages import (
    ConvergenceStage,
    EOSStage,
    EvaluateStage,
    EvaluationSetStage,
    FinetuneStage,
    LabelStage,
    Round,
    RunContext,
    SampleStage,
    ScoreStage,
    SeedStage,
    SelectStage,
    SplitStage,
)
from pestle.stages.eos import eos_regressions
from pestle.stages.label import drive_label_jobs
from pestle.stages.score import force_scores
from pestle.stages.select import groups_of, softening_model
from pestle.stages.split import SplitPolicy, pooled, split_by_role
from pestle.store import JOB_QUEUED, ROLE_HOLDOUT, ROLE_TRAIN, ROLE_VALIDATION, Store, resolve_uri
from pestle.store.errors import as_utc
from pestle.structures import settings_hash

log = logging.getLogger("pestle.daemon")

LEASE_SECONDS = 60.0


def daemon_dir(config: CampaignConfig) -> Path:
    return service.daemon_dir(config.work_dir)


def pid_file(config: CampaignConfig) -> Path:
    return service.daemon_pid_file(config.work_dir)


def log_file(config: CampaignConfig) -> Path:
    return service.daemon_log_file(config.work_dir)


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
            if not self.store.meta.renew_daemon_lease(self.owner, self.lease_seconds):
                log.error("lost the store's daemon lease: stopping after this step")
                self.stopping.set()

    def run(self) -> None:
        """Hold the store's lease and run rounds until stopped (or idle, if asked)."""
        from pestle.dispatch.cluster import make_client

        first = self.configs[self.paths[0]]
        self.store_uri = resolve_uri(first.work_dir, first.store.uri, first.store.uri_file)
        self.store = Store(self.store_uri, first.store.database)
        self.store.meta.acquire_daemon_lease(
            self.owner,
            self.lease_seconds,
            {"configs": [str(p) for p in self.paths], "pid_file": str(pid_file(first))},
        )
        heartbeat = threading.Thread(target=self._heartbeat, name="daemon-lease", daemon=True)
        heartbeat.start()
        pid_path = pid_file(first)
        service.write_pid_file(pid_path)
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
            self.store.meta.release_daemon_lease(self.owner)
            service.remove_pid_file(pid_path)
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
            self.store.decisions.record(
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

    def context(self, config: CampaignConfig, client=None, **kwargs: Any) -> RunContext:
        return RunContext(config, self.store, self.store_uri, client=client, **kwargs)

    def promoted(self, config: CampaignConfig) -> str | None:
        return self.store.models.promoted(config.finetune.trainer.name)

    # -- one step of one campaign -------------------------------------------------------
    def step(self, config: CampaignConfig, client) -> bool:
        """Retrain if due, drain leftovers, run one round; False when there was nothing to do."""
        worked = self.maybe_retrain(config, client)
        if self.stopping.is_set():
            return True
        worked |= self.drain(config, client)
        if self.stopping.is_set():
            return True
        state = self.store.meta.campaign_state(config.name)
        limit = config.daemon.max_rounds
        if limit is not None and state.round >= limit:
            return worked
        if state.systems and all(s in state.finished for s in state.systems):
            return worked
        ended = state.last_round.get("ended_at")
        wait = config.daemon.round_interval_seconds
        if (
            ended is not None
            and wait
            and (datetime.now(timezone.utc) - as_utc(ended)).total_seconds() < wait
        ):
            return worked  # the next round is not due yet
        self.run_round(config, client)
        if not self.stopping.is_set():
            self.maybe_retrain(config, client)
        return True

    def run_round(self, config: CampaignConfig, client) -> None:
        """Seed, sample (fresh random streams), score with the promoted model, select within
        the round's budget among structures never labelled or queued, label; then decide
        which chemical systems are finished."""
        state = self.store.meta.campaign_state(config.name)
        open_systems = set(state.systems) - set(state.finished) if state.systems else None
        model_id = self.promoted(config)
        ctx = self.context(
            config, client,
            round=Round(state.round, model_id, open_systems, config.daemon.per_round),
        )  # fmt: skip
        log.info(
            "%s: round %d (scoring with %s)", config.name, state.round, model_id or "pretrained"
        )
        started = time.monotonic()
        stages = [SeedStage(), ConvergenceStage(),
                  SampleStage(self.round_samplers(config, model_id)), ScoreStage(),
                  EvaluationSetStage(), LabelStage("evaluation"), SelectStage(),
                  LabelStage("picks")]  # fmt: skip
        run_passes(ctx, stages)
        recorded = self.store.runs.require(ctx.run_id).stages
        systems = sorted({s["chemical_system"] for s in recorded["seed"]["seeds"]})
        finished = {**state.finished, **self.finished_systems(ctx, recorded)}
        self.store.meta.save_campaign_state(
            config.name,
            {
                "round": state.round + 1,
                "systems": systems,
                "finished": finished,
                "last_round": {
                    "run_id": ctx.run_id,
                    "seconds": round(time.monotonic() - started, 1),
                    "selected": len(recorded.get("select", {}).get("selected", [])),
                    "labelled": recorded.get("label", {}).get("dispatched", 0),
                    "model_id": model_id,
                    "ended_at": datetime.now(timezone.utc),
                },
            },
        )
        self.store.runs.update(ctx.run_id, {"daemon_round": state.round})

    def round_samplers(self, config: CampaignConfig, model_id: str | None) -> list[PluginSpec]:
        """The samplers a round runs: with ``daemon.md_with_promoted_model``, every sampler
        that drives dynamics or relaxations with a potential (md, migration, Boltzmann
        rattle) drives them with the promoted model (a verified copy of its checkpoint)."""
        if not config.daemon.md_with_promoted_model or model_id is None:
            return list(config.samplers)
        from pestle.samplers import with_potential
        from pestle.stages.models import stored_potential_spec

        promoted = stored_potential_spec(self.store, model_id, daemon_dir(config) / "models")
        return with_potential(config.samplers, promoted)

    def finished_systems(self, ctx: RunContext, recorded: dict[str, Any]) -> dict[str, dict]:
        """Systems that meet the stop criterion now, with the figures that decided it.

        The softening scale of the scoring model is measured on the campaign's evaluation set
        (never trained on); a system is finished when the scale's structure-level interval,
        not its point estimate, lies inside the band, on at least ``stop.min_structures``
        structures. The committee spread is the mean over this round's picks."""
        from pestle.evaluation.intervals import softening_interval
        from pestle.stages.evaluate import evaluation_set_labels

        stop = ctx.config.daemon.stop
        low, high = stop.softening_band
        picks = [s["id"] for s in recorded.get("select", {}).get("selected", [])]
        spread: dict[str, list[float]] = defaultdict(list)
        for doc in self.store.structures.find(
            {"_id": {"$in": picks}}, ["chemical_system", f"scores.{ctx.model_key}"]
        ):
            value = doc.scores.get(ctx.model_key, {}).get("committee_force")
            if value is not None:
                spread[doc.chemical_system].append(value)
        by_system: dict[str, list] = defaultdict(list)
        for stored in evaluation_set_labels(ctx):
            by_system[stored.chemical_system].append(stored.atoms)
        finished = {}
        for system, members in sorted(by_system.items()):
            predictions = ctx.potential.predict(members, stress=False)
            fit = softening_interval(
                [p.forces for p in predictions],
                [a.calc.results["forces"] for a in members],
                min_structures=stop.min_structures,
            )
            committee = float(np.mean(spread[system])) if spread.get(system) else None
            if not fit.inside(low, high):
                continue
            if stop.committee_force_below is not None and (
                committee is None or committee >= stop.committee_force_below
            ):
                continue
            reason = (
                f"softening scale {fit.text()} inside [{low}, {high}] on {fit.n_structures} "
                "evaluation-set structures the model never trained on"
                + (f"; committee spread {committee:.3f} eV/A" if committee is not None else "")
            )
            finished[system] = {"softening": fit.as_dict(), "committee_force": committee,
                                "reason": reason}  # fmt: skip
            self.store.decisions.record(
                {"kind": "finished", "campaign": ctx.config.name, "chemical_system": system,
                 "model_id": ctx.round.model_id, "softening": fit.as_dict(), "reason": reason}
            )  # fmt: skip
            log.info("%s: %s finished: %s", ctx.config.name, system, reason)
        return finished

    # -- leftovers ------------------------------------------------------------------------
    def drain(self, config: CampaignConfig, client) -> bool:
        """Compute the labelling jobs an earlier daemon left queued or running."""
        leftovers = self.store.jobs.unfinished_by_run(config.name)
        if not leftovers:
            return False
        ctx = self.context(config, client)
        for run_id, job_ids in leftovers.items():
            log.info("%s: %d unfinished labels of %s", config.name, len(job_ids), run_id)
            drive_label_jobs(ctx, job_ids, run_id)
        return True

    # -- retraining -----------------------------------------------------------------------
    def retrain_due(self, config: CampaignConfig, n_labels: int, state) -> str | None:
        spec = config.daemon.retrain
        last = state.retrain
        new = n_labels - last.get("n_labels", 0)
        if new <= 0:
            return None
        if spec.every_n_labels is not None and new >= spec.every_n_labels:
            return f"{new} new labels (every_n_labels {spec.every_n_labels})"
        if spec.cron is not None:
            from croniter import croniter

            since = last.get("at") or state.created_at or self.started_at
            if since.tzinfo is None:
                since = since.replace(tzinfo=timezone.utc)
            due = croniter(spec.cron, since).get_next(datetime)
            if due <= datetime.now(timezone.utc):
                return f"cron {spec.cron!r} fell due at {due:%Y-%m-%d %H:%M} UTC"
        return None

    def retrain_plan(
        self, config: CampaignConfig, systems: list[str]
    ) -> tuple[dict[str, list[str]], dict[str, dict[str, list[str]]]]:
        """The campaign's labels per system at its level of theory, and the roles the split
        policy gives them (recorded only once training goes ahead)."""
        ctx = self.context(config)
        by_system: dict[str, list[str]] = {}
        for system in systems:  # each system at its own level of theory
            by_system.update(self.store.labels.ids_by_system(
                ctx.labelling(system).lot_hash, [system], trainable=True))  # fmt: skip
        ids = [i for members in by_system.values() for i in members]
        roles = SplitPolicy.from_config(config).assign(
            by_system, self.store.labels.roles(ids), self.store.labels.samplers_of(ids)
        )
        return by_system, split_by_role(by_system, roles)

    def maybe_retrain(self, config: CampaignConfig, client) -> bool:
        state = self.store.meta.campaign_state(config.name)
        if not config.finetune.enabled or not state.systems:
            return False
        if state.created_at is None:
            self.store.meta.save_campaign_state(
                config.name, {"created_at": datetime.now(timezone.utc)}
            )
        by_system, preview = self.retrain_plan(config, state.systems)
        ids = [i for members in by_system.values() for i in members]
        n_labels = len(ids)
        why = self.retrain_due(config, n_labels, state)
        if why is None:
            return False
        counts = {role: len(pooled(preview, role))
                  for role in (ROLE_HOLDOUT, ROLE_VALIDATION, ROLE_TRAIN)}  # fmt: skip
        decision: dict[str, Any] = {
            "kind": "retrain",
            "campaign": config.name,
            "family": config.finetune.trainer.name,
            "trigger": why,
            "n_labels": n_labels,
            "split": counts,
        }
        retrain_state = {"n_labels": n_labels, "at": datetime.now(timezone.utc)}
        min_train = config.daemon.retrain.min_train_labels
        # The evaluation set judges a candidate; without one, a held-out pick must.
        judged = config.evaluation.evaluation_set.per_system > 0 or counts[ROLE_HOLDOUT]
        if counts[ROLE_TRAIN] < min_train or not judged:
            if state.postponed_at_labels == n_labels:
                return False  # decided already for exactly these labels
            self.store.meta.save_campaign_state(config.name, {"postponed_at_labels": n_labels})
            decision["outcome"] = "postponed"
            decision["reason"] = (
                f"{counts[ROLE_TRAIN]} training and {counts[ROLE_HOLDOUT]} held-out labels: "
                f"need {min_train}, and a held-out one when there is no evaluation set"
            )
            self.store.decisions.record(decision)
            log.info("%s: retraining postponed: %s", config.name, decision["reason"])
            return False
        log.info("%s: retraining (%s)", config.name, why)
        ctx = self.context(config, client, suffix="t" + settings_hash({"labels": sorted(ids)})[:8])
        ctx.outputs["labels_by_system"] = by_system
        try:
            outputs = run_passes(ctx, [SeedStage(), SplitStage(), FinetuneStage(),
                                       EvaluateStage("promoted"), EOSStage("promoted")])  # fmt: skip
        except Exception as exc:  # a failed fine-tune must not kill the dataset growth
            log.exception("%s: retraining failed", config.name)
            self.store.decisions.record({**decision, "outcome": "failed", "reason": repr(exc)})
            self.store.meta.save_campaign_state(
                config.name, {"retrain": {**retrain_state, "error": repr(exc)}}
            )
            return True
        decision.update(self.judge(ctx, outputs))
        self.store.decisions.record(decision)
        self.store.meta.save_campaign_state(
            config.name,
            {"retrain": {**retrain_state, "model_id": decision["model_id"],
                         "outcome": decision["outcome"]}},
        )  # fmt: skip
        log.info("%s: %s %s: %s", config.name, decision["outcome"], decision["model_id"],
                 decision["reason"])  # fmt: skip
        if decision["outcome"] == "promoted":
            self.store.models.promote(decision["model_id"], decision["reason"])
            self.withdraw_unworthy(config, decision["model_id"])
        return True

    def judge(self, ctx: RunContext, outputs: dict[str, Any]) -> dict[str, Any]:
        """Candidate vs. promoted model (the pretrained one before any promotion) on the same
        evaluation-set structures: promoted only when the paired improvement of the rule's
        figure has a structure-level interval clear of ``min_improvement``, and no chemical
        system's force MAE got worse beyond its interval."""
        from pestle.evaluation.intervals import format_difference

        rule = ctx.config.daemon.retrain
        model_id = outputs["model_id"]
        evaluation = outputs["evaluation"]
        incumbent_id = self.promoted(ctx.config)
        incumbent = incumbent_id or "the pretrained model"
        # force_mae: the per-structure error ratio (is the candidate better across
        # structures?), not the pooled MAE that one strongly distorted structure can carry.
        metric = "force_mae_ratio" if rule.rule == "force_mae" else "softening_distance"
        decided: dict[str, Any] = {"model_id": model_id, "incumbent": incumbent_id,
                                   "rule": rule.rule, "metric": metric, "run_id": ctx.run_id}  # fmt: skip
        if evaluation is None:
            return {**decided, "outcome": "kept",
                    "reason": "no evaluation-set labels to judge the candidate on"}  # fmt: skip
        difference = evaluation.paired("candidate", metric)
        regressions = evaluation.regressions("candidate", "force_mae_ratio", "chemical_system")
        eos_broken = eos_regressions(outputs.get("eos") or {}, "candidate", "incumbent")
        improved = difference.improved(rule.min_improvement)
        relative = metric == "force_mae_ratio"
        shown = format_difference(difference, digits=4, relative=relative)
        if not difference.enough:
            verdict = f"not enough evaluation structures (n = {difference.n_structures})"
        elif regressions:
            worse = ", ".join(f"{system} {format_difference(d, relative=True)}"
                              for system, d in sorted(regressions.items()))  # fmt: skip
            verdict = f"force MAE worse beyond its interval in {worse}"
        elif eos_broken:
            tolerance = ctx.config.eos.bulk_modulus_tolerance
            verdict = (f"bulk modulus outside ±{tolerance:.0%} of the DFT scan (whole "
                       f"interval) for {', '.join(eos_broken)}, where the model it would "
                       "replace was not")  # fmt: skip
        elif improved:
            verdict = "better beyond its interval"
        else:
            verdict = "not better beyond its interval"
        reason = (
            f"{metric} candidate vs {incumbent}: {shown} on {difference.n_structures} "
            f"evaluation-set structures (improvement required > {rule.min_improvement:.0%}): "
            f"{verdict}"
        )
        return {
            **decided,
            "difference": difference.as_dict(),
            "regressions": {system: d.as_dict() for system, d in regressions.items()},
            "eos_regressions": eos_broken,
            "evaluation": evaluation.as_dict(),
            "outcome": "promoted" if improved and not regressions and not eos_broken else "kept",
            "reason": reason,
        }

    def withdraw_unworthy(self, config: CampaignConfig, model_id: str) -> None:
        """Re-score the campaign's queued labels with the newly promoted model; withdraw those
        whose expected softening error falls under ``daemon.withdraw_below``."""
        from pestle.scoring import softening_error

        queued = self.store.jobs.find(state=JOB_QUEUED, kind="label", campaign=config.name)
        if not queued:
            return
        ctx = self.context(config, scoring_model=model_id)
        docs = {d.id: d for d in self.store.structures.find(
            {"_id": {"$in": [j.payload["structure_id"] for j in queued]}})}  # fmt: skip
        atoms = {sid: self.store.structures.atoms_of(doc) for sid, doc in docs.items()}
        ids = [j.payload["structure_id"] for j in queued]
        predictions = ctx.potential.predict([atoms[i] for i in ids], stress=False)
        softening = softening_model(ctx, {d.chemical_system for d in docs.values()})
        threshold = config.daemon.withdraw_below
        withdrawn, scores = 0, {}
        for job, sid, prediction in zip(queued, ids, predictions, strict=True):
            doc = docs[sid]
            max_force = force_scores(atoms[sid], prediction)["max_force"]
            estimate = softening.estimate(doc.chemical_system, groups_of(doc))
            error = softening_error(max_force, estimate.slope)
            scores[sid] = {"max_force": max_force, "expected_softening_error": error}
            if threshold is not None and error < threshold:
                reason = (
                    f"expected softening error {error:.3f} eV/A under promoted {model_id} "
                    f"(s = {estimate.slope:.3f}) is below withdraw_below {threshold}"
                )
                withdrawn += self.store.jobs.withdraw(job.id, reason)
        self.store.structures.set_scores(scores, ctx.model_key)
        self.store.decisions.record(
            {"kind": "rescore", "campaign": config.name, "model_id": model_id,
             "queued": len(queued), "withdrawn": withdrawn,
             "reason": f"re-scored {len(queued)} queued labels after promoting {model_id}"}
        )  # fmt: skip
