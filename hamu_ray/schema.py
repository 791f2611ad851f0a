"""Schema tools shared by every configuration: the frozen base section, the one error type,
KEY=VALUE overrides and validation whose every error names the file and the field."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from hamu_ray.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(UserError, ValueError):
    """Every problem in one message, each line naming the file and the field."""


def config_kind(raw: dict[str, Any], source: str) -> Literal["pipeline", "job"]:
    """Which schema a YAML mapping is for, by its top-level keys."""
    if "methods" in raw:
        return "pipeline"
    if "method" in raw and "output_dir" in raw:
        return "job"
    raise ConfigError(f"{source}: neither a pipeline (it has methods:) nor a job (it has method: "
                      "and output_dir:)")



# ---- KEY=VALUE overrides (`hamu-ray run p.yaml unlearn.lr=0.02 methods.0.hparams.constraint=0.1`)

def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """A copy of `raw` with each dotted path set to its YAML-parsed value. Integers index lists;
    a missing (or null) mapping key is created, and the schema then judges what was made."""
    merged = copy.deepcopy(raw)
    for override in overrides:
        keys, value = parse_override(override, source)
        node = merged
        for depth, key in enumerate(keys[:-1]):
            node = step_into(node, key, keys[:depth + 1], override, source)
        set_key(node, keys[-1], value, override, source)
    return merged


def parse_override(override: str, source: str) -> tuple[list[str], Any]:
    path, sep, text = override.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"{source}: override {override!r}: expected KEY=VALUE with a dotted key, "
                          "e.g. unlearn.lr=0.02 or methods.0.hparams.constraint=0.1")
    try:
        return keys, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise ConfigError(f"{source}: override {override!r}: the value is not YAML: {problem}") from None


def step_into(node: Any, key: str, walked: list[str], override: str, source: str) -> Any:
    if isinstance(node, dict):
        if node.get(key) is None:  # absent or null: a new mapping
            node[key] = {}
        child = node[key]
    else:
        child = node[list_index(node, key, override, source)]
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{source}: override {override!r}: {'.'.join(walked)} is {child!r}, "
                          "not a mapping or a list")
    return child


def set_key(node: dict | list, key: str, value: Any, override: str, source: str) -> None:
    if isinstance(node, dict):
        node[key] = value
    else:
        node[list_index(node, key, override, source)] = value


def list_index(items: list, key: str, override: str, source: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"{source}: override {override!r}: {key!r} is not an index of a list of "
                          f"{len(items)} item(s)")
    return int(key)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw



UNION_TAGS: set[str] = set()  # pydantic puts a union member's tag in an error's path: dropped


def tagged(section: type[Section], tag: str):
    """`section` as the member `tag` of a discriminated union (e.g. model.kind's sections)."""
    from pydantic import Tag

    UNION_TAGS.add(tag)
    return Annotated[section, Tag(tag)]


def field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in UNION_TAGS)


def validate(raw: dict[str, Any], source: str, schema: type[Section]):
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {field_path(err['loc']) or '<root>'}: {err['msg']}"
                 + (f" (got {err['input']!r})" if err["type"] != "missing" and err["loc"] else "")
                 for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load(path: str | Path, overrides: Sequence[str], schema: type[Section]):
    return validate(apply_overrides(read_yaml(path), overrides, str(path)), str(path), schema)
