"""What a job used: each worker's memory high-water mark and its steps' wall time.

Measured so that `hamu-ray plan` can be checked against a run (README "A 100M+ model"), and so
that a user sees tokens/s without a profiler. Only numbers: no row is looked at beyond its
token count.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch


HOST_MEMORY_ENV = "HAMU_RAY_HOST_MEMORY"  # keep (glibc as it is, the default) or release
MMAP_THRESHOLD = 128 * 1024  # glibc's own default, held fixed


def host_memory_choice() -> str:
    """$HAMU_RAY_HOST_MEMORY's value: keep (the default) or release; anything else is named."""
    import os

    choice = os.environ.get(HOST_MEMORY_ENV, "keep")
    if choice not in ("keep", "release"):
        raise ValueError(f"${HOST_MEMORY_ENV} must be keep or release, got {choice!r}")
    return choice


def return_freed_memory() -> bool:
    """With $HAMU_RAY_HOST_MEMORY=release, ask glibc to serve every allocation of 128 KiB or more
    with its own mapping, given back to the system when freed, and to keep that threshold. By
    default glibc raises it to each freed block's size (up to 32 MiB), after which a step's
    gathered layers, gradient pieces and activations come from the heap, and memory freed there
    stays with the process. Measured on the 126M Llama at ZeRO-3 on 2 CPU workers
    (`scripts/big_llama.py --allocator`): peak RSS per worker 4.2 → 3.15 GB, step time +20-25 %
    (fresh pages are faulted in again), hence opt-in. True when set; False when kept or where the
    C library is not glibc."""
    import ctypes
    import ctypes.util

    if host_memory_choice() == "keep" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False


def free_memory_bytes(device: torch.device, sharers: int = 1) -> int:
    """Memory free for one more tensor on `device`: a GPU's free memory, or on CPU the node's
    available memory (/proc/meminfo) over the `sharers` workers that may claim it at once."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 // max(1, sharers)
    except (OSError, KeyError, ValueError):
        return 0  # unknown: nothing assumed free


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """This process's resident set now (Linux: /proc/self/statm; elsewhere the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def tokens_in(batch: dict | None) -> int:
    """Tokens a batch feeds the model (its attention mask), or its rows for a classifier."""
    if not batch:
        return 0
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(len(next(iter(batch.values()))))


class Usage:
    """One worker's account: the RSS before the model is built, each step's seconds and tokens,
    and the peak RSS at the end (the GPU's allocated peak too on CUDA)."""

    def __init__(self) -> None:
        self.rss_before_model = current_rss_bytes()
        self.step_s: list[float] = []
        self.tokens = 0
        self.longest = 0  # the widest batch's padded length (LM): activations grow with it

    def timed(self, take_step, *args):
        start = time.perf_counter()
        out = take_step(*args)
        self.step_s.append(time.perf_counter() - start)
        return out

    def count(self, *batches) -> None:
        self.tokens += sum(tokens_in(b) for b in batches)
        self.longest = max([self.longest] + [b["attention_mask"].shape[1] for b in batches
                                             if b and "attention_mask" in b])

    def record(self, device: torch.device) -> dict:
        cuda = device.type == "cuda"
        return {"rss_before_model_bytes": self.rss_before_model, "peak_rss_bytes": peak_rss_bytes(),
                "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                "steps": len(self.step_s), "step_s": self.step_s, "tokens": self.tokens,
                "longest_batch": self.longest}


def summary(per_rank: list[dict]) -> dict:
    """The job's figures from every rank's record: memory per rank, and the median step of the
    slowest rank (a step ends at its collectives, so ranks keep pace), tokens/s over all ranks.
    The first step is left out of the median when there are more (it builds caches)."""
    slowest = [max(times) for times in zip(*(r["step_s"] for r in per_rank))]
    timed = slowest[1:] if len(slowest) > 1 else slowest
    median = statistics.median(timed) if timed else None
    steps = max(r["steps"] for r in per_rank)
    tokens_per_step = sum(r["tokens"] for r in per_rank) / steps if steps else 0
    gb = 1e9
    return {
        "peak_rss_gb": [round(r["peak_rss_bytes"] / gb, 3) for r in per_rank],
        "rss_before_model_gb": [round(r["rss_before_model_bytes"] / gb, 3) for r in per_rank],
        "cuda_peak_allocated_gb": [None if r["cuda_peak_allocated_bytes"] is None
                                   else round(r["cuda_peak_allocated_bytes"] / gb, 3) for r in per_rank],
        "median_step_s": None if median is None else round(median, 4),
        "tokens_per_step": round(tokens_per_step, 1),
        "longest_batch": max(r["longest_batch"] for r in per_rank),
        "tokens_per_s": None if not median else round(tokens_per_step / median, 1),
    }


def gathered(record: dict) -> list[dict]:
    """Every rank's record on every rank (one object all-gather; the job's process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [record]
    out: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, record)
    return out
