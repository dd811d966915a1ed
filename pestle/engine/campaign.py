"""One campaign run: seed -> sample -> score -> select -> label -> fine-tune -> evaluate.

Every stage is idempotent and records what it did in the run document, so running the same
config again stores nothing twice, and a run killed mid-way resumes where it stopped: the run
id is a hash of the config's scientific content, sampling is deterministic and deduplicated,
the selection is stored once and reused, labels are keyed by structure and level of theory,
and a model is keyed by its trainer settings and training labels.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pestle.config import CampaignConfig
from pestle.engine.seeds import build_seeds, seed_from_object
from pestle.labellers import LABELLERS, level_of_theory_hash
from pestle.potentials import POTENTIALS, Potential
from pestle.provenance import code_versions
from pestle.samplers import SAMPLERS, Seed
from pestle.samplers.validity import check_structure
from pestle.selectors import SELECTORS, ScoredCandidate
from pestle.store import Store, label_id
from pestle.structures import chemical_system, fingerprint, settings_hash
from pestle.trainers import LabelledStructure

log = logging.getLogger("pestle.engine")

# Stages in order; the run document records each one's outcome under stages.<name>.
STAGES = ("seed", "sample", "score", "select", "label", "finetune", "evaluate", "report")

# What a candidate's scores are computed with at this stage: how hard the model pushes the
# atoms is the first-order proxy for how far from equilibrium (and how softened) it is.
SCORE_KEYS = ("max_force", "mean_force", "energy_per_atom")

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    report: Path | None
    stages: dict[str, Any] = field(default_factory=dict)


def config_fingerprint(config: CampaignConfig) -> str:
    """Hash of what determines the science of a run (not where it is stored or dispatched)."""
    content = config.model_dump(
        mode="json", exclude={"store", "dask", "daemon", "work_dir", "source"}
    )
    return settings_hash(content)


def run_id_for(config: CampaignConfig, extra_seed_ids: list[str] | None = None) -> str:
    digest = config_fingerprint(config)
    if extra_seed_ids:  # seeds given as Python objects are part of the run's science too
        digest = settings_hash({"config": digest, "seeds": sorted(extra_seed_ids)})
    return f"{config.name}-{digest[:10]}"


def stable_seed(*parts: object) -> int:
    """A 63-bit integer seed from any parts, the same in every process and Python version."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _share(fraction: float, n: int) -> int:
    """How many of ``n`` items a fraction takes: at least one, never all."""
    return min(max(1, math.ceil(fraction * n)), n - 1) if n > 1 else 0


class Campaign:
    """Runs the stages of one config against one store."""

    def __init__(
        self,
        config: CampaignConfig,
        store: Store,
        store_uri: str,
        *,
        progress: Progress | None = None,
        seeds: list[Any] | None = None,
        round_index: int | None = None,
        model_id: str | None = None,
        systems: set[str] | None = None,
        per_system: int | None = None,
    ) -> None:
        """``seeds``: ASE ``Atoms`` or pymatgen ``Structure`` objects, used beside the config's.

        The daemon runs a campaign in rounds (``round_index``): each round samples afresh (its
        own random streams), scores with ``model_id`` (a stored model, e.g. the promoted one)
        instead of the configured potential, samples only the chemical ``systems`` still
        open, requests ``per_system`` labels per system and never re-selects a structure
        that already has a label or a labelling job."""
        self.config = config
        self.store = store
        self.store_uri = store_uri
        self.progress = progress or (lambda stage, done, total: None)
        self.extra_seeds = [seed_from_object(s) for s in seeds or []]
        self.round_index = round_index
        self.model_id = model_id
        self.systems = systems
        self.per_system = per_system if per_system is not None else config.selection.per_system
        self.run_id = run_id_for(config, [fingerprint(s.atoms) for s in self.extra_seeds])
        if round_index is not None:
            self.run_id = f"{self.run_id}-r{round_index:04d}"
        self.run_dir = Path(config.work_dir).resolve() / "runs" / self.run_id
        self._potential: Potential | None = None
        self._committee: list[Potential] | None = None

    # -- helpers --------------------------------------------------------------------------
    @property
    def potential(self) -> Potential:
        if self._potential is None:
            if self.model_id is not None:
                self._potential = self.fine_tuned_potential(self.model_id)
            else:
                self._potential = self.base_potential()
        return self._potential

    def base_potential(self) -> Potential:
        """The configured (pretrained) potential that fine-tuning starts from."""
        return POTENTIALS.build(self.config.potential.name, self.config.potential.params)

    def _record(self, stage: str, outcome: dict[str, Any]) -> None:
        self.store.update_run(self.run_id, {f"stages.{stage}": outcome})

    def _stage_done(self, stage: str) -> dict[str, Any] | None:
        run = self.store.get_run(self.run_id) or {}
        return (run.get("stages") or {}).get(stage)

    # -- the run --------------------------------------------------------------------------
    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from pestle.store import mask_uri

        self.store.start_run(
            self.run_id,
            {
                "campaign": self.config.name,
                "config": self.config.model_dump(mode="json", exclude={"source"}),
                "config_file": str(self.config.source) if self.config.source else None,
                "config_hash": config_fingerprint(self.config),
                "store": mask_uri(self.store_uri),
                "code_versions": code_versions(),
                "round": self.round_index,
                "scored_with_model": self.model_id,
            },
        )

    def run(self, client=None) -> RunResult:
        self._start()
        try:
            seeds = self.stage_seeds()
            self.stage_sample(seeds)
            self.stage_score()
            selected = self.stage_select()
            self.stage_label(selected, client)
            split = self.stage_split()
            model_id = self.stage_finetune(split, client)
            evaluation = self.stage_evaluate(split, model_id)
            report = self.stage_report(evaluation, model_id)
        except BaseException as exc:
            self.store.update_run(self.run_id, {"state": "interrupted", "error": repr(exc)})
            raise
        self.store.update_run(self.run_id, {"state": "finished", "report": str(report)})
        run = self.store.get_run(self.run_id)
        return RunResult(self.run_id, self.run_dir, report, run.get("stages", {}))

    def run_round(self, client) -> dict[str, Any]:
        """One daemon round: seed, sample, score, select and label (training and evaluation
        are the daemon's scheduled retraining, not part of a round). Returns the stages."""
        self._start()
        try:
            seeds = self.stage_seeds()
            if self.systems is not None:
                seeds = [s for s in seeds if chemical_system(s.atoms) in self.systems]
            self.stage_sample(seeds)
            self.stage_score()
            self.stage_label(self.stage_select(), client)
        except BaseException as exc:
            self.store.update_run(self.run_id, {"state": "interrupted", "error": repr(exc)})
            raise
        self.store.update_run(self.run_id, {"state": "finished"})
        return self.store.get_run(self.run_id).get("stages", {})

    # -- stages ---------------------------------------------------------------------------
    def stage_seeds(self) -> list[Seed]:
        seeds = []
        structures = [
            seed
            for index, spec in enumerate(self.config.seeds)
            for seed in build_seeds(spec, f"seeds.{index}", self.store)
        ] + self.extra_seeds
        for structure in structures:
            name, atoms, source = structure.name, structure.atoms, structure.source
            sid, new = self.store.add_structure(
                atoms,
                kind="seed",
                name=name,
                provenance={"source": source, "campaign": self.config.name, "run_id": self.run_id},
                run_id=self.run_id,
            )
            if any(s.id == sid for s in seeds):
                log.warning("seed %s is a duplicate of an earlier seed; used once", name)
                continue
            seeds.append(Seed(atoms=atoms, id=sid, name=name, source=source))
        self._record("seed", {"seeds": [{"id": s.id, "name": s.name} for s in seeds]})
        return seeds

    def stage_sample(self, seeds: list[Seed]) -> dict[str, Any]:
        counts: dict[str, int] = defaultdict(int)
        rejected: dict[str, list[str]] = defaultdict(list)
        for index, spec in enumerate(self.config.samplers):
            sampler = SAMPLERS.build(spec.name, spec.params)
            for seed in seeds:
                rng_seed = (
                    stable_seed(self.config.seed, index, spec.name, seed.id)
                    if self.round_index is None
                    else stable_seed(self.config.seed, self.round_index, index, spec.name, seed.id)
                )
                for candidate in sampler.sample(seed, rng_seed):
                    reason = check_structure(candidate.atoms)
                    if reason is not None:
                        rejected[spec.name].append(reason)
                        counts["rejected"] += 1
                        continue
                    _, new = self.store.add_structure(
                        candidate.atoms,
                        kind="candidate",
                        provenance={
                            "sampler": candidate.sampler,
                            "params": candidate.params,
                            "parent_id": candidate.parent_id,
                            "parent_name": seed.name,
                            "rng_seed": candidate.rng_seed,
                            "campaign": self.config.name,
                            "run_id": self.run_id,
                        },
                        run_id=self.run_id,
                    )
                    counts["new" if new else "already_stored"] += 1
                    counts[f"sampler:{spec.name}"] += 1
            self.progress("sample", index + 1, len(self.config.samplers))
        outcome = {"counts": dict(counts), "rejected": {k: v[:20] for k, v in rejected.items()}}
        self._record("sample", outcome)
        return outcome

    def _run_candidates(self, projection: dict | None = None) -> list[dict]:
        return list(
            self.store.structures.find({"runs": self.run_id, "kind": "candidate"}, projection).sort(
                "_id", 1
            )
        )

    @property
    def model_key(self) -> str:
        """Identity of what scored the candidates: the potential, and the committee and
        descriptors when configured (scores are recomputed when any of them changes)."""
        scoring = self.config.scoring
        if not scoring.committee and not scoring.embeddings:
            return settings_hash(self.potential.describe())
        return settings_hash(
            {
                "potential": self.potential.describe(),
                "committee": [c.model_dump() for c in scoring.committee],
                "embeddings": scoring.embeddings,
            }
        )

    @property
    def committee(self) -> list[Potential]:
        if self._committee is None:
            self._committee = [
                POTENTIALS.build(spec.name, spec.params) for spec in self.config.scoring.committee
            ]
        return self._committee

    def stage_score(self) -> dict[str, Any]:
        from pestle.scoring import committee_disagreement

        key = self.model_key
        scoring = self.config.scoring
        if scoring.embeddings and not hasattr(self.potential, "embed"):
            raise ValueError(f"scoring.embeddings: potential {self.potential.name} has no embed()")
        todo = [d for d in self._run_candidates() if key not in (d.get("scores") or {})]
        total = len(todo)
        done = 0
        # Chunks bound the driver's memory; the potential itself bounds each forward pass.
        for start in range(0, total, 32):
            chunk = todo[start : start + 32]
            atoms_list = [self.store.atoms_from_doc(d) for d in chunk]
            predictions = self.potential.predict(atoms_list, stress=False)
            committee = (
                committee_disagreement(
                    atoms_list,
                    [predictions] + [m.predict(atoms_list, stress=False) for m in self.committee],
                )
                if self.committee
                else [{}] * len(chunk)
            )
            descriptors = (
                self.potential.embed(atoms_list) if scoring.embeddings else [None] * len(chunk)
            )
            for doc, atoms, prediction, spread, descriptor in zip(
                chunk, atoms_list, predictions, committee, descriptors, strict=True
            ):
                norms = np.linalg.norm(prediction.forces, axis=1)
                scores = {
                    "max_force": float(norms.max()),
                    "mean_force": float(norms.mean()),
                    "energy_per_atom": float(prediction.energy) / len(atoms),
                    **spread,
                }
                self.store.set_scores(doc["_id"], key, scores)
                if descriptor is not None:
                    self.store.structures.update_one(
                        {"_id": doc["_id"]},
                        {"$set": {f"embeddings.{key}": np.asarray(descriptor).tolist()}},
                    )
            done += len(chunk)
            self.progress("score", done, total)
        outcome = {
            "model": self.potential.describe(),
            "committee": [m.describe() for m in self.committee],
            "model_key": key,
            "scored": total,
        }
        self._record("score", outcome)
        return outcome

    def softening_model(self, systems: list[str]):
        """Softening scales fitted on the labels already stored for these systems at this
        campaign's level of theory (the prior where there are too few)."""
        from pestle.scoring import SofteningModel

        lot_hash = level_of_theory_hash(self.labeller())
        labelled = [
            (atoms, label["chemical_system"], label.get("sampler"))
            for atoms, _, label in self.store.labelled_atoms(
                {"lot_hash": lot_hash, "chemical_system": {"$in": systems}}
            )
        ]
        scoring = self.config.scoring
        if not labelled:
            return SofteningModel({}, scoring.softening_prior, scoring.softening_min_components)
        return SofteningModel.fit(
            self.potential, labelled, scoring.softening_prior, scoring.softening_min_components
        )

    def stage_select(self) -> list[str]:
        from pestle.scoring import combine, softening_error

        previous = self._stage_done("select")
        if previous and previous.get("selected"):
            # Resuming: the batch was chosen before; never choose a fresh batch beside it.
            return [s["id"] for s in previous["selected"]]
        key = self.model_key
        docs = self._run_candidates()
        if self.round_index is not None:
            taken = self._labelled_or_queued([d["_id"] for d in docs])
            docs = [d for d in docs if d["_id"] not in taken]
        scoring = self.config.scoring
        estimates: dict[str, dict] = {}
        scored = []
        softening = None
        if "expected_softening_error" in scoring.weights:
            softening = self.softening_model(sorted({d["chemical_system"] for d in docs}))
        for d in docs:
            scores = dict(d["scores"][key])
            sampler = d["provenance"]["sampler"]
            if softening is not None:
                estimate = softening.estimate(d["chemical_system"], sampler)
                # max_force is the largest per-atom force norm, so this is the largest error.
                scores["expected_softening_error"] = softening_error(
                    scores["max_force"], estimate.slope
                )
                estimates[f"{d['chemical_system']}/{sampler}"] = estimate.as_dict()
            embedding = (d.get("embeddings") or {}).get(key)
            scored.append(
                ScoredCandidate(
                    id=d["_id"],
                    chemical_system=d["chemical_system"],
                    sampler=sampler,
                    scores=scores,
                    extra={"embedding": embedding} if embedding is not None else {},
                )
            )
        if scored:
            names = {name for c in scored for name in c.scores}
            combined = combine(
                {n: [c.scores.get(n, 0.0) for c in scored] for n in names}, scoring.weights
            )
            for candidate, value in zip(scored, combined, strict=True):
                candidate.scores["combined"] = float(value)
        spec = self.config.selection
        selector = SELECTORS.build(spec.selector.name, spec.selector.params)
        picks = selector.select(scored, self.per_system)
        by_id = {c.id: c for c in scored}
        for pick in picks:
            self.store.structures.update_one(
                {"_id": pick.id},
                {
                    "$set": {
                        f"selection.{self.run_id}": {
                            "rank": pick.rank,
                            "reason": pick.reason,
                            "scores": by_id[pick.id].scores,
                        }
                    }
                },
            )
        selected = [{"id": p.id, "rank": p.rank, "reason": p.reason} for p in picks]
        self._record(
            "select",
            {
                "selector": spec.selector.model_dump(),
                "per_system": self.per_system,
                "weights": scoring.weights,
                "softening_estimates": estimates,
                "candidates": len(scored),
                "selected": selected,
            },
        )
        return [p.id for p in picks]

    def _labelled_or_queued(self, structure_ids) -> set[str]:
        """Structures that already have a label, or a labelling job, at this level of theory."""
        lot_hash = level_of_theory_hash(self.labeller())
        ids = list(structure_ids)
        labelled = {
            d["structure_id"]
            for d in self.store.labels.find(
                {"structure_id": {"$in": ids}, "lot_hash": lot_hash}, {"structure_id": 1}
            )
        }
        jobs = {f"label-{sid}-{lot_hash}": sid for sid in ids}
        queued = {
            jobs[d["_id"]] for d in self.store.jobs.find({"_id": {"$in": list(jobs)}}, {"_id": 1})
        }
        return labelled | queued

    def labeller(self):
        return LABELLERS.build(self.config.labeller.name, self.config.labeller.params)

    def stage_label(self, structure_ids: list[str], client) -> dict[str, Any]:
        from pestle.dispatch.labelling import label_jobs

        labeller = self.labeller()
        lot_hash = level_of_theory_hash(labeller)
        job_ids = []
        already = 0
        rejected: dict[str, str] = {}
        for sid in structure_ids:
            # Checked again before paying for DFT: structures may come from other runs,
            # imports or older, laxer versions of the checks.
            reason = check_structure(self.store.get_atoms(sid))
            if reason is not None:
                rejected[sid] = reason
                continue
            job_id = f"label-{sid}-{lot_hash}"
            job = self.store.jobs.find_one({"_id": job_id}, {"state": 1})
            labelled = self.store.labels.count_documents({"_id": label_id(sid, lot_hash)}, limit=1)
            if labelled and (job is None or job["state"] == "done"):
                already += 1
                continue
            self.store.enqueue_job(
                job_id,
                "label",
                {
                    "structure_id": sid,
                    "labeller": self.config.labeller.model_dump(),
                    "lot_hash": lot_hash,
                },
                run_id=self.run_id,
            )
            job_ids.append(job_id)
        states: dict[str, str] = {}
        if job_ids:
            if client is None:
                raise RuntimeError("labelling needs a Dask client")
            states = label_jobs(
                client,
                self.store,
                job_ids,
                store_uri=self.store_uri,
                work_root=str(self.run_dir / "jobs"),
                progress=lambda done, total, job_id, state: self.progress("label", done, total),
                job_timeout_seconds=self.config.dask.job_timeout_seconds,
                cpus_per_job=getattr(labeller, "cpus", lambda: 1)(),
            )
        failed = {j: s for j, s in states.items() if s not in ("done", "withdrawn")}
        outcome = {
            "labeller": labeller.name,
            "lot_hash": lot_hash,
            "level_of_theory": labeller.level_of_theory(),
            "requested": len(structure_ids),
            "already_labelled": already,
            "dispatched": len(job_ids),
            "failed": sorted(failed),
            "withdrawn": sorted(j for j, s in states.items() if s == "withdrawn"),
            "rejected_before_dispatch": rejected,
        }
        self._record("label", outcome)
        return outcome

    def _selected_labels(self) -> dict[str, list[str]]:
        """Label ids of this run's selection, per chemical system."""
        lot_hash = self._stage_done("label")["lot_hash"]
        selected = [s["id"] for s in self._stage_done("select")["selected"]]
        by_system: dict[str, list[str]] = defaultdict(list)
        for label in self.store.labels.find(
            {"_id": {"$in": [label_id(s, lot_hash) for s in selected]}},
            {"chemical_system": 1},
        ):
            by_system[label["chemical_system"]].append(label["_id"])
        return {k: sorted(v) for k, v in sorted(by_system.items())}

    def stage_split(self) -> dict[str, dict[str, list[str]]]:
        """Deterministic split per chemical system (by hashed label id) into held-out labels
        (evaluation only), validation labels (epoch choice) and training labels."""
        holdout_fraction = self.config.evaluation.holdout_fraction
        validation_fraction = self.config.finetune.validation_fraction
        split: dict[str, dict[str, list[str]]] = {}
        for system, ids in self._selected_labels().items():
            ordered = sorted(ids, key=lambda i: stable_seed(self.config.seed, "holdout", i))
            n_hold = _share(holdout_fraction, len(ordered))
            rest = ordered[n_hold:]
            n_val = _share(validation_fraction, len(rest)) if validation_fraction else 0
            split[system] = {
                "holdout": sorted(ordered[:n_hold]),
                "validation": sorted(rest[:n_val]),
                "train": sorted(rest[n_val:]),
            }
        self._record("split", split)
        return split

    def stage_finetune(self, split: dict[str, dict[str, list[str]]], client) -> str | None:
        if not self.config.finetune.enabled:
            self._record("finetune", {"skipped": "finetune.enabled is false"})
            return None

        train_ids = sorted(i for part in split.values() for i in part["train"])
        val_ids = sorted(i for part in split.values() for i in part.get("validation", []))
        if not train_ids:
            self._record("finetune", {"skipped": "no training labels"})
            return None
        label_stage = self._stage_done("label")
        holdout_ids = sorted(i for p in split.values() for i in p["holdout"])
        self.progress("finetune", 0, 1)
        model_id = self.train_model(
            client,
            train_ids,
            val_ids,
            holdout_ids,
            lot={"hash": label_stage["lot_hash"], "theory": label_stage["level_of_theory"]},
            workdir=self.run_dir / "training",
        )
        self.progress("finetune", 1, 1)
        self._record(
            "finetune",
            {"model_id": model_id, "n_train": len(train_ids), "n_validation": len(val_ids)},
        )
        return model_id

    def train_model(
        self,
        client,
        train_ids: list[str],
        val_ids: list[str],
        holdout_ids: list[str],
        *,
        lot: dict[str, Any],
        workdir: Path,
    ) -> str:
        """Fine-tune the configured (pretrained) potential on these labels as a Dask job (a
        GPU worker when there is one) and store the model version; returns its id. A model
        with the same trainer, labels and parent is never trained twice."""
        from pestle.dispatch.training import train_model

        spec = self.config.finetune.trainer
        parent = self.base_potential().describe()
        model_id = "model-" + settings_hash(
            {
                "trainer": spec.model_dump(),
                "train": train_ids,
                "validation": val_ids,
                "parent": parent,
            }
        )
        if not self.store.models.count_documents({"_id": model_id}, limit=1):
            record = {
                "family": spec.name,
                "trainer": spec.model_dump(),
                "parent": parent,
                "training": {
                    "label_ids": train_ids,
                    "validation_label_ids": val_ids,
                    "query": {"_id": {"$in": train_ids}},
                    "holdout_label_ids": holdout_ids,
                },
                "level_of_theory_hash": lot["hash"],
                "level_of_theory": lot["theory"],
                "run_id": self.run_id,
                "campaign": self.config.name,
            }
            train_model(
                client,
                store_uri=self.store_uri,
                database=self.store.db.name,
                model_id=model_id,
                trainer=spec.model_dump(),
                train_label_ids=train_ids,
                val_label_ids=val_ids,
                workdir=str(workdir / model_id),
                record=record,
            )
        return model_id

    def _labelled(self, label_ids: list[str]) -> list[LabelledStructure]:
        return [
            LabelledStructure(atoms=atoms, structure_id=structure["_id"], label_id=label["_id"])
            for atoms, structure, label in self.store.labelled_atoms({"_id": {"$in": label_ids}})
        ]

    def fine_tuned_potential(self, model_id: str) -> Potential:
        from pestle.engine.models import load_stored_model

        return load_stored_model(self.store, model_id, self.run_dir / "models")

    def stage_evaluate(
        self, split: dict[str, dict[str, list[str]]], model_id: str | None
    ) -> dict[str, Any]:
        from pestle.evaluation.metrics import evaluate_potential
        from pestle.evaluation.plots import parity_plot

        holdout_ids = sorted(i for part in split.values() for i in part["holdout"])
        holdout = self._labelled(holdout_ids)
        models: dict[str, Potential] = {"pretrained": self.potential}
        if model_id is not None:
            models["fine-tuned"] = self.fine_tuned_potential(model_id)
        results = (
            {name: evaluate_potential(pot, holdout) for name, pot in models.items()}
            if holdout
            else {}
        )
        plots: dict[str, str] = {}
        for system in sorted({s for r in results.values() for s in r}):
            arrays = {name: r[system]["arrays"] for name, r in results.items() if system in r}
            reference = next(iter(arrays.values()))["reference"]
            path = parity_plot(
                reference,
                {name: a["predicted"] for name, a in arrays.items()},
                self.run_dir / f"parity-forces-{system}.png",
                title=f"{system}: held-out forces vs {self._stage_done('label')['labeller']}",
            )
            plots[system] = path.name
        summary = {
            name: {system: {k: v for k, v in m.items() if k != "arrays"} for system, m in r.items()}
            for name, r in results.items()
        }
        outcome = {
            "holdout_label_ids": holdout_ids,
            "metrics": summary,
            "plots": plots,
            "models": {k: v.describe() for k, v in models.items()},
        }
        self._record("evaluate", outcome)
        if model_id is not None and "fine-tuned" in summary:
            self.store.models.update_one(
                {"_id": model_id}, {"$set": {f"evaluation.{self.run_id}": summary["fine-tuned"]}}
            )
        return outcome

    def stage_report(self, evaluation: dict[str, Any], model_id: str | None) -> Path:
        from pestle.engine.report import write_report

        run = self.store.get_run(self.run_id)
        path = write_report(run, evaluation, model_id, self.run_dir)
        self._record("report", {"path": str(path)})
        return path
