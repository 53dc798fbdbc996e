"""The configuration reference (docs/config.md), generated from the pydantic models.

Walks each model's JSON schema generically: nested sections, optional sections
(``X | None``), discriminated unions (one block of keys per variant), mappings and
lists. Nothing here names a config key: a field added to a model, or an options model
moved elsewhere and composed into the config, appears in the reference with its type,
default, constraints and ``Field(description=...)``.

    syncbench config --schema run          # JSON Schema of a run config
    syncbench config --reference > docs/config.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from syncbench.experiments.config import RunConfig
from syncbench.strategies.registry import OPTIONS, has_own_section
from syncbench.sweeps.spec import SweepSpec

REGENERATE = "syncbench config --reference > docs/config.md"


def models() -> dict[str, Any]:
    """The documented models: the run config and the sweep spec."""
    return {"run": RunConfig, "sweep": SweepSpec}


def json_schema(kind: str) -> dict[str, Any]:
    return models()[kind].model_json_schema()


@dataclass
class Row:
    key: str
    type: str
    default: str
    meaning: str


class _Walker:
    def __init__(self, schema: dict[str, Any]):
        self.defs = schema.get("$defs", {})
        self.rows: list[Row] = []
        self.undocumented: list[str] = []

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            ref = node["$ref"].rsplit("/", 1)[-1]
            extra = {k: v for k, v in node.items() if k != "$ref"}
            node = {**self.defs[ref], **extra}
        return node

    # ---- types ---------------------------------------------------------------------------
    def options(self, node: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """The alternatives of a field (after $ref) and whether null is one of them."""
        node = self.resolve(node)
        alts = node.get("anyOf") or node.get("oneOf")
        if not alts:
            return [node], False
        out, nullable = [], False
        for alt in alts:
            alt = self.resolve(alt)
            if alt.get("type") == "null":
                nullable = True
            else:
                out.append(alt)
        return out, nullable

    def type_name(self, node: dict[str, Any]) -> str:
        node = self.resolve(node)
        if "const" in node:
            return f"`{_yaml(node['const'])}`"
        if "enum" in node:
            return " \\| ".join(f"`{_yaml(v)}`" for v in node["enum"])
        if "anyOf" in node or "oneOf" in node:
            alts, nullable = self.options(node)
            names = [self.type_name(a) for a in alts] + (["null"] if nullable else [])
            return " or ".join(dict.fromkeys(names))
        kind = node.get("type")
        if kind == "object" and "properties" in node:
            return "section"
        if kind == "object":
            values = node.get("additionalProperties")
            if isinstance(values, dict) and values:
                return f"mapping of {self.type_name(values)}"
            return "mapping"
        if kind == "array":
            items = node.get("items")
            if not items:
                return "list"
            inner = self.type_name(items)
            return f"list of ({inner})" if " or " in inner else f"list of {inner}"
        base = {"number": "number", "integer": "integer", "string": "string", "boolean": "boolean"}.get(kind, "any")
        return base + _constraints(node)

    # ---- rows ----------------------------------------------------------------------------
    def model(self, node: dict[str, Any], prefix: str, note: str = "") -> None:
        node = self.resolve(node)
        required = set(node.get("required", []))
        for name, field in node.get("properties", {}).items():
            self.field(f"{prefix}{name}", field, name in required, note)

    def field(self, key: str, field: dict[str, Any], required: bool, note: str) -> None:
        description = field.get("description") or ""
        resolved = self.resolve(field)
        alts, nullable = self.options(field)
        default = "required" if required else (f"`{_yaml(field['default'])}`" if "default" in field else "")
        if not description:
            self.undocumented.append(key)
        discriminator = resolved.get("discriminator")
        sections = [a for a in alts if a.get("type") == "object" and "properties" in a]
        if discriminator and len(sections) == len(alts):
            tag = discriminator["propertyName"]
            variants = [self.resolve(a)["properties"][tag].get("const") for a in sections]
            type_ = f"one of, by `{tag}`: " + ", ".join(f"`{_yaml(v)}`" for v in variants)
            if not default and not required:
                default = self._variant_default(sections, tag)
            self.rows.append(Row(key, type_, default, _join(note, description)))
            for alt, variant in zip(sections, variants):
                first = len(self.rows)
                self.model(alt, key + ".", f"with `{tag}: {_yaml(variant)}`")
                for row in self.rows[first:]:  # the variant's own docstring goes on its tag's row
                    if row.key == f"{key}.{tag}" and alt.get("description"):
                        row.meaning = _join(row.meaning, alt["description"])
            return
        if len(sections) == 1 and len(alts) == 1:
            section = sections[0]
            type_ = "section or null" if nullable else "section"
            meaning = _join(note, description or section.get("description", ""))
            if description == "" and section.get("description"):
                self.undocumented.remove(key)
            self.rows.append(Row(key, type_, default or ("" if required else "see keys below"), meaning))
            self.model(section, key + ".", note)
            return
        values = resolved.get("additionalProperties")
        if resolved.get("type") == "object" and isinstance(values, dict):
            value_sections = [a for a in self.options(values)[0] if a.get("type") == "object" and "properties" in a]
            if value_sections:
                self.rows.append(Row(key, "mapping of KEY to a section", default or "`{}`", _join(note, description)))
                self.model(value_sections[0], key + ".KEY.", note)
                return
        if not default and not required:
            default = {"mapping": "`{}`", "list": "`[]`"}.get(self.type_name(field).split(" ")[0], "")
        self.rows.append(Row(key, self.type_name(field), default, _join(note, description)))

    def _variant_default(self, sections: list[dict[str, Any]], tag: str) -> str:
        for alt in sections:  # the variant whose tag has a default is what an absent key means
            prop = alt["properties"][tag]
            if "default" in prop:
                return f"`{{{tag}: {_yaml(prop['default'])}}}`"
        return ""


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    for key, symbol in (("exclusiveMinimum", ">"), ("minimum", "≥"), ("exclusiveMaximum", "<"), ("maximum", "≤"),
                        ("minLength", "length ≥"), ("maxLength", "length ≤")):
        if key in node:
            parts.append(f"{symbol} {_yaml(node[key])}")
    if "pattern" in node:
        parts.append(f"matching `{node['pattern']}`")
    return f" ({', '.join(parts)})" if parts else ""


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _join(*parts: str) -> str:
    return " — ".join(p.strip() for p in parts if p and p.strip())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if "\\|" not in text else text.replace("\n", " ")


def rows(kind: str) -> tuple[list[Row], list[str]]:
    """The reference rows of one model and the keys that have no description; a run config's
    include the own sections of strategies registered with them (``strategy.<name>.KEY``),
    after the flat ``strategy.`` keys."""
    walker = _Walker(json_schema(kind))
    walker.model(walker.resolve(json_schema(kind)), "")
    if kind != "run":
        return walker.rows, walker.undocumented
    at = max((i + 1 for i, r in enumerate(walker.rows) if r.key.startswith("strategy.")), default=len(walker.rows))
    for name in (n for n in OPTIONS if has_own_section(n)):
        schema = OPTIONS[name].model_json_schema()
        own = _Walker(schema)
        own.rows.append(Row(f"strategy.{name}", "section", "see keys below",
                            f"the options of strategy.name={name}, its own section"))
        own.model(own.resolve(schema), f"strategy.{name}.")
        walker.rows[at:at] = own.rows
        at += len(own.rows)
        walker.undocumented += own.undocumented
    return walker.rows, walker.undocumented


def table(kind: str) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for row in rows(kind)[0]:
        lines.append(f"| `{row.key}` | {_cell(row.type)} | {_cell(row.default)} | {_cell(row.meaning)} |")
    return "\n".join(lines)


def markdown() -> str:
    """docs/config.md."""
    return f"""# Configuration reference

<!-- Generated from the pydantic models by `{REGENERATE}`.
     Do not edit by hand: tests/test_docs.py fails when this file is out of date. -->

Every key of a run config and of a sweep spec, with its type, default and meaning.
Keys are dotted paths: write them nested in YAML, or flat with `--set KEY=VALUE`
(`--set cluster.workers=8 --set strategy.name=local_sgd --set strategy.local_steps=16`). Unknown
keys and wrong types are refused with exit code 2, naming the key. So is a `strategy.` option
the chosen strategy does not read, set to anything but its default (`strategy.compression=fp16`
with `strategy.name=async`: the message names the strategies that read it); a run records only
the options its strategy reads. In a sweep whose grid varies `strategy.name`, each cell keeps
only its strategy's options (and `tune.params` on such an option tune only those cells).
`budget.train_time_s` and `target.value` must be finite. `syncbench config --schema run`
prints the JSON Schema (for editors); `syncbench config CONFIG.yaml` prints a config with
every default filled in and only its strategy's options.

## Run config

`syncbench run CONFIG.yaml`. A key marked *required* must be given; a section's keys
may be left out to take their defaults. In a sweep spec, `set:`, `grid:` and
`tune.params` take these keys.

{table("run")}

## Sweep spec

`syncbench sweep SPEC.yaml`. Every combination of `grid` values is a cell; every cell
runs once per seed, each as one Optuna trial and one MLflow child run.

{table("sweep")}
"""
