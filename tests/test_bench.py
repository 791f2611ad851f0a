"""`hamu-ray bench` in its small configuration: every row of the matrix is there, and the rows
that must be equal are (DeepSpeed at ZeRO-3, one and two workers, vs plain torch; GradDiff
with one backward vs two). Timings are not asserted: they belong to the benchmark's output."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hamu_ray import bench, cli

ROOT = Path(__file__).parent.parent
MODELS = ("mlp", "llama-fp32", "llama-lora")  # bf16: the benchmark runs and the causal-LM tests
STAGES = (3,)  # the partitioned case; every stage 0-3 against one process: tests/engine/test_grads_deepspeed.py


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "hamu_ray.cli", "bench", "--small", "--models", ",".join(MODELS),
         "--stages", ",".join(map(str, STAGES)), "--workers", "1,2", "--out", str(out),
         "--tracking-uri", f"sqlite:///{out}/mlflow.db"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), out


def test_every_row_of_the_matrix(result):
    data, text, _ = result
    expected = {(m, "torch", None, 1, method) for m in MODELS for method in bench.METHODS}
    expected |= {(m, "deepspeed", stage, workers, method) for m, stage, workers, method
                 in itertools.product(MODELS, STAGES, (1, 2), bench.METHODS)}
    got = [(r["model"], r["backend"], r["stage"], r["workers"], r["method"]) for r in data["rows"]]
    assert sorted(got, key=str) == sorted(expected, key=str)
    for r in data["rows"]:
        assert r["ms"] > 0 and r["q1_ms"] <= r["ms"] <= r["q3_ms"] and r["ratio"] > 0
        assert r["stopped_steps"] == 0  # every method really stepped every time
        base = next(b for b in data["rows"] if b["method"] == bench.BASELINE
                    and (b["model"], b["backend"], b["stage"], b["workers"])
                    == (r["model"], r["backend"], r["stage"], r["workers"]))
        assert len(r["step_ms"]) == len(base["step_ms"]) == bench.SMALL["steps"]
        paired = sorted(t / b for t, b in zip(r["step_ms"], base["step_ms"]))
        assert math.isclose(r["ratio"], paired[len(paired) // 2])  # odd count: the middle one
        two_backward = r["method"] in ("gdiff-2bwd", "hamu-q", "hamu-q-full", "surgery")
        assert (r["g_r_bytes"] > 0) == two_backward
    for model in MODELS:  # one Markdown matrix per model, the derived scaling table at the end
        assert f"## {model}: step time" in text
    assert "## Scaling (derived, not measured)" in text


def test_rows_that_must_be_equal_are(result):
    data, _, _ = result
    for r in data["rows"]:
        if r["backend"] == "deepspeed" and not r["bf16"]:  # fp32: distributed == single process
            assert r["max_abs_diff_vs_torch"] <= 1e-5, r
    for model in MODELS:
        assert data["checks"][f"{model}: gdiff-1bwd vs gdiff-2bwd, plain torch"] <= 1e-6
    # two workers hold half of each ZeRO-1+ gradient: the kept g_r is a shard, not a copy
    kept = {(r["model"], r["stage"], r["workers"]): r["g_r_bytes"] for r in data["rows"]
            if r["method"] == "hamu-q" and r["backend"] == "deepspeed" and r["model"] == "mlp"}
    assert kept[("mlp", 3, 2)] < kept[("mlp", 3, 1)]


def test_bad_lists_are_refused_before_anything_runs(tmp_path, capsys):
    for flag, value in (("--stages", "0,5"), ("--methods", "hamu-q,sgd"), ("--models", "gpt"),
                        ("--workers", "two")):
        assert cli.main(["bench", flag, value, "--out", str(tmp_path / "out")]) == 2
        assert f"{flag} '{value}': expected a comma-separated subset of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main(["bench", "--llama-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"--llama-dir {tmp_path}: no config.json there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rows_reach_mlflow(result):
    import mlflow

    data, _, out = result
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("hamu-ray-bench").experiment_id])
    assert len([k for k in run.data.metrics if k.endswith("/ms")]) == len(data["rows"])
    hamu = next(r for r in data["rows"] if r["method"] == "hamu-q" and r["backend"] == "torch"
                and r["model"] == "mlp")
    assert run.data.metrics["mlp/torch_1_process/hamu-q/ratio"] == pytest.approx(hamu["ratio"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"bench.json", "bench.md"}
    assert any((out / "mlflow-artifacts").rglob("bench.json"))  # beside the store, not in the cwd
