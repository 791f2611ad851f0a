"""Which CPU kernels a run computes with: the opt-in pins for runs that reproduce across machines."""

from __future__ import annotations

import os

# Which CPU kernels torch and MKL run. Unset, each machine takes its widest vector unit (AVX-512
# here, AVX2 elsewhere) and the numbers differ between machines in the last bits, which training
# amplifies; set (`ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2`, README "Runs that reproduce") in the
# shell that starts a run, every process of it computes with the same kernels on any x86-64 with
# AVX2. They are passed on to the workers, recorded in receipts and part of the stage keys.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
KERNEL_ENV = tuple(PORTABLE_KERNELS)


def kernel_env() -> dict[str, str]:
    """The kernel pins (KERNEL_ENV) this process runs under; empty: each machine's own kernels."""
    return {key: os.environ[key] for key in KERNEL_ENV if key in os.environ}
