"""Configuration errors as a user meets them: each names where the mistake is (the file, its line,
or the command-line override), the field, and for an unknown key the closest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hamu_ray.engine.config import load_config, parse_config
from hamu_ray.pipeline.config import PipelineConfig, load_pipeline
from hamu_ray.schema import ConfigError

ROOT = Path(__file__).parent.parent
DIGITS = ROOT / "pipelines" / "digits.yaml"
COUNTRY_QA = ROOT / "pipelines" / "country_qa.yaml"


def job(tmp_path: Path, **method) -> Path:
    raw = {"data": {"forget": "f.parquet", "retain": "r.parquet"}, "model": {"sizes": [2, 2]},
           "method": method or {"name": "hamu-q", "hparams": {"constraint": 0.1, "radius": 0.2}},
           "train": {"lr": 0.1}, "output_dir": str(tmp_path / "out")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(load, *args) -> str:
    with pytest.raises(ConfigError) as err:
        load(*args)
    return str(err.value)


@pytest.mark.parametrize("override, line", [
    ("unlaern.lr=0.02", "command line 'unlaern.lr=0.02' (over {f}): unlaern: Extra inputs are not permitted "
                        "(got {{'lr': 0.02}}); did you mean unlearn?"),
    ("unlearn.max_step=3", "command line 'unlearn.max_step=3' (over {f}): unlearn.max_step: Extra inputs are "
                           "not permitted (got 3); did you mean max_steps?"),
    ("data.forget.clas=3", "data.forget.clas: Extra inputs are not permitted (got 3); did you mean class?"),
    ("methods.1.lable=x", "methods.1.lable: Extra inputs are not permitted (got 'x'); did you mean label?"),
    ("tune.space.radius.valus=[1]", "tune.space.radius.valus: Extra inputs are not permitted (got [1]); "
                                    "did you mean values?"),
    # inside a method's own train overrides (checked against the pipeline's unlearn settings)
    ("methods.0.train.max_step=3", "command line 'methods.0.train.max_step=3' (over {f}): "
                                   "methods.0.train.max_step: Extra inputs are not permitted (got 3); did you mean max_steps?"),
])
def test_an_overrides_mistake_is_the_command_lines_with_the_closest_key(override, line):
    message = error_of(load_pipeline, DIGITS, [override])
    assert line.format(f=DIGITS) in message, message
    assert "<root>" not in message


def test_the_closest_key_is_found_through_tagged_unions():
    message = error_of(load_pipeline, COUNTRY_QA, ["model.init.layer=3", "data.forget_shar=0.1"])
    assert "model.init.layer: Extra inputs are not permitted (got 3); did you mean layers?" in message
    assert "data.forget_shar: Extra inputs are not permitted (got 0.1); did you mean forget_share?" in message


def test_a_mistake_in_the_file_is_the_files_and_a_check_over_an_override_names_both(tmp_path):
    raw = yaml.safe_load(DIGITS.read_text())
    raw["unlearn"]["max_step"] = 3
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    message = error_of(load_pipeline, path, ["unlearn.lr=0.5"])
    assert f"  {path}: unlearn.max_step: Extra inputs are not permitted (got 3); did you mean max_steps?" in message
    message = error_of(load_config, job(tmp_path), ["method.hparams.radiuss=1"])
    assert f"{tmp_path / 'job.yaml'} with command line 'method.hparams.radiuss=1': method:" in message


def test_a_yaml_syntax_error_names_the_file_and_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\n  methods: [\n")
    message = error_of(load_pipeline, path)
    assert message.startswith(f"{path}: not valid YAML: line 2, column 10:"), message
    assert "<unicode string>" not in message


def test_a_missing_config_file_is_no_such_file(tmp_path):
    assert error_of(load_config, tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such file"


def test_a_methods_own_rule_is_named_as_its_own(tmp_path):
    """`method.name=npo` over a HAMU job: npo runs gdiff unless method.rule says otherwise."""
    message = error_of(load_config, job(tmp_path), ["method.name=npo"])
    assert ("method npo runs rule gdiff (its own; method.rule, e.g. hamu-q, runs it under another): "
            "rule 'gdiff' has no hyper-parameter(s) constraint, radius") in message, message
    assert load_config(job(tmp_path), ["method.name=npo", "method.rule=hamu-q"]).method.rule_name == "hamu-q"


def test_a_job_without_a_forget_set_leaves_data_forget_out(tmp_path):
    raw = {"data": {"retain": "r.parquet"}, "model": {"sizes": [2, 2]}, "method": {"name": "ft"},
           "train": {"lr": 0.1}, "output_dir": str(tmp_path / "out")}
    assert parse_config(raw).data.forget is None
    raw["method"] = {"name": "gdiff"}
    message = error_of(parse_config, raw)
    assert "<config>: data.forget is missing: method gdiff needs a forget set" in message, message


def test_a_key_with_a_newline_keeps_its_error_on_one_line():
    """Wherever a key is quoted (the field path, a rule's unknown hyper-parameters, the implicit
    method's TypeError), a newline in it is escaped, not a break in the error's line."""
    raw = yaml.safe_load(DIGITS.read_text())
    raw["unlearn"]["max\nsteps"] = 3
    raw["methods"] = [{"name": "hamu-q", "hparams": {"constraint": 0.1, "radius": 0.2, "radi\nus": 1}},
                      {"name": "surgery-implicit", "hparams": {"eps\nilon": 0.1}}]
    lines = error_of(parse_config, raw, "d.yaml", PipelineConfig).split("\n")
    assert len(lines) == 4, lines  # the heading and one line per error
    assert lines[1] == "  d.yaml: unlearn.max\\nsteps: Extra inputs are not permitted (got 3); did you mean max_steps?"
    assert lines[2].startswith("  d.yaml: methods.0: Value error, rule 'hamu-q' has no hyper-parameter(s) "
                               "radi\\nus; valid: constraint, radius,"), lines[2]
    assert lines[3].startswith("  d.yaml: methods.1: Value error, surgery-implicit: ") and \
        "unexpected keyword argument 'eps\\nilon'" in lines[3], lines[3]
