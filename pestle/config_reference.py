"""``docs/config.md``: the campaign config reference, generated from the JSON Schema of the
pydantic models (``pestle.config.config_schema``), so it cannot drift from what pestle
accepts. ``pestle config docs -o docs/config.md`` writes it; a test checks it is current."""

from __future__ import annotations

import json
from typing import Any

HEADER = """# Campaign configuration reference

Generated from the pydantic models in `pestle/config.py` by
`pestle config docs -o docs/config.md`: do not edit by hand. `pestle config schema` prints the
same as JSON Schema (for editors), `pestle config validate FILE` checks a file.

Unknown keys are errors. Relative paths (`work_dir`, `seeds[].file`, `store.uri_file`, the
`dask.tls_*` files, and path-valued plugin params such as a potential's `checkpoint`) are
relative to the config file. Plugin sections (`samplers[]`, `potential`, `scoring.committee[]`,
`selection.selector`, `labeller`, `finetune.trainer`) are `{name, params}`: `pestle plugins`
lists every name with its params, defaults and descriptions.
"""


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def _constraints(prop: dict[str, Any]) -> str:
    out = []
    for key, symbol in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                        ("exclusiveMaximum", "<"), ("minItems", "items ≥")):  # fmt: skip
        if key in prop:
            out.append(f"{symbol} {prop[key]}")
    return f" ({', '.join(out)})" if out else ""


def _type(prop: dict[str, Any], titles: dict[str, str]) -> str:
    if "$ref" in prop:
        name = _ref_name(prop["$ref"])
        return f"[{titles[name]}](#{_anchor(titles[name])})"
    if "anyOf" in prop:
        kinds = [p for p in prop["anyOf"] if p.get("type") != "null"]
        text = " or ".join(_type(p, titles) for p in kinds)
        return text + (" or null" if len(kinds) < len(prop["anyOf"]) else "")
    if "enum" in prop:
        return " \\| ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    kind = prop.get("type")
    if kind == "array":
        if "prefixItems" in prop:
            return "[" + ", ".join(_type(p, titles) for p in prop["prefixItems"]) + "]"
        return f"list of {_type(prop.get('items', {}), titles)}" + _constraints(prop)
    if kind == "object":
        values = prop.get("additionalProperties")
        if isinstance(values, dict) and values:
            return f"mapping to {_type(values, titles)}"
        return "mapping"
    if kind == "string" and prop.get("format") == "path":
        return "path"
    return (kind or "any") + _constraints(prop)


def _default(name: str, prop: dict[str, Any], required: list[str], models: set[str]) -> str:
    if name in required:
        return "required"
    if "default" not in prop:
        return ""
    value = prop["default"]
    if "$ref" in prop and _ref_name(prop["$ref"]) in models and isinstance(value, dict):
        return "its defaults"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _clean(text: str) -> str:
    return " ".join(text.replace("``", "`").split()).replace("|", "\\|")


def markdown_reference(schema: dict[str, Any]) -> str:
    """The reference as markdown: one table per section, in the order a config reads."""
    defs = schema.get("$defs", {})
    models = {name for name, d in defs.items() if name != "PluginSpec"}
    # Sections named by where they sit in a config: "seeds[]", "dask.jobqueue".
    titles: dict[str, str] = {"PluginSpec": "plugin: {name, params}"}
    order: list[tuple[str, dict[str, Any]]] = [("top level", schema)]

    def walk(node: dict[str, Any], path: str) -> None:
        for key, prop in node.get("properties", {}).items():
            for ref, suffix in _refs(prop):
                name = _ref_name(ref)
                if name in titles:
                    continue
                titles[name] = f"{path}{key}{suffix}"
                order.append((titles[name], defs[name]))
                walk(defs[name], f"{titles[name]}.")

    walk(schema, "")
    order.append((titles["PluginSpec"], defs["PluginSpec"]))
    lines = [HEADER]
    for title, node in order:
        lines.append(f"## {title}\n")
        if node.get("description"):
            lines.append(_clean(node["description"]) + "\n")
        lines.append("| key | type | default | description |")
        lines.append("|---|---|---|---|")
        required = node.get("required", [])
        for key, prop in node.get("properties", {}).items():
            lines.append(
                f"| `{key}` | {_type(prop, titles)} | {_default(key, prop, required, models)} "
                f"| {_clean(prop.get('description', ''))} |"
            )
        lines.append("")
    return "\n".join(lines)


def _refs(prop: dict[str, Any]) -> list[tuple[str, str]]:
    """($ref, suffix) of the models a property holds: itself, a list of them, or optional."""
    if "$ref" in prop:
        return [(prop["$ref"], "")]
    found = []
    for option in prop.get("anyOf", []):
        found += _refs(option)
    if prop.get("type") == "array" and isinstance(prop.get("items"), dict):
        found += [(ref, suffix + "[]") for ref, suffix in _refs(prop["items"])]
    return found
