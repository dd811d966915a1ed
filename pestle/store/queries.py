"""Filters for ``pestle query`` and ``pestle export``: the questions a user asks of the store
(which elements, which system, which sampler, labelled or not, energy and force ranges), as
MongoDB filters on the ``structures`` or ``labels`` collection."""

from __future__ import annotations

import json
import re
from typing import Any

from pestle.store.client import Store


def normalise_system(system: str) -> str:
    """``Li-F``, ``F-Li`` or ``LiF``-style element lists -> pestle's sorted ``F-Li``."""
    elements = [e for e in re.split(r"[-,\s]+", system.strip()) if e]
    if len(elements) == 1 and len(re.findall(r"[A-Z][a-z]?", elements[0])) > 1:
        elements = re.findall(r"[A-Z][a-z]?", elements[0])
    return "-".join(sorted(set(elements)))


def _range(low: float | None, high: float | None) -> dict[str, float] | None:
    if low is None and high is None:
        return None
    if low is not None and high is not None and low > high:
        raise ValueError(f"empty range: minimum {low} is above maximum {high}")
    return {
        **({"$gte": low} if low is not None else {}),
        **({"$lte": high} if high is not None else {}),
    }


def build_filter(
    store: Store,
    collection: str,
    base: dict[str, Any] | None = None,
    *,
    elements: list[str] | None = None,
    system: str | None = None,
    formula: str | None = None,
    sampler: str | None = None,
    labelled: bool | None = None,
    energy_min: float | None = None,
    energy_max: float | None = None,
    force_min: float | None = None,
    force_max: float | None = None,
) -> dict[str, Any]:
    """``base`` (any MongoDB filter) AND the named conditions.

    ``elements``: contains all of them; ``system``: exactly this chemical system; energies
    are per atom (eV/atom) and forces the largest per-atom force norm (eV/Å) of the label;
    ``labelled`` (structures only): has at least one label, or none."""
    if collection not in ("structures", "labels"):
        raise ValueError("these filters apply to the structures and labels collections")
    clauses: list[dict[str, Any]] = [base] if base else []
    if elements:
        # The chemical system's elements are dash-separated and sorted: one pattern asks for
        # all of them. Structures also list their elements: the first one is looked up by
        # that field's index (labels carry only the system).
        rest = elements[1:] if collection == "structures" else elements
        if collection == "structures":
            clauses.append({"elements": elements[0]})
        if rest:
            pattern = "^" + "".join(f"(?=(.*-)?{re.escape(e)}(-|$))" for e in rest)
            clauses.append({"chemical_system": {"$regex": pattern}})
    if system:
        clauses.append({"chemical_system": normalise_system(system)})
    if formula:
        from pymatgen.core import Composition

        clauses.append({"formula": Composition(formula).reduced_formula})
    if sampler:
        clauses.append({"provenance.sampler" if collection == "structures" else "sampler": sampler})
    energy = _range(energy_min, energy_max)
    force = _range(force_min, force_max)
    if collection == "labels":
        if energy:
            clauses.append({"energy_per_atom": energy})
        if force:
            clauses.append({"max_force": force})
        if labelled is not None:
            raise ValueError("--labelled/--unlabelled filter structures, not labels")
    else:
        label_conditions = {}
        if energy:
            label_conditions["energy_per_atom"] = energy
        if force:
            label_conditions["max_force"] = force
        if label_conditions or labelled is not None:
            ids = store.labels.distinct_structure_ids(label_conditions)
            wants = labelled if labelled is not None else True
            clauses.append({"_id": {"$in" if wants else "$nin": ids}})
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def parse_query(terms: list[str]) -> dict[str, Any]:
    """A MongoDB filter from a JSON document or ``key=value`` terms (numbers and booleans
    are typed; ``key>v``, ``key>=v``, ``key<v``, ``key<=v``, ``key!=v`` compare)."""
    if len(terms) == 1 and terms[0].lstrip().startswith("{"):
        try:
            query = json.loads(terms[0])
        except json.JSONDecodeError as exc:
            raise ValueError(f"query {terms[0]!r} is not valid JSON: {exc}") from None
        if not isinstance(query, dict):
            raise ValueError("a JSON query must be an object")
        return query
    query: dict[str, Any] = {}
    for term in terms:
        for op, mongo in (
            (">=", "$gte"),
            ("<=", "$lte"),
            ("!=", "$ne"),
            (">", "$gt"),
            ("<", "$lt"),
            ("=", None),
        ):
            if op in term:
                key, value = term.split(op, 1)
                key = key.strip()
                if not key:
                    raise ValueError(f"query term {term!r} has no field name")
                typed = _typed(value.strip())
                query[key] = typed if mongo is None else {**query.get(key, {}), mongo: typed}
                break
        else:
            raise ValueError(f"query term {term!r} is not key=value (or a JSON filter)")
    return query


def _typed(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    if value in ("null", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value
