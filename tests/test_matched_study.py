"""scripts/matched_study.py's plumbing (no Ray): the study file, each method's search pipeline at
matched forgetting, the tuned entry a chosen trial becomes, and the comparison pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hamu_ray.engine.config import parse_config
from hamu_ray.pipeline.config import PipelineConfig
from scripts import matched_study

ROOT = Path(__file__).parents[1]
STUDIES = ROOT / "pipelines" / "studies"


@pytest.mark.parametrize("name, source", [("country_qa_facts_tuned", "country-qa"),
                                          ("fictitious_qa_facts_tuned", "fictitious-qa")])
def test_the_studys_searches_are_valid_pipelines_ranked_at_matched_forgetting(name, source):
    study = matched_study.load_study(STUDIES / f"{name}.yaml")
    raw = matched_study.study_pipeline(study, ["output_dir=elsewhere"])
    for label, space in study["spaces"].items():
        cfg = parse_config(matched_study.search_pipeline(raw, label, space, study["trials"]),
                           source=label, schema=PipelineConfig)
        assert (cfg.tune.method, cfg.tune.rank, cfg.tune.scheduler, cfg.tune.num_samples) == (label, "matched", None, 4)
        assert cfg.monitor.stop_at == "oracle" and cfg.data.forget_tokens == "fact" and cfg.data.source == source
        # the study's own overrides, then the command line's
        assert cfg.unlearn.max_steps == 200 and cfg.robustness.quantize == [8, 4] and cfg.output_dir == "elsewhere"
    assert "tune" not in raw  # the pipeline itself is left as it was
    assert yaml.safe_load((ROOT / study["pipeline"]).read_text())["unlearn"]["max_steps"] == 100


def test_a_chosen_trial_becomes_a_methods_entry_that_runs_what_the_trial_ran():
    raw = yaml.safe_load((ROOT / "pipelines" / "country_qa_facts.yaml").read_text())
    label = "simnpo-hamu-q-df0.5-R0.5-tr0.02"
    cfg = parse_config(matched_study.search_pipeline(raw, label, {"radius": {"low": 0.2, "high": 2.0}}, 4),
                       source="study", schema=PipelineConfig)
    entry = matched_study.tuned_entry(cfg, label, {"radius": 0.3})
    assert entry["label"] == f"{label}-tuned" and (entry["name"], entry["rule"]) == ("simnpo", "hamu-q")
    assert entry["hparams"] == {"constraint": 0.5, "constraint_unit": "damage_free", "constraint_split": "optimal",
                                "radius": 0.3, "trust_tolerance": 0.02}
    assert entry["train"] == {"lr": 0.05}  # the pipeline's unlearn.lr
    plain = matched_study.tuned_entry(cfg, "gdiff-lr0.1", {"lr": 0.03})
    assert plain["train"] == {"lr": 0.03} and plain["label"] == "gdiff-lr0.1-tuned"
    compared = parse_config(matched_study.comparison_pipeline(raw, [entry, plain]), source="compared",
                            schema=PipelineConfig)
    assert [m.key for m in compared.methods] == [f"{label}-tuned", "gdiff-lr0.1-tuned"]
    assert compared.name == "country-qa-facts-tuned" and compared.output_dir == raw["output_dir"]
    method, train = compared.trial_settings(compared.methods[0], {})  # as the search's trial ran
    assert method.hparams["radius"] == 0.3 and train.lr == 0.05


@pytest.mark.parametrize("text, problem", [("pipeline: x.yaml\n", "a study is a mapping of pipeline, spaces"),
                                           ("pipeline: x.yaml\nspaces: {}\n", "spaces: give at least one"),
                                           ("pipeline: x.yaml\nspaces: {a: {}}\nbudget: 3\n", "a study is a mapping"),
                                           ("pipeline: x.yaml\nspaces: {a: {}}\noverrides: a=1\n", "overrides: a list of KEY=VALUE"),
                                           ("pipeline: x.yaml\nspaces: {a: {}}\noverrides: [seeds]\n", "overrides: a list")])
def test_a_bad_study_file_is_named_with_what_it_lacks(tmp_path, text, problem):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=problem):
        matched_study.load_study(path)
