"""engine.usage: the job's account of memory and step time, by hand."""

from __future__ import annotations

import pytest
import torch

from hamu_ray.engine import usage


def test_tokens_are_the_attention_mask_or_the_rows():
    assert usage.tokens_in({"input_ids": torch.ones(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0],
                                                                                           [1, 1, 1, 1, 1]])}) == 8
    assert usage.tokens_in({"x": torch.ones(7, 3), "y": torch.ones(7)}) == 7
    assert usage.tokens_in(None) == 0


def test_summary_takes_each_steps_slowest_rank_and_leaves_the_first_step_out():
    ranks = [{"rss_before_model_bytes": 1e9, "peak_rss_bytes": 3e9, "cuda_peak_allocated_bytes": None,
              "steps": 4, "step_s": [9.0, 1.0, 4.0, 2.0], "tokens": 100, "longest_batch": 12},
             {"rss_before_model_bytes": 1e9, "peak_rss_bytes": 3.5e9, "cuda_peak_allocated_bytes": None,
              "steps": 4, "step_s": [8.0, 3.0, 1.0, 2.5], "tokens": 60, "longest_batch": 20}]
    s = usage.summary(ranks)
    assert s["median_step_s"] == 3.0  # slowest per step: 9, 3, 4, 2.5 → median of 3, 4, 2.5
    assert s["tokens_per_step"] == 40.0 and s["tokens_per_s"] == pytest.approx(40 / 3.0, abs=0.05)
    assert s["peak_rss_gb"] == [3.0, 3.5] and s["rss_before_model_gb"] == [1.0, 1.0]
    assert s["longest_batch"] == 20


def test_host_memory_is_kept_by_default_released_on_request_and_a_bad_value_is_named(monkeypatch):
    from hamu_ray.engine.driver import worker_env_vars
    from hamu_ray.errors import UserError

    monkeypatch.delenv(usage.HOST_MEMORY_ENV, raising=False)
    assert usage.return_freed_memory() is False and usage.HOST_MEMORY_ENV not in worker_env_vars()
    monkeypatch.setenv(usage.HOST_MEMORY_ENV, "lean")
    with pytest.raises(ValueError, match=r"\$HAMU_RAY_HOST_MEMORY must be keep or release, got 'lean'"):
        usage.return_freed_memory()
    with pytest.raises(UserError, match="HAMU_RAY_HOST_MEMORY must be keep or release"):
        worker_env_vars()  # on the driver, before any worker starts
    monkeypatch.setenv(usage.HOST_MEMORY_ENV, "release")
    assert worker_env_vars()[usage.HOST_MEMORY_ENV] == "release"  # every worker gets the choice


def test_release_gives_freed_memory_back_to_the_system():
    """In a fresh process: after a 24 MB block is freed glibc serves blocks up to 24 MB from its
    heap; 20 MB blocks between small ones still in use, freed, then stay in RSS. With release
    they leave."""
    import subprocess
    import sys

    program = """
import torch, sys
from hamu_ray.engine import usage
print(usage.return_freed_memory())
big = torch.ones(6_000_000); del big            # 24 MB mapped, freed: glibc raises its threshold
before = usage.current_rss_bytes()
blocks, small = [], []
for _ in range(8):                               # 8 × 20 MB, each followed by a 400 kB one kept
    blocks.append(torch.ones(5_000_000))
    small.append(torch.ones(100_000))
del blocks
print((usage.current_rss_bytes() - before) / 1e6)
"""
    kept = {}
    for choice in ("keep", "release"):
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, usage.HOST_MEMORY_ENV: choice})
        assert done.returncode == 0, done.stderr
        applied, grown = done.stdout.split()
        kept[choice] = (applied, float(grown))
    assert kept["keep"][0] == "False" and kept["release"][0] == "True"
    assert kept["release"][1] < 10 < kept["keep"][1]  # MB still held after the free
