"""scripts/gpu_check.py (`make gpu-check`) on a machine without a GPU: one line, at once, nothing
run or written. On a GPU it runs the checks; its parts are rehearsed with --rehearse."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_the_gpu_check_refuses_at_once_without_a_gpu(tmp_path):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("gpu-check: ") and done.stderr.count("\n") == 1, done.stderr
    assert "run it on a machine with a GPU" in done.stderr
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 15  # before any part: the tests alone take minutes
