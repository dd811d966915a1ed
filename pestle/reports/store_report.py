"""The store's report (``pestle report``): what the campaigns of one store did, drawn only from
stored documents (and the PNG files their runs wrote, copied beside the report).

Headed by the campaigns, the store (password masked), the date, the levels of theory and the
code versions. Sections: softening per chemical system across model versions on the
evaluation set (points with structure-level intervals); softening against the number of
labels; the latest evaluation's parity, force-error and softening-by-force plots per system;
learning curves of the latest model versions; the dataset (growth, labels per role,
distributions of candidates against picks and the evaluation set); reference-calculation cost
per label; job throughput and failures; the daemon's decisions with their figures and
intervals; promoted models; convergence and equation-of-state checks when recorded.

Written as HTML (PNG files under ``figures/`` beside it) or Markdown.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pestle.evaluation.intervals import Difference, Estimate, format_difference, format_estimate
from pestle.reports import figures as F
from pestle.reports import sections as S
from pestle.reports.document import Code, Document, Section, Table, Text
from pestle.store import Store

# Model versions drawn in the softening-across-versions plot and learning curves (the rest
# are in the tables).
MAX_VERSIONS_PLOTTED = 6
MAX_LEARNING_CURVES = 4
MAX_DECISIONS_LISTED = 60


def softening_history(store: Store) -> list[dict[str, Any]]:
    """Softening scales on the evaluation set in the order they were measured: one row per
    (model, system, run), from campaign runs (pretrained and fine-tuned) and daemon
    retrainings (incumbent and candidate on the same structures), with structure-level
    intervals (``estimate``) and the force MAE."""
    from pestle.evaluation.evaluate import stored_softening

    outcomes = {d.model_dump().get("run_id"): d.model_dump().get("outcome")
                for d in store.decisions.find("retrain")}  # fmt: skip
    ever_promoted = {m.id for m in store.models.all() if m.promotions}
    rows: list[dict[str, Any]] = []
    for run in store.runs.with_stage("evaluate"):
        evaluate = run.stages["evaluate"]
        stored = (evaluate.get("evaluation_set") or {}).get("evaluation")
        if not stored:
            continue
        model_id = (run.stages.get("finetune") or {}).get("model_id")
        labels = evaluate.get("labels") or {}
        for name in stored.get("models", []):
            if name in ("fine-tuned", "candidate"):
                mid = model_id
            elif name == "incumbent" and str(labels.get(name, "")).startswith("model-"):
                mid = labels[name]
            else:
                mid = None
            model = S.short_model(mid) if mid else "pretrained"
            if mid in ever_promoted:
                model += " (promoted)"
            for system, estimate in stored_softening(stored, model=name).items():
                figures = stored["levels"]["chemical_system"][system]["models"][name]
                rows.append({"at": S.utc(run.started_at), "run": run.id, "campaign": run.campaign,
                             "model": model, "model_id": mid, "system": system,
                             "estimate": estimate,
                             "force_mae": Estimate.from_dict(figures["force_mae"])
                             if figures.get("force_mae") else None,
                             "outcome": outcomes.get(run.id) if name == "candidate" else None})  # fmt: skip
    earliest = datetime.min.replace(tzinfo=timezone.utc)
    rows.sort(key=lambda r: r["at"] or earliest)
    return rows


def _softening_points(rows: list[dict[str, Any]]) -> dict[str, dict[str, Estimate]]:
    """``{system: {model: latest Estimate}}`` for at most ``MAX_VERSIONS_PLOTTED`` model
    versions (pretrained, promoted ones and the latest others), in measurement order."""
    order: list[str] = []
    for row in rows:
        if row["model"] not in order:
            order.append(row["model"])
    keep = [m for m in order if m == "pretrained" or "(promoted)" in m]
    for model in reversed(order):
        if len(keep) >= MAX_VERSIONS_PLOTTED:
            break
        if model not in keep:
            keep.append(model)
    keep.sort(key=order.index)
    points: dict[str, dict[str, Estimate]] = defaultdict(dict)
    for row in rows:
        if row["model"] in keep:
            points[row["system"]][row["model"]] = row["estimate"]  # the latest wins
    return {system: {m: per[m] for m in keep if m in per} for system, per in sorted(points.items())}


def write_store_report(store: Store, work_dir: Path, out: Path, fmt: str = "html") -> Path:
    """The store's report in ``out`` (``report.html`` or ``report.md``, figures under
    ``out/figures``). ``work_dir``: where the runs' folders are (their plots are copied)."""
    if fmt not in ("html", "md"):
        raise ValueError(f"report format must be html or md, not {fmt!r}")
    out = Path(out)
    doc = build_store_report(store, Path(work_dir), out)
    return doc.write(out / f"report.{fmt}", fmt)


def build_store_report(store: Store, work_dir: Path, out: Path) -> Document:
    place = S.Place(out, out / "figures")
    runs = store.runs.with_stage("seed") + [r for r in store.runs.with_stage("split")
                                            if "seed" not in r.stages]  # fmt: skip
    runs.sort(key=lambda r: S.utc(r.started_at) or datetime.min.replace(tzinfo=timezone.utc))
    campaigns = Counter(r.campaign for r in runs if r.campaign)
    for decision in store.decisions.find():
        if decision.campaign and decision.campaign not in campaigns:
            campaigns[decision.campaign] = 0
    label_docs = list(store.labels.find({}, ["chemical_system", "sampler", "created_at", "role",
                                             "lot_hash", "level_of_theory", "labeller", "extra",
                                             "natoms", "energy_per_atom", "max_force", "stress",
                                             "structure_id"]))  # fmt: skip
    lots: dict[str, tuple[dict[str, Any], int]] = {}
    for label in label_docs:
        lot, n = lots.get(label.lot_hash, (label.level_of_theory, 0))
        lots[label.lot_hash] = (lot, n + 1)
    latest = runs[-1] if runs else None
    counts = store.counts()
    names = ", ".join(sorted(campaigns)) or "none yet"
    plural = "campaigns" if len(campaigns) > 1 else "campaign"
    first = S.utc(runs[0].started_at) if runs else None
    doc = Document(
        title=f"pestle store report — {plural} {names}",
        subtitle="every campaign run, model version, label, job and decision of one store",
        meta=[
            ("campaigns", ", ".join(f"{c} ({n} runs)" for c, n in sorted(campaigns.items()))
             or "none yet"),
            ("date", f"report written {S.when(datetime.now(timezone.utc))}"
                     + (f"; runs from {S.when(first)} to {S.when(S.utc(latest.started_at))}"
                        if latest else "")),
            ("store", f"{store.uri_masked} · database {store.database}"),
            ("level of theory", "; ".join(f"{S.describe_level_of_theory(lot)} ({n} labels)"
                                          for lot, n in lots.values()) or "no labels yet"),
            ("contents", ", ".join(f"{n} {k}" for k, n in counts.items())),
            ("code versions", S.describe_versions(latest.code_versions) + " (latest run)"
             if latest else S.describe_versions(_own_versions())),
        ],
    )  # fmt: skip

    # -- softening across model versions ------------------------------------------------------
    rows = softening_history(store)
    softening = Section("Softening per chemical system across model versions", anchor="softening")
    softening.add(Text(
        "Each model version's softening scale on its campaign's evaluation set (drawn at random "
        "from every valid candidate, never trained on), with its 95% structure-level interval; "
        "1 = no softening. A model measured more than once shows its latest measurement; "
        "hollow points: too few structures for an interval."
    ))  # fmt: skip
    if rows:
        path = F.versions_plot(_softening_points(rows), place.path("softening-by-model.png"),
                               "softening scale per chemical system and model version")  # fmt: skip
        softening.add(place.figure(path, "Softening scale on the evaluation set per chemical "
                                   "system, one point per model version (up to "
                                   f"{MAX_VERSIONS_PLOTTED}: pretrained, promoted and the "
                                   "latest), 95% structure-level intervals.", wide=True))  # fmt: skip
        latest_rows = {}
        for row in rows:
            latest_rows[(row["model"], row["system"])] = row
        softening.add(Table(
            ["system", "model", "measured", "run", "softening scale [95% CI]",
             "force MAE eV/Å [95% CI]", "structures"],
            [[r["system"], r["model"], S.when(r["at"]), r["run"], format_estimate(r["estimate"]),
              format_estimate(r["force_mae"]) if r["force_mae"] else "–",
              r["estimate"].n_structures]
             for r in sorted(latest_rows.values(), key=lambda r: (r["system"], r["at"] or 0))],
            caption="latest measurement of each model version per system"))  # fmt: skip
    else:
        softening.add(Text("No run has evaluated a model on an evaluation set yet.", "note"))
    doc.sections.append(softening)

    labels_section = Section("Softening against the number of labels", anchor="labels")
    labels_section.add(*S.softening_vs_labels_blocks(S.softening_vs_labels(store), place,
                                                     "softening-vs-labels"))  # fmt: skip
    doc.sections.append(labels_section)

    # -- the latest evaluation's plots ----------------------------------------------------------
    accuracy = Section("Accuracy per chemical system: the latest evaluation", anchor="accuracy")
    shown = _latest_plots(store, work_dir, place)
    accuracy.add(*(shown or [Text("No run has written evaluation plots yet.", "note")]))
    doc.sections.append(accuracy)

    # -- fine-tuning -------------------------------------------------------------------------------
    models = sorted(
        store.models.all(),
        key=lambda m: S.utc(m.created_at) or datetime.min.replace(tzinfo=timezone.utc),
    )
    tuning = Section("Fine-tuning: learning curves", anchor="finetune")
    if models:
        recent = models[-MAX_LEARNING_CURVES:]
        if len(models) > len(recent):
            tuning.add(Text(f"The latest {len(recent)} of {len(models)} model versions."))
        tuning.add(*S.learning_curves_blocks(recent, place, "learning-curves"))
    else:
        tuning.add(Text("No model version has been trained yet.", "note"))
    doc.sections.append(tuning)

    # -- dataset -------------------------------------------------------------------------------------
    doc.sections.append(_dataset_section(store, runs, label_docs, place))
    cost = Section("Reference-calculation cost per label", anchor="cost")
    cost.add(*S.cost_blocks(label_docs, place, "cost-per-label"))
    doc.sections.append(cost)
    doc.sections.append(_jobs_section(store, place))
    doc.sections.append(_decisions_section(store, place))
    doc.sections.append(_promoted_section(store, rows))

    checks = _checks(runs, place)
    if checks:
        doc.sections += checks

    appendix = Section("Levels of theory and code versions", anchor="appendix")
    for lot_hash, (lot, n) in lots.items():
        appendix.add(Text(f"Level of theory {lot_hash} ({n} labels):"),
                     Code(json.dumps(lot, indent=2, default=str)))  # fmt: skip
    versions = latest.code_versions if latest else {}
    appendix.add(Table(["package", "latest run", "this report"],
                       [[k, versions.get(k, ""), v] for k, v in _own_versions().items()]))  # fmt: skip
    doc.sections.append(appendix)
    return doc


def _own_versions() -> dict[str, str]:
    from pestle.provenance import code_versions

    return code_versions()


def _latest_plots(store: Store, work_dir: Path, place: S.Place) -> list[Any]:
    """The evaluate stage's plots of the latest run per campaign whose files are still in
    ``work_dir`` (copied beside the report)."""
    blocks: list[Any] = []
    seen: set[str] = set()
    for run in reversed(store.runs.with_stage("evaluate")):
        if run.campaign in seen:
            continue
        entry = run.stages["evaluate"].get("evaluation_set") or {}
        plots = entry.get("plots") or {}
        run_dir = Path(work_dir) / "runs" / run.id
        if not plots or not run_dir.is_dir():
            continue
        seen.add(run.campaign)
        labels = run.stages["evaluate"].get("labels") or {}
        names = {name: S.short_model(str(label)) for name, label in labels.items()}
        prefix = f"{S.slug(run.id)}-"
        blocks.append(Section(f"Campaign {run.campaign}", level=3).add(
            Text(f"Run {run.id} ({S.when(S.utc(run.started_at))}) on its evaluation set: "
                 + ", ".join(f"{name} = {label}" for name, label in labels.items()) + "."),
            *S.evaluation_summary("evaluation_set", entry, names, place, primary=True,
                                  prefix=prefix),
            *S.per_system_plots("evaluation_set", entry, place, run_dir, prefix=prefix, level=4),
        ))  # fmt: skip
    return blocks


def _dataset_section(
    store: Store, runs: list[Any], label_docs: list[Any], place: S.Place
) -> Section:
    section = Section("Dataset", anchor="dataset")
    times: dict[str, list[datetime]] = defaultdict(list)
    per_sampler: dict[str, Counter] = defaultdict(Counter)
    roles: dict[str, Counter] = defaultdict(Counter)
    for label in label_docs:
        if label.created_at is not None:
            times[label.chemical_system].append(label.created_at)
        per_sampler[label.chemical_system][label.sampler or "seed"] += 1
        roles[label.chemical_system][label.role or "none yet"] += 1
    if not label_docs:
        return section.add(Text("No labels yet.", "note"))
    path = F.growth_plot(times, per_sampler, place.path("dataset-growth.png"))
    section.add(place.figure(path, "Labels stored over time per chemical system (left) and per "
                             "system and sampler (right).", wide=True))  # fmt: skip
    role_names = ["train", "validation", "holdout", "evaluation", "none yet"]
    section.add(Table(["system", *role_names, "total"],
                      [[s, *[roles[s].get(r, 0) for r in role_names], sum(roles[s].values())]
                       for s in sorted(roles)],
                      caption="labels per role (holdout: held-out picks; evaluation: the random "
                              "evaluation set)"))  # fmt: skip

    # Distributions: the scoring model that scored most candidates; picks = labels trained on
    # or held out (score-selected), evaluation = the random evaluation set.
    key_counts: Counter = Counter()
    describe: dict[str, str] = {}
    for run in runs:
        score = run.stages.get("score") or {}
        if score.get("model_key"):
            key_counts[score["model_key"]] += int(score.get("scored") or 0) or 1
            describe[score["model_key"]] = S.describe_model(score.get("model") or {})
    predicted: dict[str, dict[str, S.Predicted]] = defaultdict(dict)
    by_structure = {label.structure_id: label for label in label_docs}
    if key_counts:
        key = key_counts.most_common(1)[0][0]
        for doc in store.structures.find({"kind": "candidate"},
                                         ["chemical_system", f"scores.{key}"]):  # fmt: skip
            scores = doc.scores.get(key)
            if not scores:
                continue
            predicted[doc.chemical_system].setdefault("candidates", S.Predicted()).add(scores)
            label = by_structure.get(doc.id)
            if label is not None and label.role:
                which = "evaluation set" if label.role == "evaluation" else "picks"
                predicted[doc.chemical_system].setdefault(which, S.Predicted()).add(scores)
        scorer = describe.get(key, "the scoring model")
    else:
        scorer = "the scoring model"
    labelled: dict[str, dict[str, S.LabelValues]] = defaultdict(dict)
    codes = set()
    for label in label_docs:
        if label.role:
            which = "evaluation set" if label.role == "evaluation" else "picks"
            labelled[label.chemical_system].setdefault(which, S.LabelValues()).add(label)
            codes.add(str(label.level_of_theory.get("code", label.labeller)))
    reference = "reference " + ("/".join(sorted(codes)) or "labels")
    section.add(Section("Distributions: candidates, picks and the evaluation set", level=3).add(
        Text("Picks: labels selected by score (trained on, validation or held out); evaluation "
             "set: labels of the random draw. Labels without a role yet are left out."),
        *S.distribution_blocks(predicted, labelled, scorer, reference, place, "distribution")))  # fmt: skip
    return section


def _jobs_section(store: Store, place: S.Place) -> Section:
    section = Section("Jobs: throughput and failures", anchor="jobs")
    jobs = [job for job in store.jobs.finished() if job.finished_at is not None]
    states = store.jobs.counts()
    section.add(Table(["state", "jobs"], [[k, v] for k, v in sorted(states.items())]))
    if not jobs:
        return section.add(Text("No job has finished yet.", "note"))
    failures = Counter((job.error or "unknown").splitlines()[0][:120]
                       for job in jobs if job.state == "failed")  # fmt: skip
    path = F.jobs_plot([(job.finished_at, job.state) for job in jobs], dict(failures),
                       place.path("jobs.png"))  # fmt: skip
    caption = "Jobs finished per time bin, by final state"
    caption += "; right: failed jobs per error." if len(failures) >= 2 else "."
    section.add(place.figure(path, caption, wide=True))
    if failures:
        section.add(Table(["error (first line)", "failed jobs"], failures.most_common(20)))
    else:
        section.add(Text(f"No job failed ({len(jobs)} finished)."))
    return section


def _decision_figures(d: dict[str, Any]) -> str:
    """The figures a decision rests on, with their intervals."""
    parts = []
    if isinstance(d.get("difference"), dict):
        diff = Difference.from_dict(d["difference"])
        parts.append(f"{d.get('metric', diff.metric)} candidate − incumbent "
                     f"{format_difference(diff, digits=4)}")  # fmt: skip
    for system, value in (d.get("regressions") or {}).items():
        parts.append(f"{system} worse: {format_difference(Difference.from_dict(value), digits=4)}")
    # The per-system non-regression check: each system's paired force MAE change.
    per_system = ((d.get("evaluation") or {}).get("levels") or {}).get("chemical_system") or {}
    checks = []
    for system, group in per_system.items():
        paired = (group.get("paired") or {}).get("candidate", {}).get("force_mae")
        if isinstance(paired, dict):
            checks.append(f"{system} {format_difference(Difference.from_dict(paired), digits=4)}")
    if checks:
        parts.append("force MAE per system: " + ", ".join(checks))
    if isinstance(d.get("softening"), dict):
        parts.append(f"softening {format_estimate(Estimate.from_dict(d['softening']))}")
    if d.get("committee_force") is not None:
        parts.append(f"committee spread {d['committee_force']:.3f} eV/Å")
    for key in ("queued", "withdrawn", "n_labels"):
        if d.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {d[key]}")
    return "; ".join(parts)


def _decisions_section(store: Store, place: S.Place) -> Section:
    section = Section("Daemon decisions", anchor="decisions")
    decisions = [d.model_dump() for d in store.decisions.find()]
    if not decisions:
        return section.add(Text("No daemon decisions: this store has seen only campaign runs."))
    retrains = [
        d for d in decisions if d["kind"] == "retrain" and isinstance(d.get("difference"), dict)
    ]
    by_metric: dict[str, list[F.DecisionPoint]] = defaultdict(list)
    for d in retrains:
        diff = Difference.from_dict(d["difference"])
        label = (
            f"{d['at']:%m-%d %H:%M}\n{S.short_model(d.get('model_id'))}"
            if d.get("at")
            else S.short_model(d.get("model_id"))
        )
        by_metric[d.get("metric") or diff.metric].append(F.DecisionPoint(
            label, diff.value, diff.low, diff.high, d.get("outcome", "?"), diff.enough,
            diff.n_structures))  # fmt: skip
    for metric, points in by_metric.items():
        unit = " (eV/Å)" if metric == "force_mae" else ""
        path = F.decisions_plot(points, place.path(f"decisions-{S.slug(metric)}.png"),
                                f"{metric}{unit}")  # fmt: skip
        section.add(place.figure(path, f"Each retraining's paired change of {metric} (candidate − "
                                 "the model it would replace, on the same evaluation-set "
                                 "structures) with its 95% structure-level interval; below 0 the "
                                 "candidate is better; colour: the outcome.", wide=True))  # fmt: skip
    finished = [d for d in decisions if d["kind"] == "finished"]
    if finished:
        section.add(Table(["at", "campaign", "system", "model", "softening [95% CI]", "reason"],
                          [[S.when(d.get("at")), d.get("campaign"), d.get("chemical_system"),
                            S.short_model(d.get("model_id")) or "pretrained",
                            format_estimate(Estimate.from_dict(d["softening"]))
                            if isinstance(d.get("softening"), dict) else "", d.get("reason")]
                           for d in finished], caption="systems finished"))  # fmt: skip
    listed = decisions[::-1][:MAX_DECISIONS_LISTED]
    section.add(Table(
        ["at", "campaign", "kind", "outcome", "model", "figures [95% CI]", "reason"],
        [[S.when(d.get("at")), d.get("campaign"), d["kind"], d.get("outcome", ""),
          S.short_model(d.get("model_id")), _decision_figures(d), d.get("reason", "")]
         for d in listed],
        caption=f"every decision, newest first (the latest {len(listed)} of {len(decisions)})"))  # fmt: skip
    return section


def _promoted_section(store: Store, rows: list[dict[str, Any]]) -> Section:
    section = Section("Promoted models", anchor="promoted")
    promoted = store.models.promoted_all()
    if not promoted:
        return section.add(Text("No model has been promoted: the pretrained model is current."))
    table = []
    for p in promoted:
        softening = "; ".join(
            f"{r['system']} {format_estimate(r['estimate'])}"
            for r in {r["system"]: r for r in rows if r["model_id"] == p["model_id"]}.values()
        )  # fmt: skip
        table.append([p.get("family"), p.get("model_id"), S.when(p.get("at")),
                      S.short_model(p.get("previous")) or "pretrained", p.get("reason", ""),
                      softening or "not measured"])  # fmt: skip
    return section.add(Table(["family", "model", "since", "replaced", "why",
                              "softening on the evaluation set [95% CI]"], table))  # fmt: skip


def _checks(runs: list[Any], place: S.Place) -> list[Section]:
    """The latest convergence and equation-of-state records per campaign (when recorded)."""
    out = []
    latest: dict[tuple[str, str], Any] = {}
    for run in runs:
        for stage in ("convergence", "eos"):
            if run.stages.get(stage):
                latest[(stage, run.campaign or "?")] = run
    for stage, title in (("convergence", "Label convergence"), ("eos", "Equation of state")):
        blocks: list[Any] = []
        for (kind, campaign), run in sorted(latest.items()):
            if kind != stage:
                continue
            blocks.append(Text(f"Campaign {campaign}, run {run.id}:"))
            if stage == "convergence":
                blocks += S.convergence_blocks(run.stages[stage])
            else:
                blocks += S.eos_blocks(run.stages[stage], place, f"eos-{S.slug(campaign)}")
        if blocks:
            out.append(Section(title, anchor=stage).add(*blocks))
    return out


__all__ = ["build_store_report", "softening_history", "write_store_report"]
