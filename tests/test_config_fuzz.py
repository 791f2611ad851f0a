"""Fuzzing the configurations: a shipped pipeline or job with one random change at a random place
(a value replaced by any YAML value, a key removed, an unknown key added) either validates or is
refused with one ConfigError whose every line names the file and a field — never a traceback.
Nothing here reads data or starts anything."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hamu_ray.engine.config import UnlearnConfig
from hamu_ray.pipeline.config import PipelineConfig
from hamu_ray.schema import ConfigError, validate

ROOT = Path(__file__).parent.parent
SHIPPED = {path.name: (yaml.safe_load(path.read_text()), schema) for path, schema in
           [*((p, PipelineConfig) for p in sorted((ROOT / "pipelines").glob("*.yaml"))),
            *((p, UnlearnConfig) for p in sorted((ROOT / "cluster" / "jobs").glob("*.yaml")))]}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=12),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["lr", "auto", "oracle", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def places(node, path=()):
    """Every (container, key) in a parsed YAML tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield path + (key,)
        yield from places(child, path + (key,))


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@st.composite
def mutated(draw):
    name = draw(st.sampled_from(sorted(SHIPPED)))
    raw, schema = SHIPPED[name]
    raw = copy.deepcopy(raw)
    path = draw(st.sampled_from(list(places(raw))))
    parent, key = at(raw, path[:-1]), path[-1]
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "replace":
        parent[key] = draw(values)
    elif action == "remove":
        del parent[key]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return name, raw, schema


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_a_changed_config_validates_or_names_the_field(case):
    name, raw, schema = case
    try:
        validate(raw, name, schema)
    except ConfigError as exc:
        lines = str(exc).split("\n")
        assert lines[0] == "invalid configuration:" and len(lines) > 1
        for line in lines[1:]:
            assert line.strip().startswith(f"{name}: "), line
            assert line.strip().split(": ", 2)[1], line  # a field path (or <root>)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_validates_unchanged(name):
    raw, schema = SHIPPED[name]
    validate(copy.deepcopy(raw), name, schema)


def test_a_nan_anywhere_numeric_is_a_field_error_not_a_crash():
    raw, schema = copy.deepcopy(SHIPPED["digits.yaml"])
    raw["unlearn"]["lr"] = math.nan
    with pytest.raises(ConfigError, match="digits.yaml: unlearn.lr"):
        validate(raw, "digits.yaml", schema)
