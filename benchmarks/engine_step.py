"""Wall time per unlearning step and peak memory: 1 plain-torch process vs 2 DeepSpeed ZeRO-3 ranks.

Same model, same global batches, GDiff and HAMU-Q side by side in one run; prints a table.
    python benchmarks/engine_step.py [--steps 12] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

RULES = {"gdiff": ("gdiff", {}), "hamu-q": ("hamu-q", {"constraint": 1e-4, "radius": 0.05})}
LR, BATCH = 0.05, 64


def model_and_batches(hidden: int, steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    gen = torch.Generator().manual_seed(1)
    batches = [((torch.randn(BATCH, 784, generator=gen), torch.randint(10, (BATCH,), generator=gen)),
                (torch.randn(BATCH, 784, generator=gen), torch.randint(10, (BATCH,), generator=gen)))
               for _ in range(steps)]
    return model, batches


def time_steps(grads, forward, batches, rule, rank=0, world=1):
    from hamu_ray.engine.step import SumAcrossRanks, unlearning_step

    times = []
    for (xr, yr), (xf, yf) in batches:
        xr, yr, xf, yf = xr[rank::world], yr[rank::world], xf[rank::world], yf[rank::world]
        start = time.perf_counter()
        unlearning_step(grads, rule, lr=LR, reduce_stats=SumAcrossRanks() if world > 1 else None,
                        retain_loss=lambda: F.cross_entropy(forward(xr), yr),
                        forget_loss=lambda: F.cross_entropy(forward(xf), yf))
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first steps warm up allocators and comm buffers


def single_process(args, rule_name):
    from hamu_ray.engine.grads import TorchGrads
    from hamu_ray.rules import get_rule

    model, batches = model_and_batches(args.hidden, args.steps)
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    return time_steps(grads, model, batches, get_rule(RULES[rule_name][0], **RULES[rule_name][1]))


def _rank(rank, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)  # two ranks on two cores
    import deepspeed
    import torch.distributed as dist

    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine.grads import DeepSpeedGrads
    from hamu_ray.rules import get_rule

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rows = {}
    for name, (rule, hparams) in RULES.items():
        model, batches = model_and_batches(args.hidden, args.steps)
        engine = eng.initialize(model, eng.deepspeed_config(stage=3, lr=LR, micro_batch_size=BATCH // 2))
        rows[name] = time_steps(DeepSpeedGrads(engine), engine, batches, get_rule(rule, **hparams), rank, 2)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save({"times": rows, "peak_mib": peak_mib}, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    params = sum(p.numel() for p in model_and_batches(args.hidden, 1)[0].parameters())
    print(f"MLP 784-{args.hidden}-{args.hidden}-10 ({params / 1e6:.2f}M params), global batch "
          f"{BATCH}+{BATCH}, median of {args.steps - 2} steps, {os.cpu_count()} CPU cores")
    torch.set_num_threads(2)
    single = {name: single_process(args, name) for name in RULES}
    single_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        torch.multiprocessing.start_processes(_rank, args=(port, args, out), nprocs=2, start_method="spawn")
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(2)]
    print(f"{'rule':8} {'1 process (ms)':>15} {'2 ZeRO-3 ranks (ms)':>20} {'ratio':>6}")
    for name in RULES:
        dist_ms = max(r["times"][name] for r in ranks) * 1e3
        print(f"{name:8} {single[name] * 1e3:15.1f} {dist_ms:20.1f} {dist_ms / (single[name] * 1e3):6.2f}")
    print(f"peak RSS: 1 process {single_peak:.0f} MiB; ZeRO-3 ranks "
          + ", ".join(f"{r['peak_mib']:.0f} MiB" for r in ranks))


if __name__ == "__main__":
    main()
