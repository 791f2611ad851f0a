"""`make gpu-check` (README, "GPU checks"): what a lent GPU should check, in at most 8 minutes on
one GPU, written to one Markdown report, OUT/gpu-check.md:

  1. tests/test_gpu.py, as `make test-gpu` runs it (the step, 1-worker Ray jobs on NCCL at ZeRO-3
     and at ZeRO-2 with optimizer offload, bf16 with offload, the digits pipeline: each against
     CPU results);
  2. `hamu-ray bench --device cuda` on the ~1B Llama in bf16, plain torch and ZeRO-3 on one GPU:
     FT, one-backward GradDiff and HAMU-Q stepping in turn, 8 warm-up and 32 timed steps
     (median, interquartile range, tokens/s);
  3. the most memory one HAMU-Q engine allocated in a step (the same bench, that method alone,
     ZeRO-3 with optimizer offload) beside `hamu-ray plan` for the same job.

The Llama is built once, for both bench runs. Each part runs in its own process group under its
own time limit; a failed part is recorded and the next one runs. OUT also gets each part's log
and the speed bench's JSON (6 files). Exit status 1 if a part failed; 2, at once and writing
nothing, without CUDA.
Usage: python scripts/gpu_check.py OUT_DIR [--rehearse]
(--rehearse: the same parts on the CPU with the micro Llama and 2 steps: checks this script,
measures nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEED_METHODS = ("ft", "gdiff-1bwd", "hamu-q")
OFFLOAD = {"offload_optimizer": {"device": "cpu"}}
HAMU = {"constraint": 0.02, "radius": 0.2}  # the bench's HAMU-Q on the Llama (bench.cases.llama_case)
BENCH_ROWS = 8  # rows per set and step of the bench's Llama (BenchSpec.lm_batch): one backward's batch
SETTINGS = {  # seconds per part: 465, and ~15 s for imports and the plan, make 8 minutes
    False: {"device": "cuda", "size": "1b", "warmup": 8, "steps": 32,
            "limit_s": {"tests": 190, "llama": 45, "speed": 160, "memory": 70}},
    True: {"device": "cpu", "size": "micro", "warmup": 1, "steps": 2,
           "limit_s": {"tests": 120, "llama": 60, "speed": 300, "memory": 300}},
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for gpu-check.md and the parts' logs")
    parser.add_argument("--rehearse", action="store_true", help="on the CPU, micro shapes: checks the script only")
    args = parser.parse_args(argv)
    if not args.rehearse and shutil.which("nvidia-smi") is None:  # before importing torch: at once
        return refuse("no NVIDIA driver here (no nvidia-smi)")
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        return refuse(f"torch {torch.__version__} sees no CUDA device")
    settings = SETTINGS[args.rehearse]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sections = [header(torch, settings, args.rehearse)]
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        llama = Path(tmp) / "llama"
        for name, run in (("tests", part_tests), ("llama", part_llama), ("speed", part_speed),
                          ("memory", part_memory)):
            t0 = time.time()
            try:
                ok, text = run(args.out, settings, llama)
            except Exception as exc:  # noqa: BLE001 - recorded in the report, the next part runs
                ok, text = False, f"error: {type(exc).__name__}: {exc}"
            failed += [] if ok else [name]
            sections.append(f"## {TITLES[name]} ({'ok' if ok else 'FAILED'}, {time.time() - t0:.0f} s)\n\n{text}\n")
    sections.append(f"Total {time.time() - started:.0f} s; failed parts: {', '.join(failed) or 'none'}.\n")
    (args.out / "gpu-check.md").write_text("\n".join(sections))
    print(f"gpu-check: {args.out / 'gpu-check.md'}; failed parts: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def refuse(why: str) -> int:
    print(f"gpu-check: {why}: run it on a machine with a GPU (nothing was run or written)", file=sys.stderr)
    return 2


TITLES = {"tests": "tests/test_gpu.py (make test-gpu)", "llama": "The ~1B Llama (built once for both bench runs)",
          "speed": "Step time and tokens/s (hamu-ray bench)", "memory": "Peak memory vs hamu-ray plan"}


def header(torch, settings: dict, rehearse: bool) -> str:
    device = "CPU (rehearsal: nothing here is a GPU measurement)" if rehearse else torch.cuda.get_device_name(0)
    return (f"# hamu-ray GPU check, {time.strftime('%Y-%m-%d %H:%M %Z')}\n\n{device}; torch {torch.__version__}, "
            f"Python {sys.version.split()[0]}; commit {git_commit()}.\n")


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def run_logged(command: list[str], log: Path, limit_s: float) -> tuple[int | None, str]:
    """(exit status, or None when the time limit stopped it; the output), the output also in `log`.
    The command runs in its own process group, all of which the limit stops (bench workers, Ray)."""
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=limit_s)
            status = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, status = process.communicate()[0], None
    log.write_text(output)
    return status, output


def outcome(status: int | None, limit_s: float, output: str, log: Path) -> str:
    ended = f"stopped at its time limit ({limit_s} s)" if status is None else f"exit status {status}"
    tail = "\n".join(output.strip().splitlines()[-15:])
    return f"{ended}; last lines of {log.name}:\n\n```\n{tail}\n```"


def part_tests(out: Path, settings: dict, llama: Path) -> tuple[bool, str]:
    limit = settings["limit_s"]["tests"]
    log = out / "test-gpu.log"
    status, output = run_logged([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q",
                                 "-p", "no:cacheprovider", "--durations=5"], log, limit)
    lines = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    text = output.strip().splitlines()[-1] if status == 0 else outcome(status, limit, output, log)
    return status == 0, "\n".join([text, *lines])


def part_llama(out: Path, settings: dict, llama: Path) -> tuple[bool, str]:
    limit = settings["limit_s"]["llama"]
    log = out / "llama.log"
    code = (f"from hamu_ray.bench.cases import build_llama; from hamu_ray.plan import model_size; "
            f"d = build_llama({str(llama)!r}, {settings['size']!r}); print(model_size(d).total)")
    status, output = run_logged([sys.executable, "-c", code], log, limit)
    if status != 0:
        return False, outcome(status, limit, output, log)
    return True, f"Llama '{settings['size']}': {int(output.split()[-1]) / 1e6:.1f}M parameters."


def bench(out: Path, settings: dict, llama: Path, name: str, methods, zero: dict, warmup: int,
          steps: int) -> tuple[dict | None, str]:
    """Run the bench on the Llama in bf16 (plain torch and ZeRO-3 on one worker): its JSON, or
    None and why."""
    if not (llama / "config.json").is_file():
        return None, "not run: no Llama (its build failed)"
    limit = settings["limit_s"][name]
    log, written = out / f"bench-{name}.log", llama.parent / f"bench-{name}"
    status, output = run_logged(
        [sys.executable, "-m", "hamu_ray.cli", "bench", "--device", settings["device"], "--models", "llama-bf16",
         "--llama-dir", str(llama), "--methods", ",".join(methods), "--stages", "3", "--workers", "1",
         "--warmup", str(warmup), "--steps", str(steps), "--zero-config", json.dumps(zero),
         "--out", str(written)], log, limit)
    if status != 0:
        return None, outcome(status, limit, output, log)
    return json.loads((written / "bench.json").read_text()), ""


def config_name(row: dict) -> str:
    return "plain torch" if row["backend"] == "torch" else f"ZeRO-{row['stage']}, {row['workers']} GPU"


def part_speed(out: Path, settings: dict, llama: Path) -> tuple[bool, str]:
    result, why = bench(out, settings, llama, "speed", SPEED_METHODS, {}, settings["warmup"], settings["steps"])
    if result is None:
        return False, why
    (out / "bench-speed.json").write_text(json.dumps(result, indent=1))
    lines = [f"`hamu-ray bench --models llama-bf16 --methods {','.join(SPEED_METHODS)} --stages 3 --workers 1 "
             f"--warmup {settings['warmup']} --steps {settings['steps']}`; {result['where']}\n",
             "| configuration | method | median ms [IQR] | × one-backward GradDiff | tokens/s |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else ""
        lines.append(f"| {config_name(r)} | {r['method']} | {r['ms']:.1f} [{r['q1_ms']:.1f}–{r['q3_ms']:.1f}] "
                     f"| {ratio} | {r['tokens_per_step'] / r['ms'] * 1e3:,.0f} |")
    checks = "; ".join(f"{name}: {value:.1e}" for name, value in result["checks"].items())
    return True, "\n".join(lines) + f"\n\nMax |Δθ| checks: {checks}."


def part_memory(out: Path, settings: dict, llama: Path) -> tuple[bool, str]:
    result, why = bench(out, settings, llama, "memory", ["hamu-q"], OFFLOAD, 1, 2)
    if result is None:
        return False, why
    from hamu_ray import plan
    from hamu_ray.engine.config import parse_config

    engine_row = next(r for r in result["rows"] if r["backend"] == "deepspeed")
    job = parse_config({"data": {"forget": "forget.parquet", "retain": "retain.parquet"},
                        "model": {"kind": "causal_lm", "path": str(llama), "dtype": "bf16"},
                        "method": {"name": "hamu-q", "hparams": HAMU},
                        "train": {"lr": 0.01, "bf16": True, "zero_stage": 3, "offload": "optimizer"},
                        "cluster": {"num_workers": 1}, "output_dir": str(out / "unused")})
    planned = plan.plan(job, gpus_per_node=1, batch_rows=BENCH_ROWS, seq_len=longest_row(llama))
    if engine_row["alloc_peak_mib"] is None:
        return True, f"(rehearsal: no GPU memory to measure) plan: {planned.total_gpu_gb} GB"
    measured = engine_row["alloc_peak_mib"] * 2**20 / 1e9
    return True, "\n".join([
        "One HAMU-Q engine, ZeRO-3 with optimizer offload, bf16, 1 GPU (`hamu-ray bench --methods hamu-q "
        f"--zero-config '{json.dumps(OFFLOAD)}'`):\n",
        "| | GB |", "|---|---|",
        f"| measured: most allocated in a step (torch.cuda.max_memory_allocated) | {measured:.2f} |",
        f"| measured: of which above what the step started with (activations, g_r, g_f) | "
        f"{engine_row['step_peak_mib'] * 2**20 / 1e9:.2f} |",
        f"| measured: reserved by the caching allocator at the end | {engine_row['peak_mib'] * 2**20 / 1e9:.2f} |",
        f"| plan: total | {planned.total_gpu_gb} |",
        f"| plan: model states (DeepSpeed's estimate, an Adam bound) | {planned.model_states_gpu_gb} |",
        f"| plan: HAMU's gradient copies | {planned.hamu_gpu_gb} |",
        f"| plan: activations ({BENCH_ROWS} rows × the longest row, an upper bound) | {planned.activations_gb} |",
        f"| plan: ZeRO-3 working memory (parameters held gathered, reduction buffers) | {planned.working_gb} |",
        f"\nMeasured ÷ planned: {measured / planned.total_gpu_gb:.2f}."])


def longest_row(llama: Path) -> int:
    """The longest country QA row in the Llama's tokens: no batch of the bench is wider."""
    import pyarrow as pa

    from hamu_ray.pipeline import country_qa
    from hamu_ray.tasks.causal_lm import TextData, tokenize_batch

    rows = [r for rows in country_qa.build(forget_share=0.1).values() for r in rows]
    table = tokenize_batch(pa.Table.from_pylist(rows), path=str(llama), text=TextData().model_dump(), refusals=False)
    return max(len(ids) for ids in table.column("input_ids").to_pylist())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
