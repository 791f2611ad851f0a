"""Schema tools shared by every configuration: the frozen base section, the one error type,
KEY=VALUE overrides and validation whose every error names the file (or the command-line
override that made it) and the field, with the closest valid key for an unknown one."""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Tag, ValidationError

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
                          "e.g. train.lr=0.02 (a key of pipelines and jobs alike)")
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
        with path.open() as stream:  # a stream: YAML's error marks then name the file
            raw = yaml.safe_load(stream)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem and its 1-based line and column, on one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + problem + (f" ({context})" if context else "")



UNION_TAGS: set[str] = set()  # pydantic puts a union member's tag in an error's path: dropped


def tagged(section: type[Section], tag: str):
    """`section` as the member `tag` of a discriminated union (e.g. model.kind's sections)."""
    UNION_TAGS.add(tag)
    return Annotated[section, Tag(tag)]


def field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in UNION_TAGS)


def one_line(text: str) -> str:
    """`text` with each character that is not printable escaped as Python writes it ("\\n"): a
    key or value that holds a newline, wherever the message quotes it (a field path, a rule's
    hyper-parameters), cannot split its error's line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class FieldError(ValueError):
    """A whole-config check's error about one field (a model validator's error has no location
    of its own): reported, and traced to an override, like a field error at `path`."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def validate(raw: dict[str, Any], source: str, schema: type[Section], overrides: Sequence[str] = (),
             file_raw: dict[str, Any] | None = None):
    """`raw` as `schema`; every error on its own line (one_line). With `overrides` (applied to
    `file_raw`, the file as read) an error in what an override set is named as the command
    line's, not the file's."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            keys = located(err)
            lines.append(one_line(f"{origin(keys, source, overrides, file_raw)}: {describe(err, schema, keys)}"))
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def located(err: dict) -> list[str]:
    """An error's field path as keys (union tags dropped); a FieldError's own path."""
    error = err.get("ctx", {}).get("error")
    if not err["loc"] and isinstance(error, FieldError):
        return error.path.split(".")
    path = field_path(err["loc"])
    return path.split(".") if path else []


def describe(err: dict, schema: type[BaseModel], keys: list[str]) -> str:
    """`field: problem`. A whole-config check's message stands alone: it names its fields."""
    error = err.get("ctx", {}).get("error")
    if isinstance(error, FieldError):
        return f"{error.path}: {error}"
    if not keys and err["type"] == "value_error":
        return str(error)
    return f"{'.'.join(keys) or '<root>'}: {problem(err, schema)}"


def problem(err: dict, schema: type[BaseModel]) -> str:
    """pydantic's message, the value it got, and for an unknown key the closest valid one."""
    text = err["msg"]
    if err["type"] != "missing" and err["loc"]:
        text += f" (got {err['input']!r})"
    if err["type"] == "extra_forbidden":
        text += closest_key(err["loc"], schema)
    return text


def load(path: str | Path, overrides: Sequence[str], schema: type[Section]):
    raw = read_yaml(path)
    return validate(apply_overrides(raw, overrides, str(path)), str(path), schema, overrides, raw)


# ---- where an error came from, and what was meant -------------------------------------------------

def origin(keys: list[str], source: str, overrides: Sequence[str], file_raw: dict[str, Any] | None) -> str:
    """The file, or the command-line override that set (or created) the erroneous field; an
    error of a section that an override changed inside names both."""
    paths = {override: override.partition("=")[0].strip().split(".") for override in overrides}
    for override, path in reversed(paths.items()):  # the last one wins, as in apply_overrides
        if keys[:len(path)] == path or (keys and path[:len(keys)] == keys and not present(file_raw, keys)):
            return f"command line {override!r} (over {source})"
    inside = [repr(override) for override, path in paths.items() if keys and path[:len(keys)] == keys]
    return f"{source} with command line {', '.join(inside)}" if inside else source


def present(raw: Any, keys: list[str]) -> bool:
    """Whether `keys` leads to a value in `raw` (a mapping, lists indexed by integers)."""
    for key in keys:
        if isinstance(raw, dict) and key in raw:
            raw = raw[key]
        elif isinstance(raw, list) and key.isdigit() and int(key) < len(raw):
            raw = raw[int(key)]
        else:
            return False
    return True


def closest_key(loc: tuple, schema: type[BaseModel]) -> str:
    """"; did you mean KEY?" for an unknown key `loc[-1]`, from the valid keys of its section."""
    section = section_at(schema, loc[:-1])
    if section is None or not isinstance(loc[-1], str):
        return ""
    valid = [info.alias or name for name, info in section.model_fields.items()]
    match = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def section_at(schema: Any, loc: tuple) -> type[BaseModel] | None:
    """The section (pydantic model) at a pydantic error's location, union tags included."""
    node = schema
    for key in loc:
        node = child(node, key)
        if node is None:
            return None
    node = single_model(node)
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def child(node: Any, key: Any) -> Any:
    node = single_model(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        info = next((i for n, i in node.model_fields.items() if key in (n, i.alias)), None)
        return info.annotation if info is not None else None
    origin_, args = typing.get_origin(node), typing.get_args(node)
    if origin_ in (typing.Union, types.UnionType):  # a tagged union: the member named by `key`
        return next((typing.get_args(m)[0] for m in args if union_tag(m) == key), None)
    if origin_ is list and isinstance(key, int):
        return args[0]
    if origin_ is dict:
        return args[1]
    return None


def single_model(node: Any) -> Any:
    """X out of Annotated[X, …] and of X | None (which add nothing to an error's location)."""
    if typing.get_origin(node) is Annotated and union_tag(node) is None:
        return single_model(typing.get_args(node)[0])
    if typing.get_origin(node) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(node) if m is not type(None)]
        if len(members) == 1:
            return single_model(members[0])
    return node


def union_tag(member: Any) -> str | None:
    if typing.get_origin(member) is not Annotated:
        return None
    return next((m.tag for m in typing.get_args(member)[1:] if isinstance(m, Tag)), None)
