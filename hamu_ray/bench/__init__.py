"""`hamu-ray bench`: the engine's step timed side by side against the cheapest two-objective step.

cases: the models and one step per method; runner: plain torch, then DeepSpeed worker groups;
report: the Markdown tables and the derived scaling table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

METHODS = ("ft", "gdiff-1bwd", "gdiff-2bwd", "hamu-q", "hamu-q-full", "surgery", "implicit",
           "implicit-fast")  # described in hamu_ray.bench.cases
BASELINE = "gdiff-1bwd"  # every ratio is to this method at the same stage and worker count
MODELS = ("mlp", "llama-fp32", "llama-bf16", "llama-lora")
SMALL = {"hidden": 64, "batch": 16, "lm_batch": 4, "steps": 3, "warmup": 1,
         "llama_size": "micro"}  # CI: every row, fast


def main(spec, out_dir: Path, mlflow_uri: str | None = None) -> dict:
    """Run the matrix (a runner.BenchSpec), write bench.json and bench.md into out_dir, print the
    Markdown."""
    from hamu_ray.bench import report, runner
    from hamu_ray.pipeline.tracking import check_reachable

    if mlflow_uri:
        check_reachable(mlflow_uri)  # down later: the run waits in out_dir/mlflow-unsent
    out_dir.mkdir(parents=True, exist_ok=True)

    def progress(row: dict) -> None:
        print(json.dumps(runner.progress_line(row)), flush=True)

    rows, checks = runner.run(spec, progress)
    meta = {"where": where(spec), "checks": checks, "spec": asdict(spec)}
    result = {**meta, "summary": report.summary(rows), "rows": rows}
    text = report.markdown(rows, meta)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench.md").write_text(text)
    print(text)
    if mlflow_uri:
        log_to_mlflow(mlflow_uri, rows, out_dir)
    return result


def where(spec) -> str:
    import torch

    device = (torch.cuda.get_device_name(0) if spec.device == "cuda"
              else f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    return (f"Measured on {device}; torch {torch.__version__}, Python {sys.version.split()[0]}; "
            f"{spec.steps} timed steps after {spec.warmup} warm-up steps per case; MLP "
            f"784-{spec.hidden}-{spec.hidden}-10 at {spec.batch}+{spec.batch} rows, Llama "
            f"'{spec.llama_dir or spec.llama_size}' at {spec.lm_batch}+{spec.lm_batch} QA rows; gloo/NCCL between workers"
            + (f"; zero_optimization overrides {spec.zero}." if spec.zero else "."))


def log_to_mlflow(uri: str, rows: list[dict], out_dir: Path) -> None:
    """One run in the experiment hamu-ray-bench: every row's ms and ratio, and both files (a
    local store keeps them under out_dir, not in the working directory)."""
    from hamu_ray.bench import report
    from hamu_ray.pipeline.tracking import Tracker

    metrics = {}
    for r in rows:
        key = f"{r['model']}/{report.config_name(r)}/{r['method']}".replace(", ", "_").replace(" ", "_")
        metrics[f"{key}/ms"] = r["ms"]
        if r["ratio"] is not None:
            metrics[f"{key}/ratio"] = r["ratio"]
    tracker = Tracker(uri, "hamu-ray-bench", artifact_root=out_dir / "mlflow-artifacts",
                      buffer_dir=out_dir / "mlflow-unsent", check=False)  # checked before the timing
    with tracker.run("bench"):
        tracker.log_metrics(metrics)
        tracker.log_artifact(out_dir / "bench.json")
        tracker.log_artifact(out_dir / "bench.md")
    tracker.finish()
