"""Every YAML block of the README validates with the tool's own schema: a whole pipeline or job
as it stands, a fragment (marked by its first line, `# a fragment of a pipeline (e.g. FILE)`)
merged over that shipped file's top-level sections."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hamu_ray.engine.config import UnlearnConfig, parse_config
from hamu_ray.pipeline.config import PipelineConfig
from hamu_ray.schema import config_kind

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
FRAGMENT = re.compile(r"#\s*a fragment of a (pipeline|job) \(e\.g\. (\S+)\)")
SCHEMAS = {"pipeline": PipelineConfig, "job": UnlearnConfig}


def yaml_blocks(text: str) -> list[tuple[int, str]]:
    """(line, text) of every ```yaml block, indented ones (in a list item) included."""
    pattern = re.compile(r"^( *)```yaml\n(.*?)^\1```", re.M | re.S)
    return [(text[:m.start()].count("\n") + 1, re.sub(rf"(?m)^{m.group(1)}", "", m.group(2)))
            for m in pattern.finditer(text)]


BLOCKS = yaml_blocks(README.read_text())


def test_the_readme_has_its_yaml_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("line, block", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_a_readme_yaml_block_validates(line, block):
    source = f"README.md:{line}"
    raw = yaml.safe_load(block)
    fragment = FRAGMENT.match(block.lstrip())
    if fragment is not None:
        kind, base = fragment.groups()
        raw = {**yaml.safe_load((ROOT / base).read_text()), **raw}
        assert config_kind(raw, source) == kind
    else:
        kind = config_kind(raw, source)  # a block that is neither must say what it is part of
    parse_config(raw, source, SCHEMAS[kind])
