"""Running the matrix: plain torch in this process, then each worker count in its own processes.

Plain torch (TorchGrads, one process) runs first: its rows are the single-process timings and its
final parameters the reference every DeepSpeed row is compared with (max |Δθ| after the same
steps on the same global batches). Each worker count is then a group of spawned processes on
gloo (CPU) or NCCL (CUDA) that runs every (model, ZeRO stage, method) case in turn, each case a
fresh engine on a fresh, identically seeded model. Ray is not involved: it adds nothing to a
step's time, and the engine's step is what is timed.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hamu_ray.bench import cases
from hamu_ray.bench import BASELINE, METHODS, MODELS


@dataclass
class BenchSpec:
    models: list[str] = field(default_factory=lambda: list(MODELS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    workers: list[int] = field(default_factory=lambda: [1, 2])
    steps: int = 20  # timed steps per case, after warmup
    warmup: int = 3
    hidden: int = 1024  # MLP width
    batch: int = 64  # MLP global rows per set and step
    lm_batch: int = 8  # LM global rows per set and step
    llama_size: str = "tiny"
    llama_dir: str = ""  # a saved Llama to time instead of building one of llama_size
    device: str = "cpu"
    zero: dict = field(default_factory=dict)  # merged into every zero_optimization section (levers)
    model_dir: str = ""  # where the Llama is built (set by run)

    def case(self, model: str) -> cases.ModelCase:
        total = self.warmup + self.steps
        if model == "mlp":
            return cases.mlp_case(self.hidden, self.batch, total)
        return cases.llama_case(Path(self.model_dir), model.removeprefix("llama-"), self.lm_batch, total)


class Laps:
    """Per-phase wall time of each step (the step functions call it at each phase's end). On a
    GPU each lap synchronises, so the phases add up to the step."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.steps: list[dict[str, float]] = []

    def start(self) -> None:
        self.sync()
        self.current: dict[str, float] = {}
        self.begin = self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.current[name] = self.current.get(name, 0.0) + now - self.last
        self.last = now

    def finish(self) -> None:
        self("other")
        self.current["total"] = self.last - self.begin
        self.steps.append(self.current)


def interleaved(steps: dict[str, Callable], pairs: list, warmup: int, device: torch.device) -> dict:
    """Every method steps in turn on the same batch (A1 B1 C1 A2 B2 …), so a drift in the
    machine's load touches every method alike. Per method: median and quartiles of the step time
    after warm-up, the median of each phase, the steps the rule stopped, and on a GPU the most
    memory a step allocated beyond what was allocated before it, and the most allocated in all
    during a step (every engine of the process counted: one method alone gives its own peak)."""
    laps = {name: Laps(device) for name in steps}
    stopped = dict.fromkeys(steps, 0)
    step_peak = dict.fromkeys(steps, 0.0)
    alloc_peak = dict.fromkeys(steps, 0.0)
    for pair in pairs:
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            laps[name].start()
            stopped[name] += step(pair, laps[name])["stopped"]
            laps[name].finish()
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                step_peak[name] = max(step_peak[name], (peak - before) / 2**20)
                alloc_peak[name] = max(alloc_peak[name], peak / 2**20)
    cuda = device.type == "cuda"
    return {name: {**summarise(laps[name].steps[warmup:]), "stopped_steps": stopped[name],
                   "step_peak_mib": step_peak[name] if cuda else None,
                   "alloc_peak_mib": alloc_peak[name] if cuda else None}
            for name in steps}


def summarise(kept: list[dict[str, float]]) -> dict:
    totals = sorted(s["total"] * 1e3 for s in kept)
    q1, _, q3 = statistics.quantiles(totals, n=4) if len(totals) > 1 else (totals[0],) * 3
    phases = {name: statistics.median(s.get(name, 0.0) for s in kept) * 1e3
              for name in dict.fromkeys(n for s in kept for n in s) if name != "total"}
    return {"ms": statistics.median(totals), "q1_ms": q1, "q3_ms": q3, "phases_ms": phases,
            "step_ms": [s["total"] * 1e3 for s in kept]}


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: what the caching allocator holds after a configuration's run (its high-water mark);
    CPU: the process's peak RSS so far (a high-water mark over every configuration it ran)."""
    if device.type == "cuda":
        return torch.cuda.memory_reserved(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def max_abs_diff(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(float((state[k].float().cpu() - v.float()).abs().max()) for k, v in reference.items())


# ---- plain torch ---------------------------------------------------------------------------

def torch_rows(spec: BenchSpec, model: str, ref_dir: Path) -> list[dict]:
    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine.grads import TorchGrads

    device = torch.device(spec.device)
    case = spec.case(model)
    modules, grads, steps = {}, {}, {}
    for method in spec.methods:
        module = modules[method] = case.build(eng.deepspeed_config(stage=0, lr=case.lr, micro_batch_size=1)).to(device)
        grads[method] = KeptBytes(TorchGrads(module, torch.optim.SGD(
            [p for p in module.parameters() if p.requires_grad], lr=case.lr)))
        steps[method] = cases.make_step(method, case, module, grads[method], 1)
    results = interleaved(steps, case.batches(0, 1), spec.warmup, device)
    rows = []
    for method in spec.methods:
        state = {k: v.detach().cpu().float().clone() for k, v in modules[method].state_dict().items()}
        torch.save(state, ref_dir / f"{model}-{method}.pt")
        rows.append(row(case, model, "torch", None, 1, method, results[method], peak_memory_mib(device),
                        grads[method].bytes, 0.0))
        rows[-1]["trainable_params"] = sum(p.numel() for p in modules[method].parameters() if p.requires_grad)
    return rows


class KeptBytes:
    """The gradient access, counting the bytes of the g_r a two-backward step keeps while g_f is
    computed (this rank's piece, as taken)."""

    def __init__(self, grads):
        self.grads, self.bytes = grads, 0

    def __getattr__(self, name: str):
        return getattr(self.grads, name)

    def take_local_grads(self) -> list[torch.Tensor]:
        taken = self.grads.take_local_grads()
        self.bytes = sum(g.numel() * g.element_size() for g in taken)
        return taken


def row(case, model, backend, stage, workers, method, result, peak_mib, kept, diff) -> dict:
    return {"model": model, "backend": backend, "stage": stage, "workers": workers, "method": method,
            **result, "peak_mib": peak_mib, "g_r_bytes": kept, "max_abs_diff_vs_torch": diff,
            "rows_per_step": case.rows_per_step, "tokens_per_step": case.tokens_per_step,
            "bf16": case.bf16}


# ---- DeepSpeed worker groups ---------------------------------------------------------------

def _world(rank: int, world: int, port: int, spec_dict: dict, ref_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    spec = BenchSpec(**spec_dict)
    if spec.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    else:
        torch.cuda.set_device(rank)
    import torch.distributed as dist

    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine.grads import DeepSpeedGrads

    deepspeed = eng.import_deepspeed()

    deepspeed.init_distributed(dist_backend="gloo" if spec.device == "cpu" else "nccl",
                               auto_mpi_discovery=False)
    device = torch.device(spec.device, rank) if spec.device == "cuda" else torch.device("cpu")
    rows = []
    for model in spec.models:
        case = spec.case(model)
        pairs = case.batches(rank, world)
        for stage in spec.stages:
            engines, grads, steps = {}, {}, {}
            ds_config = eng.deepspeed_config(stage=stage, lr=case.lr, bf16=case.bf16,
                                             micro_batch_size=max(1, case.rows_per_step // 2 // world))
            ds_config["zero_optimization"].update(spec.zero)
            for method in spec.methods:
                engine = engines[method] = eng.initialize(case.build(ds_config), ds_config)
                grads[method] = KeptBytes(DeepSpeedGrads(engine))
                steps[method] = cases.make_step(method, case, engine, grads[method], world)
            results = interleaved(steps, pairs, spec.warmup, device)
            reduction_ms = gradient_reduction_ms(engines[spec.methods[0]], device)
            for method in spec.methods:
                state = eng.full_state_dict(engines[method])
                reference = torch.load(Path(ref_dir) / f"{model}-{method}.pt")
                rows.append(row(case, model, "deepspeed", stage, world, method, results[method],
                                peak_memory_mib(device), grads[method].bytes, max_abs_diff(state, reference)))
                rows[-1]["gradient_all_reduce_ms"] = reduction_ms
                if rank == 0:
                    print(json.dumps(progress_line(rows[-1])), flush=True)
            del engines, grads, steps
            gc.collect()
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:  # a case's time is its slowest rank's; memory its largest
        merged = []
        for per_rank in zip(*gathered):
            first = dict(per_rank[0])
            slowest = max(per_rank, key=lambda r: r["ms"])
            first.update({k: slowest[k] for k in ("ms", "q1_ms", "q3_ms", "phases_ms")})
            first["peak_mib"] = max(r["peak_mib"] for r in per_rank)
            first["g_r_bytes"] = max(r["g_r_bytes"] for r in per_rank)
            merged.append(first)
        Path(out, f"world{world}.json").write_text(json.dumps(merged))
    dist.barrier()
    dist.destroy_process_group()


def progress_line(r: dict) -> dict:
    return {k: (float(f"{v:.3g}") if isinstance(v, float) else v)
            for k, v in r.items() if k in ("model", "stage", "workers", "method", "ms", "max_abs_diff_vs_torch")}


def gradient_reduction_ms(engine, device: torch.device, repeats: int = 5) -> float:
    """Median time of one all_reduce of a buffer the size of this rank's whole gradient: what a
    second gradient reduction costs at least on this link (a collective; 0 with one worker)."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return 0.0
    numel = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                for p in engine.module.parameters() if p.requires_grad)
    buffer = torch.zeros(numel, dtype=torch.bfloat16 if engine.bfloat16_enabled() else torch.float32,
                         device=device)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def deepspeed_rows(spec: BenchSpec, world: int, ref_dir: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        torch.multiprocessing.start_processes(_world, args=(world, port, asdict(spec), str(ref_dir), out),
                                              nprocs=world, start_method="spawn")
        return json.loads(Path(out, f"world{world}.json").read_text())


def run(spec: BenchSpec, progress=lambda row: None) -> tuple[list[dict], dict[str, float]]:
    """Every row of the matrix (plain torch first) and the equivalence checks."""
    if spec.device == "cuda" and max(spec.workers) > torch.cuda.device_count():
        raise ValueError(f"--workers {max(spec.workers)} needs as many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        if any(m.startswith("llama-") for m in spec.models):
            spec.model_dir = spec.llama_dir or str(cases.build_llama(Path(tmp) / "llama", spec.llama_size))
        ref_dir = Path(tmp) / "reference"
        ref_dir.mkdir()
        if spec.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 2)
        rows = []
        for model in spec.models:
            rows += torch_rows(spec, model, ref_dir)
            for r in rows[-len(spec.methods):]:
                progress(r)
        checks = {f"{model}: gdiff-1bwd vs gdiff-2bwd, plain torch": max_abs_diff(
            torch.load(ref_dir / f"{model}-gdiff-1bwd.pt"), torch.load(ref_dir / f"{model}-gdiff-2bwd.pt"))
            for model in spec.models if {"gdiff-1bwd", "gdiff-2bwd"} <= set(spec.methods)}
        for world in spec.workers:
            rows += deepspeed_rows(spec, world, ref_dir)
    trainable = {r["model"]: r["trainable_params"] for r in rows if r["backend"] == "torch"}
    for r in rows:
        r["trainable_params"] = trainable[r["model"]]
    for model in spec.models:
        for method in ("gdiff-1bwd", "gdiff-2bwd", "hamu-q"):
            compared = [r["max_abs_diff_vs_torch"] for r in rows if r["model"] == model
                        and r["method"] == method and r["backend"] == "deepspeed"]
            if compared:
                checks[f"{model}: {method}, every DeepSpeed row vs plain torch"] = max(compared)
    return with_ratios(rows), checks


def with_ratios(rows: list[dict]) -> list[dict]:
    """ratio: the median over steps of this step's time / gdiff-1bwd's on the same batch, in the
    same (model, backend, stage, workers). The steps ran in turn, so each pair shares the
    machine's load at that moment: paired ratios drift less than a ratio of medians."""
    base = defaultdict(lambda: None, {_config(r): r["step_ms"] for r in rows if r["method"] == BASELINE})
    for r in rows:
        pairs = base[_config(r)]
        r["ratio"] = statistics.median(t / b for t, b in zip(r["step_ms"], pairs)) if pairs else None
    return rows


def _config(r: dict) -> tuple:
    return r["model"], r["backend"], r["stage"], r["workers"]
