"""`seeds: N`: one run of every method per seed (its own cached stage; the first seed's is the
stage one seed makes), the table's mean ± sd, and which differences exceed the spread, each
checked against a hand computation. Without Ray."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from hamu_ray.engine.config import parse_config
from hamu_ray.pipeline import evaluate, seeds, stages
from hamu_ray.pipeline.config import PipelineConfig, load_pipeline
from hamu_ray.schema import ConfigError

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


def digits(tmp_path: Path, **changes) -> PipelineConfig:
    raw = yaml.safe_load(PIPELINE.read_text()) | {"output_dir": str(tmp_path / "run")} | changes
    return parse_config(raw, source=str(PIPELINE), schema=PipelineConfig)


# ---- the schema ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, needle", [
    (0, "seeds: Input should be greater than or equal to 1"),
    (-2, "seeds: Input should be greater than or equal to 1"),
    ("three", "seeds: Input should be a valid integer"),
])
def test_seeds_below_one_are_refused_at_the_field(tmp_path, value, needle):
    raw = yaml.safe_load(PIPELINE.read_text()) | {"seeds": value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert f"{path}: {needle}" in str(err.value), str(err.value)


def test_a_label_that_names_another_methods_seed_run_is_refused(tmp_path):
    methods = [*yaml.safe_load(PIPELINE.read_text())["methods"], {"name": "ga", "label": "gdiff-seed1"}]
    with pytest.raises(ConfigError, match="methods: .*the label 'gdiff-seed1' is the name of gdiff's run with another seed"):
        digits(tmp_path, seeds=2, methods=methods)
    assert digits(tmp_path, seeds=1, methods=methods).seeds == 1  # one seed: no such run


def test_the_default_is_one_seed_the_pipelines_data_seed(tmp_path):
    cfg = digits(tmp_path)
    assert (cfg.seeds, cfg.method_seeds, cfg.seed_runs("hamu-q")) == (1, [0], [(0, "hamu-q")])
    cfg = digits(tmp_path, seeds=3, data={**cfg.data.model_dump(by_alias=True), "seed": 5})
    assert cfg.seed_runs("hamu-q") == [(5, "hamu-q"), (6, "hamu-q-seed6"), (7, "hamu-q-seed7")]


# ---- the stages ------------------------------------------------------------------------------

def method_stages(cfg: PipelineConfig, label: str) -> list[tuple[str, dict, Path]]:
    out = Path(cfg.output_dir).resolve()
    prepared = {name: str(out / "stages" / "prepare-x" / f"{name}.parquet") for name in ("forget", "retain")}
    original = out / "stages" / "original-x" / "model.safetensors"
    return [(name, job, stages.stage_directory(f"unlearn-{name}", job, out))
            for name, job in stages.seeded_jobs(cfg, cfg.method_entry(label), prepared, original, None)]


def test_each_seed_is_its_own_stage_and_the_first_is_the_stage_one_seed_makes(tmp_path):
    one = method_stages(digits(tmp_path), "gdiff")
    three = method_stages(digits(tmp_path, seeds=3), "gdiff")
    assert [name for name, *_ in three] == ["gdiff", "gdiff-seed1", "gdiff-seed2"]
    # the first seed: the directory a pipeline without seeds made (its cache stays valid)
    out = Path(tmp_path / "run").resolve()
    before = stages.unlearning_job(digits(tmp_path), digits(tmp_path).method_entry("gdiff"),
                                   {name: str(out / "stages" / "prepare-x" / f"{name}.parquet")
                                    for name in ("forget", "retain")},
                                   out / "stages" / "original-x" / "model.safetensors")
    assert one[0][1] == before and three[0][1] == before
    assert one[0][2] == three[0][2] == stages.stage_directory("unlearn-gdiff", before, out)
    directories = [directory for *_, directory in three]
    assert len(set(directories)) == 3 and directories[1].name.startswith("unlearn-gdiff-seed1-")
    for seed, (_, job, _) in enumerate(three):  # data order and every random draw
        assert (job["data"]["shuffle_seed"], job["train"]["seed"]) == (seed, seed)
        assert {**job, "data": {**job["data"], "shuffle_seed": 0}, "train": {**job["train"], "seed": 0}} == before


# ---- the table -------------------------------------------------------------------------------

COLUMNS = evaluate.TABLE_COLUMNS


def row(model: str, forget_acc: float, quality: float, utility: float, stop: str = "max_steps") -> dict:
    values = {"forget_acc": forget_acc, "forget_quality": quality, "test_acc_retained": utility,
              "steps": 30, "stop": stop, "wall_s": 2.0}
    return {"model": model, **{c: values.get(c) for c in COLUMNS[1:]}}


# three seeds of two methods: a (utility 0.1, 0.2, 0.6), b (0.3, 0.4, 0.5)
RUNS = [row("original", 0.9, 1e-9, 0.95), row("oracle", 0.0, 1.0, 0.96),
        row("hamu-q", 0.10, 0.5, 0.1), row("hamu-q-seed1", 0.20, 0.6, 0.2), row("hamu-q-seed2", 0.30, 0.7, 0.6, "oracle"),
        row("gdiff", 0.05, 0.01, 0.3), row("gdiff-seed1", 0.05, 0.02, 0.4), row("gdiff-seed2", 0.05, 0.03, 0.5)]


def test_the_table_is_mean_and_sample_sd_over_the_seeds_by_hand(tmp_path):
    cfg = digits(tmp_path, seeds=3)
    rows = {r["model"]: r for r in seeds.table_rows(cfg, RUNS, COLUMNS)}
    assert list(rows) == ["original", "oracle", "hamu-q", "gdiff"]
    assert rows["original"] == RUNS[0]  # references: one model each, shown as they are
    hamu = rows["hamu-q"]
    # mean 0.3; deviations -0.2, -0.1, 0.3: sd = sqrt((0.04 + 0.01 + 0.09) / 2) = sqrt(0.07)
    assert hamu["test_acc_retained"] == pytest.approx(0.3)
    assert hamu["test_acc_retained_sd"] == pytest.approx(math.sqrt(0.07))
    assert (hamu["forget_acc"], hamu["forget_acc_sd"]) == (pytest.approx(0.2), pytest.approx(0.1))
    assert (hamu["steps"], hamu["steps_sd"], hamu["seeds"]) == (30, 0.0, 3)
    assert hamu["stop"] == "max_steps ×2, oracle ×1" and rows["gdiff"]["stop"] == "max_steps"
    text = seeds.write_table(list(rows.values()), COLUMNS, tmp_path)
    hamu_line = next(line for line in text.splitlines() if line.startswith("hamu-q"))
    assert "30.0 ± 26.5" in hamu_line and "20.0 ± 10.0" in hamu_line and "0.6 ± 0.1" in hamu_line  # forget quality: 3 digits
    csv = (tmp_path / "comparison.csv").read_text().splitlines()
    assert csv[0].endswith(",forget_acc_sd,retain_acc_sd,test_acc_sd,test_acc_retained_sd,forget_loss_sd,"
                           "forget_entropy_sd,mia_auc_sd,forget_quality_sd,avg_gap_sd,steps_sd,wall_s_sd,seeds")
    assert "| 30.0 ± 26.5 |" in (tmp_path / "comparison.md").read_text()


def test_one_seed_leaves_the_table_as_it_was(tmp_path):
    cfg = digits(tmp_path)
    runs = [r for r in RUNS if "seed" not in r["model"]]
    rows = seeds.table_rows(cfg, runs, COLUMNS)
    assert rows == runs
    assert seeds.write_table(rows, COLUMNS, tmp_path) == evaluate.to_text(runs, COLUMNS)
    assert (tmp_path / "comparison.md").read_text() == evaluate.to_markdown(runs, COLUMNS) + "\n"
    assert (tmp_path / "comparison.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    (tmp_path / "spread.md").write_text("an earlier run's")
    assert seeds.write_spread(cfg, runs, COLUMNS, tmp_path) == "" and not (tmp_path / "spread.md").exists()


# ---- which differences exceed the spread --------------------------------------------------------

def welch_p_by_hand(a: list[float], b: list[float]) -> float:
    """Two samples of 3 with equal variances: Welch's df is exactly 4, and Student's t with 4
    degrees of freedom has the closed form P(|T| > t) = 1 - (3/2) x + (1/2) x³, x = t / sqrt(4 + t²)."""
    mean_a, mean_b = sum(a) / 3, sum(b) / 3
    var_a = sum((v - mean_a) ** 2 for v in a) / 2
    var_b = sum((v - mean_b) ** 2 for v in b) / 2
    assert var_a == pytest.approx(var_b)
    t = abs(mean_a - mean_b) / math.sqrt(var_a / 3 + var_b / 3)
    x = t / math.sqrt(4 + t * t)
    return 1 - 1.5 * x + 0.5 * x ** 3


@pytest.mark.parametrize("b, exceeds", [([3.0, 4.0, 5.0], False), ([4.0, 5.0, 6.0], True)])
def test_welchs_test_matches_the_closed_form(b, exceeds):
    a = [1.0, 2.0, 3.0]
    p = welch_p_by_hand(a, b)
    assert seeds.welch_p(a, b) == pytest.approx(p, rel=1e-9)
    assert p == pytest.approx(0.0705 if not exceeds else 0.0213, abs=1e-4)
    [d] = seeds.differences("x", {"a": a, "b": b})
    assert (d.higher, d.lower, d.exceeds) == ("b", "a", exceeds)


def test_runs_without_spread_differ_exactly_when_their_means_do():
    assert seeds.welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0 and seeds.welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert seeds.differences("x", {"a": [1.0, float("nan")], "b": [1.0, 2.0]}) == []  # a diverged seed


def test_the_statement_says_which_differences_exceed_the_spread(tmp_path):
    cfg = digits(tmp_path, seeds=3)
    text = seeds.write_spread(cfg, RUNS, COLUMNS, tmp_path)
    assert text == (tmp_path / "spread.md").read_text().rstrip("\n")
    lines = text.splitlines()
    assert lines[0].startswith("Seeds: 3 runs per method (seeds 0, 1, 2); the original and the oracle are one")
    # forget quality: hamu-q (0.5, 0.6, 0.7) against gdiff (0.01, 0.02, 0.03): t = 0.58 / sqrt(0.01/3 +
    # 0.0001/3) = 10.0, df = 2.04: p 0.0096
    quality = lines.index("forget_quality (mean ± sd, best first): hamu-q 0.6 ± 0.1, gdiff 0.02 ± 0.01")
    assert lines[quality + 1].startswith("  hamu-q > gdiff (p 0.009")
    # utility: gdiff (0.3, 0.4, 0.5) against hamu-q (0.1, 0.2, 0.6): t = 0.1 / sqrt(0.01/3 + 0.07/3)
    # = 0.612, df = (0.08/3)² / ((0.01/3)²/2 + (0.07/3)²/2) = 2.56: p 0.590
    utility = lines.index("test_acc_retained (mean ± sd, best first): gdiff 40.0 ± 10.0, hamu-q 30.0 ± 26.5")
    assert lines[utility + 1] == "  gdiff vs hamu-q: within the spread (p 0.59)"
    rows = (tmp_path / "comparison_seeds.csv").read_text().splitlines()
    assert rows[0].startswith("model,seed,forget_acc") and rows[1].startswith("hamu-q,0,0.1,")
    assert rows[3].startswith("hamu-q,2,0.3,") and len(rows) == 7
