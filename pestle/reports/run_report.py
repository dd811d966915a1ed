"""The report of one campaign run: an HTML page (or Markdown) in the run folder, beside the
evaluate stage's plots, with its own figures in ``<run folder>/report/``.

Headed by campaign, run, date, store (password masked), level of theory, models and code
versions. Sections: softening before and after on the evaluation set (primary) and on the
held-out picks (secondary), per chemical system and per sampler, with structure-level
intervals and plain statements, or "not enough structures (n = ...)"; each system's parity,
force-error and softening-by-force plots; the convergence and equation-of-state checks when
the run recorded them; the fine-tune's learning curves; softening against the number of
labels; the dataset (counts, distributions of candidates against picks and the evaluation
set); the reference-calculation cost per label; the level of theory and code versions.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pestle.reports import sections as S
from pestle.reports.document import Code, Details, Document, Section, Table, Text

if TYPE_CHECKING:
    from pestle.store import Store

log = logging.getLogger("pestle.reports")

LABEL_FIELDS = ["structure_id", "chemical_system", "energy_per_atom", "max_force", "stress",
                "natoms", "extra", "level_of_theory", "labeller", "role", "sampler",
                "created_at"]  # fmt: skip


def write_report(
    run: dict[str, Any],
    evaluation: dict[str, Any],
    model_id: str | None,
    run_dir: Path,
    *,
    store: Store | None = None,
    fmt: str = "html",
) -> Path:
    """The run's report, ``<run_dir>/report.html`` (``fmt="md"``: ``report.md``). ``run``:
    the run document as stored (``RunDoc.model_dump(by_alias=True)``); ``evaluation``: its
    evaluate stage; ``model_id``: the fine-tuned model (None when fine-tuning was skipped).
    ``store``: the run's store, for the model's learning curves, the labels and the
    candidates; when None it is opened again from the run's config (as the CLI does), and
    if that fails the report says what it leaves out."""
    own = store is None
    if own:
        try:
            store = _reopen(run)
        except Exception as exc:  # the report must not fail a finished run
            log.warning("report of %s without its store (%s)", run.get("_id"), exc)
    try:
        stages = dict(run.get("stages") or {})
        if evaluation:
            stages["evaluate"] = evaluation
        if model_id and not (stages.get("finetune") or {}).get("model_id"):
            stages["finetune"] = {**(stages.get("finetune") or {}), "model_id": model_id}
        doc = build_run_report(store, {**run, "stages": stages}, Path(run_dir), Path(run_dir))
        return doc.write(Path(run_dir) / f"report.{fmt}", fmt)
    finally:
        if own and store is not None:
            store.close()


def write_run_report(
    store: Store,
    run_id: str,
    out_dir: Path | None = None,
    fmt: str = "html",
    work_dir: Path | None = None,
) -> Path:
    """The report of a stored run, written again (``pestle report --run``): into the run's
    folder (``<work_dir>/runs/<run id>``; ``work_dir`` defaults to the run's config) by
    default, else into ``out_dir`` with the evaluate stage's plots copied beside it."""
    run = store.runs.require(run_id).model_dump(by_alias=True)
    root = work_dir if work_dir is not None else (run.get("config") or {}).get("work_dir", ".")
    run_dir = Path(root).resolve() / "runs" / run_id
    out = Path(out_dir) if out_dir is not None else run_dir
    doc = build_run_report(store, run, run_dir, out)
    return doc.write(out / f"report.{fmt}", fmt)


def _reopen(run: dict[str, Any]) -> Store:
    from pestle.store import open_store

    config = run.get("config") or {}
    spec = config.get("store") or {}
    return open_store(config.get("work_dir", "."), spec.get("uri"), spec.get("uri_file"),
                      spec.get("database", "pestle"), start=False)  # fmt: skip


def build_run_report(
    store: Store | None, run: dict[str, Any], run_dir: Path, out: Path
) -> Document:
    """The report's document: ``run_dir`` holds the evaluate stage's plots, ``out`` is where
    the page goes (its figures under ``out/report``)."""
    from pestle.store import mask_uri

    stages = run.get("stages") or {}
    place = S.Place(out, Path(out) / "report")
    evaluate = stages.get("evaluate") or {}
    finetune = stages.get("finetune") or {}
    label = stages.get("label") or {}
    score = stages.get("score") or {}
    model_id = finetune.get("model_id")
    labels = _run_labels(store, stages) if store is not None else []
    lot = label.get("level_of_theory") or (labels[0].level_of_theory if labels else {})
    lot_hash = label.get("lot_hash") or (labels[0].lot_hash if labels else "?")
    campaign = run.get("campaign") or "?"
    database = ((run.get("config") or {}).get("store") or {}).get("database", "pestle")

    baseline = (evaluate.get("models") or {}).get(evaluate.get("baseline", ""))
    baseline_label = (evaluate.get("labels") or {}).get(evaluate.get("baseline", ""), "")
    models = [f"baseline: {S.describe_model(baseline or score.get('model') or {})}"
              + (f" ({baseline_label})" if str(baseline_label).startswith("model-") else "")]  # fmt: skip
    if model_id:
        trainer = ((run.get("config") or {}).get("finetune") or {}).get("trainer") or {}
        models.append(f"fine-tuned: {model_id} ({trainer.get('name', '?')} "
                      f"{json.dumps(trainer.get('params', {}))})")  # fmt: skip
    elif finetune.get("skipped"):
        models.append(f"no fine-tuning: {finetune['skipped']}")
    doc = Document(
        title=f"pestle run report — campaign {campaign}",
        subtitle=f"run {run.get('_id')}" + (f" · {run['state']}" if run.get("state") not in
                                             (None, "running") else ""),
        meta=[
            ("campaign", campaign),
            ("date", f"run started {S.when(run.get('started_at') or run.get('created_at'))}; "
                     f"report written {S.when(datetime.now(timezone.utc))}"),
            ("store", f"{mask_uri(str(run.get('store') or '?'))} · database {database}"),
            ("config", str(run.get("config_file") or "given as an object")),
            ("level of theory", S.describe_level_of_theory(lot)),
            ("models", "; ".join(models)),
            ("code versions", S.describe_versions(run.get("code_versions") or {})),
        ],
    )  # fmt: skip
    names = dict(evaluate.get("labels") or {})
    if store is None:
        doc.sections.append(Section("Written without the store").add(Text(
            "The store could not be opened again from the run's config, so learning curves, "
            "softening against the number of labels, distributions and the cost per label are "
            "left out; `pestle report --run` writes the whole report.", "warning")))  # fmt: skip

    # -- softening, evaluation set first ------------------------------------------------------
    primary = Section("Softening before and after: evaluation set", anchor="softening")
    members = (stages.get("evaluation_set") or {}).get("members") or {}
    primary.add(Text(
        "Softening scale: slope of the least-squares line through the origin of model force "
        "components against reference force components, per chemical system (below 1: the "
        "model is softer than the reference). The evaluation set is drawn at random from every "
        "valid candidate (stratified by sampler and amplitude), labelled once and never trained "
        "on: it measures the models on the distribution pestle samples, not on its picks. "
        "Intervals are 95% and structure-level (the force components of one structure are not "
        "independent). Evaluation-set structures: "
        + (", ".join(f"{s} {len(ids)}" for s, ids in sorted(members.items())) or "none") + "."
    ))  # fmt: skip
    sets = {which: evaluate.get(which) or {} for which in ("evaluation_set", "holdout")}
    primary.add(*S.evaluation_summary("evaluation_set", sets["evaluation_set"], names, place,
                                      primary=True))  # fmt: skip
    doc.sections.append(primary)
    accuracy = Section("Accuracy per chemical system: evaluation set", anchor="accuracy")
    accuracy.add(*S.per_system_plots("evaluation_set", sets["evaluation_set"], place, run_dir))
    if len(accuracy.blocks):
        doc.sections.append(accuracy)
    holdout = Section("Held-out picks (secondary)", anchor="holdout")
    holdout.add(Text(
        "The held-out picks were selected by score like the training labels (mostly the largest "
        "displacements) and kept out of training: they measure the regime pestle chose, not the "
        "distribution. Read them beside the evaluation set, not instead of it."
    ))  # fmt: skip
    holdout.add(*S.evaluation_summary("holdout", sets["holdout"], names, place,
                                      primary=False))  # fmt: skip
    plots = S.per_system_plots("holdout", sets["holdout"], place, run_dir)
    if plots:
        holdout.add(Details("Per-system plots of the held-out picks", plots))
    doc.sections.append(holdout)

    # -- checks the run recorded ---------------------------------------------------------------
    if stages.get("convergence"):
        doc.sections.append(Section("Label convergence", anchor="convergence").add(
            Text("Before the first labels of a chemical system at this level of theory, one "
                 "small off-equilibrium structure is labelled at the configured settings and at "
                 "higher ones; the differences are compared with the tolerances."),
            *S.convergence_blocks(stages["convergence"])))  # fmt: skip
    if stages.get("eos"):
        doc.sections.append(Section("Equation of state", anchor="eos").add(
            *S.eos_blocks(stages["eos"], place, "eos")))  # fmt: skip

    # -- fine-tuning ------------------------------------------------------------------------------
    tuning = Section("Fine-tuning", anchor="finetune")
    model = store.models.get(model_id) if model_id and store is not None else None
    if model_id is None:
        tuning.add(Text(f"No fine-tuning: {finetune.get('skipped', 'disabled')}.", "note"))
    else:
        tuning.add(Text(
            f"Model {model_id} trained on {finetune.get('n_train')} labelled structures; "
            f"{finetune.get('n_validation', 0)} more chose the epoch kept (none: the training "
            "loss chose it)."
        ))  # fmt: skip
        if model is not None:
            tuning.add(*S.learning_curves_blocks([model], place, "learning-curves"))
    doc.sections.append(tuning)

    if store is not None:
        labels_section = Section("Softening against the number of labels", anchor="labels")
        labels_section.add(Text(
            f"Every model version of campaign {campaign} measured on its evaluation set, "
            "against the number of labels of each system it trained on."
        ))  # fmt: skip
        labels_section.add(*S.softening_vs_labels_blocks(
            S.softening_vs_labels(store, campaign), place, "softening-vs-labels"))  # fmt: skip
        doc.sections.append(labels_section)

    # -- dataset and cost ------------------------------------------------------------------------
    doc.sections.append(_dataset_section(store, run, place))
    if store is not None:
        cost = Section("Reference-calculation cost per label", anchor="cost")
        cost.add(Text("Every label this run used: its picks and evaluation set, or for a "
                      "retraining the labels it trained, validated and was evaluated on."))  # fmt: skip
        cost.add(*S.cost_blocks(labels, place, "cost-per-label"))
        doc.sections.append(cost)

    appendix = Section("Level of theory and code versions", anchor="appendix")
    appendix.add(Text(f"Level of theory (hash {lot_hash}):"),
                 Code(json.dumps(lot, indent=2, default=str)),
                 Table(["package", "version"], [[k, v] for k, v in (run.get("code_versions") or {}).items()]))  # fmt: skip
    doc.sections.append(appendix)
    return doc


def _run_labels(store: Store, stages: dict[str, Any]) -> list[Any]:
    """The labels a run used: its picks and evaluation set at its level of theory, and the
    labels its split, fine-tune and evaluation named (a daemon retraining has only those)."""
    picks = [s["id"] for s in (stages.get("select") or {}).get("selected", [])]
    members = (stages.get("evaluation_set") or {}).get("members") or {}
    structures = picks + [i for ids in members.values() for i in ids]
    label_ids = {i for roles in (stages.get("split") or {}).values() if isinstance(roles, dict)
                 for ids in roles.values() for i in ids}  # fmt: skip
    for which in ("evaluation_set", "holdout"):
        label_ids.update(((stages.get("evaluate") or {}).get(which) or {}).get("label_ids", []))
    lot_hash = (stages.get("label") or {}).get("lot_hash")
    found: dict[str, Any] = {}
    if structures and lot_hash:
        query = {"structure_id": {"$in": structures}, "lot_hash": lot_hash}
        found.update({doc.id: doc for doc in store.labels.find(query, LABEL_FIELDS)})
    if label_ids:
        found.update({doc.id: doc for doc in store.labels.find(
            {"_id": {"$in": sorted(label_ids)}}, [*LABEL_FIELDS, "lot_hash"])})  # fmt: skip
    return [found[k] for k in sorted(found)]


def _dataset_section(store: Store | None, run: dict[str, Any], place: S.Place) -> Section:
    stages = run.get("stages") or {}
    sample = stages.get("sample") or {}
    select = stages.get("select") or {}
    label = stages.get("label") or {}
    score = stages.get("score") or {}
    members = (stages.get("evaluation_set") or {}).get("members") or {}
    counts = sample.get("counts") or {}
    section = Section("Dataset", anchor="dataset")
    if not sample:
        section.add(Text("This run sampled nothing (a retraining over the campaign's stored "
                         "labels)."))  # fmt: skip
    else:
        section.add(Table(
            ["seeds", "candidates new", "already stored", "rejected", "evaluation set", "picks",
             "labels dispatched", "already labelled", "failed"],
            [[len((stages.get("seed") or {}).get("seeds", [])), counts.get("new", 0),
              counts.get("already_stored", 0), counts.get("rejected", 0),
              sum(len(v) for v in members.values()), len(select.get("selected", [])),
              label.get("dispatched"), label.get("already_labelled"),
              len(label.get("failed", []))]],
        ))  # fmt: skip
    per_sampler = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in counts.items()
                            if k.startswith("sampler:"))  # fmt: skip
    if per_sampler:
        section.add(Text(f"Candidates per sampler: {per_sampler}."))
    rejected = sample.get("rejected") or {}
    if rejected:
        section.add(Details("Candidates rejected by validity checks", [Table(
            ["sampler", "reasons (first five)"],
            [[s, "; ".join(r[:5])] for s, r in rejected.items()])]))  # fmt: skip
    if label.get("failed"):
        section.add(Text(f"{len(label['failed'])} labels failed: "
                         + "; ".join(str(f) for f in label["failed"][:5]), "warning"))  # fmt: skip

    # Distributions: the scoring model's predictions of every candidate, and reference labels
    # of the picks and the evaluation set.
    key = score.get("model_key")
    picks = {s["id"] for s in select.get("selected", [])}
    evaluation = {i for ids in members.values() for i in ids}
    predicted: dict[str, dict[str, S.Predicted]] = defaultdict(dict)
    if key and store is not None:
        for doc in store.structures.run_candidates(
            run["_id"], ["chemical_system", f"scores.{key}"]
        ):
            scores = doc.scores.get(key)
            if not scores:
                continue
            for which, inside in (("candidates", True), ("evaluation set", doc.id in evaluation),
                                  ("picks", doc.id in picks)):  # fmt: skip
                if inside:
                    predicted[doc.chemical_system].setdefault(which, S.Predicted()).add(scores)
    labelled: dict[str, dict[str, S.LabelValues]] = defaultdict(dict)
    lot_hash = label.get("lot_hash")
    if lot_hash and (picks or evaluation) and store is not None:
        for doc in store.labels.find({"structure_id": {"$in": sorted(picks | evaluation)},
                                      "lot_hash": lot_hash}, LABEL_FIELDS):  # fmt: skip
            which = "evaluation set" if doc.structure_id in evaluation else "picks"
            labelled[doc.chemical_system].setdefault(which, S.LabelValues()).add(doc)
    scorer = S.describe_model(score.get("model") or {})
    reference = (
        (label.get("level_of_theory") or {}).get("code") or label.get("labeller") or "reference"
    )
    distributions = S.distribution_blocks(predicted, labelled, scorer, f"reference {reference}",
                                          place, "distribution")  # fmt: skip
    if distributions:
        section.add(Section("Distributions: candidates, picks and the evaluation set",
                            level=3).add(*distributions))  # fmt: skip

    selected = select.get("selected", [])
    if selected:
        systems = (store.structures.chemical_systems([s["id"] for s in selected])
                   if store is not None else {})  # fmt: skip
        by_system = Counter(systems.values())
        section.add(Details(
            f"The {len(selected)} picks ({', '.join(f'{s} {n}' for s, n in sorted(by_system.items()))}) "
            f"and why ({(select.get('selector') or {}).get('name', '?')} selector)",
            [Table(["structure", "system", "rank", "why"],
                   [[s["id"][:12], systems.get(s["id"], ""), s["rank"], s["reason"]]
                    for s in selected])]))  # fmt: skip
    split = stages.get("split") or {}
    if split:
        section.add(Table(["system", "train", "validation", "held out", "evaluation set"],
                          [[system, len(roles.get("train", [])), len(roles.get("validation", [])),
                            len(roles.get("holdout", [])), len(members.get(system, []))]
                           for system, roles in sorted(split.items())],
                          caption="labels per role"))  # fmt: skip
    return section
