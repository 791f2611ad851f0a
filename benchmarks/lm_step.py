"""Step time and peak memory of HAMU-Q vs GDiff on the tiny Llama, 1 and 2 DeepSpeed ZeRO-3 ranks.

The causal-LM task end to end below the loop: the model loaded with from_pretrained under ZeRO-3,
real QA rows tokenised by the task, the engine's step. Each (method, ranks) pair runs in fresh
processes so that peak RSS is its own. Prints a table.
    python benchmarks/lm_step.py [--steps 12] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.lm_fixtures

METHODS = {"gdiff": {"name": "gdiff"},
           "hamu-q": {"name": "hamu-q", "hparams": {"constraint": 0.02, "radius": 0.2}}}
LR = 0.1


def job(model_dir: str, method: str, batch: int, world: int):
    from hamu_ray.engine.config import parse_config

    return parse_config({
        "data": {"forget": "f.parquet", "retain": "r.parquet", "retain_batch_size": batch // world,
                 "forget_batch_size": batch // world},
        "model": {"kind": "causal_lm", "path": model_dir}, "method": METHODS[method],
        "train": {"lr": LR, "zero_stage": 3}, "output_dir": "unused"})


def _rank(rank: int, world: int, port: int, model_dir: str, method: str, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    import deepspeed
    import torch.distributed as dist

    from hamu_ray import objectives
    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine.grads import DeepSpeedGrads
    from hamu_ray.engine.step import SumAcrossRanks, unlearning_step
    from hamu_ray.rules import get_rule
    from hamu_ray.tasks.causal_lm import CausalLMTask
    from tests.lm_fixtures import lm_batch, qa_rows

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = job(model_dir, method, args.batch, world)
    task = CausalLMTask(cfg)
    ds_config = eng.deepspeed_config(stage=3, lr=LR, micro_batch_size=args.batch // world)
    engine = eng.initialize(task.build(ds_config), ds_config)
    built_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = qa_rows()

    def batch(offset: int) -> dict:
        return lm_batch(task, [rows[(offset + i) % len(rows)] for i in range(args.batch)][rank::world])

    retain_loss, forget_loss = objectives.loss_fns(cfg.method.spec, {}, lambda b: task.scores(engine, b), None)
    rule, grads, times = get_rule(cfg.method.rule_name, **cfg.method.hparams), DeepSpeedGrads(engine), []
    for step in range(args.steps):
        retain, forget = batch(2 * args.batch * step), batch(2 * args.batch * step + args.batch)
        start = time.perf_counter()
        unlearning_step(grads, rule, lr=LR, retain_loss=lambda: retain_loss(retain),
                        forget_loss=lambda: forget_loss(forget), reduce_stats=SumAcrossRanks())
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save({"ms": statistics.median(times[2:]) * 1e3, "peak_mib": peak_mib, "built_mib": built_mib},
               f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run(model_dir: str, method: str, world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        torch.multiprocessing.start_processes(_rank, args=(world, port, model_dir, method, args, out),
                                              nprocs=world, start_method="spawn")
        return [torch.load(f"{out}/rank{r}.pt") for r in range(world)]


def main():
    from tests.lm_fixtures import build_tiny_lm

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="global retain (and forget) rows per step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_lm(Path(tmp) / "tiny-llama"))
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        print(f"tiny Llama ({params / 1e6:.2f}M params), ZeRO-3 fp32 on gloo, global batch "
              f"{args.batch}+{args.batch} QA rows, median of {args.steps - 2} steps, {os.cpu_count()} CPU cores")
        print(f"{'method':8} {'ranks':>5} {'step (ms)':>10} {'peak RSS/rank (MiB)':>20} {'after build (MiB)':>18}")
        for world in (1, 2):
            for method in METHODS:
                ranks = run(model_dir, method, world, args)
                print(f"{method:8} {world:5d} {max(r['ms'] for r in ranks):10.1f} "
                      f"{max(r['peak_mib'] for r in ranks):20.0f} {max(r['built_mib'] for r in ranks):18.0f}")


if __name__ == "__main__":
    main()
