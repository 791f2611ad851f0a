"""Building a DeepSpeed engine for unlearning and reading its full weights back.

The optimizer is plain SGD by default: HAMU's guarantee is for Δ = −lr·d. DeepSpeed's own
gradient clipping stays off (hamu_ray.engine.step clips g_r and g_f before the rule instead).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def deepspeed_config(*, stage: int, lr: float, micro_batch_size: int, bf16: bool = False,
                     optimizer: str = "SGD") -> dict[str, Any]:
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {stage!r}")
    params: dict[str, Any] = {"lr": lr}
    if optimizer == "AdamW":
        params["torch_adam"] = True  # avoids compiling DeepSpeed's fused CPU Adam (~50 s)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,  # the step runs its own two backwards
        "optimizer": {"type": optimizer, "params": params},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def initialize(model: torch.nn.Module, config: dict[str, Any]):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole, as fp32 CPU tensors, on every rank (a collective
    under ZeRO-3: all ranks must call it)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
              if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
    with gather:
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}



def reference_model(model: torch.nn.Module, *, stage: int, bf16: bool, micro_batch_size: int,
                    device: torch.device | str = "cpu"):
    """The frozen original for KL/NPO/SCRUB objectives, called as `reference(x) -> logits`.

    Under ZeRO-3 it is partitioned like the trained model (an engine without optimizer, so no
    rank holds it whole; DeepSpeed places it); at stages 0–2 every rank holds the trained model
    whole anyway, and the reference goes to `device` (the trained engine's).
    """
    model.requires_grad_(False).eval()
    if stage != 3:
        model = model.to(device)
    if stage == 3:
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": micro_batch_size,
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16},
                  "steps_per_print": 10**9}
        model, *_ = deepspeed.initialize(model=model, config=config)
    elif bf16:
        model = model.to(torch.bfloat16)
    dtype = torch.bfloat16 if bf16 else torch.float32

    @torch.no_grad()
    def reference(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(dtype)).float()
    return reference
