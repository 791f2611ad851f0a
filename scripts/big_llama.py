"""A 100M+ Llama through `hamu-ray unlearn` on this machine's CPU workers, measured against the plan.

Builds a Llama from a config (default 12 layers × 768, MLP 3072, 12 heads, an 8192-row vocabulary:
126M parameters; its tokenizer trained on the built-in country QA text, the embedding larger than
the tokenizer as real checkpoints' often are), saves it with `save_pretrained`, writes the country
QA forget/retain rows, and runs one unlearning job per case on 2 workers at ZeRO-3 in one local Ray
(with $HAMU_RAY_HOST_MEMORY=release unless set: the workers' RSS then follows their live tensors):
HAMU-Q (two backwards), GradDiff (two backwards, the engine's), implicit surgery (one backward) and
FT (retain only, one backward), in fp32 and bf16, with and without optimizer offload. Per case:
median step time (slowest rank, first step left out), tokens/s, peak RSS per worker, and
`hamu-ray plan --device cpu`'s prediction of the model's share of it (hamu_ray.plan.plan, at the
rows per backward and the longest batch the job saw). Then the evaluation of the model on
forget, retain and holdout rows side by side: one Ray task on one CPU (lm_evaluate.score_model,
the pipelines' way before jobs evaluated) and an evaluation-only job on the 2 ZeRO-3 workers
(driver.run_evaluation, the code an unlearning job's `evaluation:` runs after its last step), fp32,
with the largest difference between their per-example numbers. Writes OUT/big_llama.json and
OUT/big_llama.md.

    python scripts/big_llama.py [--out runs/big_llama] [--steps 6] [--cases hamu-q-fp32,...]
        [--layers 12 --hidden 768 --intermediate 3072 --heads 12 --vocab 8192] [--cases none]

OUT must not exist (nothing is overwritten); the model is kept in OUT/model. `--allocator` on a
finished OUT runs HAMU-Q fp32 in two plain gloo processes with glibc's default allocator
behaviour and with the fixed mmap threshold the workers set, alternating, twice each
(OUT/allocator.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

CASES = {  # name: (method, dtype, offload)
    "hamu-q-fp32": ("hamu-q", "fp32", "none"),
    "hamu-q-fp32-offload": ("hamu-q", "fp32", "optimizer"),
    "hamu-q-bf16": ("hamu-q", "bf16", "none"),
    "hamu-q-bf16-offload": ("hamu-q", "bf16", "optimizer"),
    "gdiff-fp32": ("gdiff", "fp32", "none"),
    "surgery-implicit-fp32": ("surgery-implicit", "fp32", "none"),
    "ft-fp32": ("ft", "fp32", "none"),
    "ft-bf16": ("ft", "bf16", "none"),
}
HPARAMS = {"hamu-q": {"constraint": 0.001, "radius": 0.5, "stop_on_criterion": False, "on_infeasible": "ascent"}}
BATCH, MAX_LENGTH, WORKERS = 4, 64, 2  # rows per set per worker per step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/big_llama")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--eval-rows", type=int, default=32, help="rows of each set the evaluation scores")
    parser.add_argument("--allocator", action="store_true", help="only the host allocator side by side: "
                        "HAMU-Q fp32 in two gloo processes with glibc's default and with the fixed mmap "
                        "threshold workers set (usage.return_freed_memory), alternating, twice each")
    parser.add_argument("--render", action="store_true", help="only the plans and the table again, from "
                                                               "OUT/big_llama.json")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.render:
        results = with_plans(json.loads((out / "big_llama.json").read_text()), out, args.steps)
        (out / "big_llama.json").write_text(json.dumps(results, indent=2))
        (out / "big_llama.md").write_text(table(results))
        print(table(results))
        return 0
    cases = [] if args.cases == "none" else args.cases.split(",")  # none: the evaluation only
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"--cases: unknown {sorted(unknown)}; choose from {', '.join(CASES)}")
    if args.allocator:
        return allocator_side_by_side(out, args.steps)
    if out.exists():
        print(f"--out {out}: exists; give a new directory (nothing is overwritten)", file=sys.stderr)
        return 2
    out.mkdir(parents=True)
    from hamu_ray.engine.usage import HOST_MEMORY_ENV

    os.environ.setdefault(HOST_MEMORY_ENV, "release")  # RSS follows the live tensors the plan counts
    model_dir, sets = build_model(out, args), write_sets(out)
    results = {"model": describe_model(model_dir), "cases": [], "evaluation": None,
               "batch_rows_per_set_per_worker": BATCH, "max_length": MAX_LENGTH, "workers": WORKERS}
    import ray

    from hamu_ray.engine import driver

    with driver.ray_session(job(out, model_dir, sets, "ft", "fp32", "none", args.steps).cluster):
        for name in cases:
            results["cases"].append(run_case(out, model_dir, sets, name, args.steps))
            (out / "big_llama.json").write_text(json.dumps(results, indent=2))
            print(json.dumps(results["cases"][-1]), flush=True)
        results["evaluation"] = evaluation_side_by_side(out, model_dir, sets, args.eval_rows)
        print(json.dumps(results["evaluation"]), flush=True)
        ray.shutdown()
    (out / "big_llama.json").write_text(json.dumps(results, indent=2))
    results = with_plans(results, out, args.steps)
    (out / "big_llama.json").write_text(json.dumps(results, indent=2))
    (out / "big_llama.md").write_text(table(results))
    print(table(results))
    return 0


def build_model(out: Path, args) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hamu_ray.pipeline import country_qa
    from hamu_ray.tasks import small_llama

    rows = [r for rows in country_qa.build(forget_share=0.1).values() for r in rows]
    tokenizer = small_llama.train_tokenizer([f"{r['question']} {r['answer']}" for r in rows], args.vocab)
    config = LlamaConfig(vocab_size=max(args.vocab, len(tokenizer)), hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=2 * MAX_LENGTH, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    directory = out / "model"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def describe_model(model_dir: Path) -> dict:
    from hamu_ray import plan

    size = plan.model_size(model_dir)
    return {"path": str(model_dir), "params": size.total, "trainable": size.trainable}


def write_sets(out: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hamu_ray.pipeline import country_qa

    paths = {}
    for name, rows in country_qa.build(forget_share=0.1).items():
        paths[name] = out / "data" / f"{name}.parquet"
        paths[name].parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist([{"question": r["question"], "answer": r["answer"]}
                                             for r in rows]), paths[name])
    return paths


def job(out: Path, model_dir: Path, sets: dict, method: str, dtype: str, offload: str, steps: int):
    from hamu_ray.engine.config import parse_config

    data = {"retain": str(sets["retain"]), "retain_batch_size": BATCH, "forget_batch_size": BATCH,
            "text": {"format": "qa", "max_length": MAX_LENGTH}}
    if method != "ft":
        data["forget"] = str(sets["forget"])
    method_section = {"name": method}
    if method in HPARAMS:
        method_section["hparams"] = HPARAMS[method]
    return parse_config({
        "data": data,
        "model": {"kind": "causal_lm", "path": str(model_dir), "dtype": dtype},
        "method": method_section,
        "train": {"lr": 1e-4, "max_steps": steps, "zero_stage": 3, "bf16": dtype == "bf16",
                  "offload": offload, "progress_every": 1},
        "cluster": {"num_workers": WORKERS},
        "output_dir": str(out / "jobs" / f"{method}-{dtype}-{offload}"),
    })


def run_case(out: Path, model_dir: Path, sets: dict, name: str, steps: int) -> dict:
    from hamu_ray import plan
    from hamu_ray.engine import driver

    method, dtype, offload = CASES[name]
    cfg = job(out, model_dir, sets, method, dtype, offload, steps)
    start = time.perf_counter()
    result = driver.run_unlearning(cfg, progress=name)
    wall = time.perf_counter() - start
    used = json.loads((result.output_dir / "summary.json").read_text())["usage"]
    increments = [p - b for p, b in zip(used["peak_rss_gb"], used["rss_before_model_gb"])]
    return {"case": name, "method": method, "dtype": dtype, "offload": offload, "steps": result.steps,
            "wall_s": round(wall, 1), **used, "model_rss_gb": [round(x, 3) for x in increments]}


def with_plans(results: dict, out: Path, steps: int) -> dict:
    """Each case's `hamu-ray plan --device cpu` for the job it ran (reads config.json only)."""
    from hamu_ray import plan

    sets = {name: out / "data" / f"{name}.parquet" for name in ("forget", "retain", "holdout")}
    for case in results["cases"]:
        cfg = job(out, Path(results["model"]["path"]), sets, case["method"], case["dtype"], case["offload"], steps)
        case["plan"] = plan.as_dict(plan.plan(cfg, device="cpu", gpus_per_node=WORKERS, batch_rows=BATCH,
                                              seq_len=case["longest_batch"]))
    return results


def allocator_side_by_side(out: Path, steps: int) -> int:
    """OUT's model and sets (a finished run): peak RSS and median step of each arm."""
    import socket
    import statistics

    import torch

    results = []
    for arm in ("glibc default", "fixed threshold") * 2:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.start_processes(allocator_rank, args=(port, str(out), arm, steps),
                                              nprocs=WORKERS, start_method="spawn")
        record = json.loads((out / "allocator-rank0.json").read_text())
        results.append({"arm": arm, "peak_rss_gb": round(record["peak_rss_bytes"] / 1e9, 3),
                        "median_step_s": round(statistics.median(record["step_s"][1:]), 2)})
        print(json.dumps(results[-1]), flush=True)
    (out / "allocator.json").write_text(json.dumps(results, indent=2))
    return 0


def allocator_rank(rank: int, port: int, out: str, arm: str, steps: int) -> None:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORKERS), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine import usage, worker
    from hamu_ray.engine.grads import DeepSpeedGrads
    from hamu_ray.tasks.causal_lm import tokenize_batch

    os.environ[usage.HOST_MEMORY_ENV] = "keep" if arm == "glibc default" else "release"
    eng.import_deepspeed().init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    root = Path(out)
    sets = {name: root / "data" / f"{name}.parquet" for name in ("forget", "retain")}
    cfg = job(root, root / "model", sets, "hamu-q", "fp32", "none", steps)
    task = worker.ready_task(cfg)
    batches = []  # tokenised first, as Ray Data hands them to a worker: the tokenizer is not the model's memory
    for step in range(steps):
        pair = []
        for name in ("retain", "forget"):
            table = pq.read_table(sets[name]).slice((step * WORKERS + rank) * BATCH, BATCH)
            tokens = tokenize_batch(table, path=str(root / "model"), text=task.text.model_dump(), refusals=False)
            pair.append(task.make_batch({k: np.array(tokens.column(k).to_pylist(), dtype=object)
                                         for k in ("input_ids", "labels")}))
        batches.append(pair)
    used = usage.Usage()
    engine, losses = worker.build(cfg, task)
    take_step = worker.step_function(cfg, DeepSpeedGrads(engine), *losses, [])
    for step, pair in enumerate(batches):
        used.timed(take_step, step + 1, *pair)
    if rank == 0:
        (root / "allocator-rank0.json").write_text(json.dumps(used.record(torch.device("cpu"))))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def evaluation_side_by_side(out: Path, model_dir: Path, sets: dict, rows: int) -> dict:
    """`rows` rows of forget, retain and holdout scored by one Ray task on one CPU and by an
    evaluation-only job on the workers (its scoring alone, and its whole run: the workers' start
    and the model's load included), and the largest relative difference of their numbers."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray

    from hamu_ray.engine import driver
    from hamu_ray.engine.config import parse_config
    from hamu_ray.pipeline import lm_evaluate

    sliced = {}
    for name in ("forget", "retain", "holdout"):
        sliced[name] = str(sets[name].with_name(f"{name}-{rows}.parquet"))
        pq.write_table(pq.read_table(sets[name]).slice(0, rows), sliced[name])
    text = {"format": "qa", "max_length": MAX_LENGTH}
    start = time.perf_counter()
    alone = ray.get(ray.remote(num_cpus=1)(lm_evaluate.score_model).remote(str(model_dir), sliced, text))
    one_cpu = time.perf_counter() - start
    raw = job(out, model_dir, sets, "hamu-q", "fp32", "none", 1).model_dump()
    arms = {}
    for arm, whole in (("whole copy per worker", True), ("partitioned, in lockstep", False)):
        cfg = parse_config({**raw, "evaluation": {"sets": sliced, "whole_model": whole}})
        start = time.perf_counter()
        evaluated = driver.run_evaluation(cfg)
        whole_job = time.perf_counter() - start
        differences = [float(np.max(np.abs(evaluated.scores[n][k] - v) / np.maximum(np.abs(v), 1e-12)))
                       for n, per_set in alone.items() for k, v in per_set.items() if k != "rouge"]
        arms[arm] = {"scoring_s": round(evaluated.seconds, 1), "job_s": round(whole_job, 1),
                     "max_relative_difference": max(differences),
                     "rouge_identical": all(np.array_equal(evaluated.scores[n]["rouge"], s["rouge"])
                                            for n, s in alone.items())}
        print(json.dumps({arm: arms[arm]}), flush=True)
    return {"rows_per_set": rows, "one_cpu_task_s": round(one_cpu, 1), "workers": WORKERS, "arms": arms}


def table(results: dict) -> str:
    """The cases' figures; "the model's" memory is peak RSS minus the RSS before the model was built
    (the libraries' share), which is what the plan predicts."""
    m = results["model"]
    ft = {c["dtype"]: c["median_step_s"] for c in results["cases"] if c["method"] == "ft" and c["offload"] == "none"}
    lines = [f"Llama {m['params'] / 1e6:.1f}M parameters, {results['workers']} CPU workers, ZeRO-3, "
             f"{results['batch_rows_per_set_per_worker']} rows per set per worker per step, "
             f"max_length {results['max_length']}", "",
             "| case | median step (s) | step / FT's | tokens/s | peak RSS per worker (GB) | the model's (GB) "
             "| plan (GB) | plan / measured |",
             "|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        model = max(c["model_rss_gb"])
        planned = c["plan"]["total_gpu_gb"] if c.get("plan") else None
        versus = f"{c['median_step_s'] / ft[c['dtype']]:.2f}" if c["dtype"] in ft else "–"
        lines.append(f"| {c['case']} | {c['median_step_s']:.2f} | {versus} | {c['tokens_per_s']:.0f} | "
                     f"{' / '.join(f'{x:.2f}' for x in c['peak_rss_gb'])} | {model:.2f} | "
                     + (f"{planned:.2f} | {planned / model:.2f} |" if planned is not None else "– | – |"))
    if results.get("evaluation"):
        e = results["evaluation"]
        lines += ["", f"Evaluation of forget, retain and holdout, {e['rows_per_set']} rows each (fp32), "
                  f"one Ray task on one CPU: {e['one_cpu_task_s']} s. The evaluation-only job on {e['workers']} "
                  "ZeRO-3 workers:", "", "| workers score with | scoring (s) | the job, with start and load (s) "
                  "| per-example numbers vs one task (max relative difference) | ROUGE |", "|---|---|---|---|---|"]
        lines += [f"| {arm} | {a['scoring_s']} | {a['job_s']} | {a['max_relative_difference']:.1e} | "
                  f"{'identical' if a['rouge_identical'] else 'DIFFERENT'} |" for arm, a in e["arms"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
