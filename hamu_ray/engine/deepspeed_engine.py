"""Building a DeepSpeed engine for unlearning and reading its full weights back.

The optimizer is plain SGD by default: HAMU's guarantee is for Δ = −lr·d. DeepSpeed's own
gradient clipping stays off (hamu_ray.engine.step clips g_r and g_f before the rule instead).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch


def deepspeed_config(*, stage: int, lr: float, micro_batch_size: int, bf16: bool = False,
                     optimizer: str = "SGD", offload: str = "none") -> dict[str, Any]:
    """`offload`: none, optimizer (its state and the fp32 master weights in CPU memory, ZeRO ≥ 1)
    or all (parameters too, ZeRO-3)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {stage!r}")
    zero: dict[str, Any] = {"stage": stage}
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    params: dict[str, Any] = {"lr": lr}
    if optimizer == "AdamW":
        params["torch_adam"] = True  # avoids compiling DeepSpeed's fused CPU Adam (~50 s)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,  # the step runs its own two backwards
        "optimizer": {"type": optimizer, "params": params},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload with torch's SGD/AdamW, no compiled CPU Adam
        "gradient_clipping": 0.0,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def import_deepspeed():
    """The deepspeed module, imported without MLflow where neither is imported yet: DeepSpeed
    0.19's autotuner imports mlflow when it is installed, for autotuning, which hamu-ray never
    runs; that was ~2 s of CPU in every worker's start (2 cores, measured with `import
    deepspeed`: 5.2 s → 3.3 s). mlflow imports normally afterwards."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # meanwhile `import mlflow` raises ImportError, which it expects
        try:
            import deepspeed  # noqa: F401
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def initialize(model: torch.nn.Module, config: dict[str, Any]):
    deepspeed = import_deepspeed()
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole, as fp32 CPU tensors, on every rank (a collective
    under ZeRO-3: all ranks must call it)."""
    module = engine.module
    with gathered(engine, list(module.parameters())):
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}


def gathered(engine, params: list[torch.nn.Parameter]):
    """A context in which `params` are whole on every rank (a collective under ZeRO-3; at
    stages 0–2 they already are)."""
    deepspeed = import_deepspeed()
    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def frozen_copy(model: torch.nn.Module, ds_config: dict[str, Any], device: torch.device | str):
    """The frozen original (reference for KL/NPO/SCRUB) beside the trained engine: under ZeRO-3
    partitioned like it (an engine without optimizer, so no rank holds it whole; DeepSpeed
    places it), otherwise on `device` (the engine's) in the engine's dtype. Call it like the model."""
    model.requires_grad_(False).eval()
    bf16 = ds_config["bf16"]["enabled"]
    if ds_config["zero_optimization"]["stage"] == 3:
        deepspeed = import_deepspeed()
        config = {"train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16},
                  "steps_per_print": 10**9}
        frozen, *_ = deepspeed.initialize(model=model, config=config)
        return frozen
    return model.to(device, torch.bfloat16 if bf16 else None)


def copy_whole_into(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Every parameter and buffer of a ZeRO-3 partitioned `source` copied whole into the
    same-named one of `target` (an unpartitioned model of the same architecture), one
    parameter gathered at a time, so no rank holds more than `target` and one parameter.
    A collective: every rank calls it."""
    deepspeed = import_deepspeed()
    params, buffers = dict(target.named_parameters()), dict(target.named_buffers())
    with torch.no_grad():
        for name, p in source.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                params[name].copy_(p)
        for name, b in source.named_buffers():  # not partitioned
            buffers[name].copy_(b)


def partitioned_bytes(module: torch.nn.Module) -> int:
    """A ZeRO-3 partitioned module's whole size, in its parameters' dtypes."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters())


def trainable_state_dict(engine) -> dict[str, torch.Tensor]:
    """The trainable parameters (e.g. LoRA adapters), whole, on every rank, by their state-dict
    names (a collective under ZeRO-3)."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with gathered(engine, [p for _, p in named]):
        return {n: p.detach().to("cpu").clone() for n, p in named}


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict in its training dtype on rank 0 (None elsewhere) — under
    ZeRO-3 gathered one module at a time, so no rank holds more than the result. A collective."""
    import torch.distributed as dist

    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {k: v.detach().to("cpu").clone() for k, v in engine.module.state_dict().items()}
