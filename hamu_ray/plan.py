"""`hamu-ray plan`: will a job's model fit, before any GPU is asked for.

The model is read from its `config.json` only and built on PyTorch's meta device (no weights, no
memory), which gives its exact parameter count, the largest layer, and with LoRA the trainable
share. Model states (parameters, gradients, optimizer) come from DeepSpeed's own estimators
(`estimate_zero2/3_model_states_mem_needs`, which assume mixed-precision Adam: an upper bound
for SGD); to them the plan adds what they do not count: the frozen base of a LoRA model, the
frozen reference copy that KL/NPO/SCRUB need without LoRA, and the gradient copies HAMU's
two-backward step holds (`gradient_copies`). Activations are not estimated: they depend on
batch × sequence length and on gradient checkpointing, and come on top.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from hamu_ray import quiet
from hamu_ray.errors import MissingInputError

GB = 1e9
# DeepSpeed's guess at import on a machine without a GPU (printed on stdout): the plan is for
# the cluster's GPUs, whatever this machine has
ACCELERATOR_GUESS = "Setting accelerator to CPU"


@dataclass(frozen=True)
class ModelSize:
    total: int  # every parameter once (tied weights once)
    trainable: int
    largest_layer: int  # the most parameters one module holds directly (ZeRO-3 gathers it whole)
    largest_trainable: int  # the largest trainable tensor: HAMU's largest block


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    gpus: int
    gpus_per_node: int
    zero_stage: int
    offload: str
    lora: bool
    params: int
    trainable_params: int
    model_states_gpu_gb: float  # DeepSpeed's estimate for the trainable parameters
    model_states_cpu_gb: float  # per node
    frozen_gpu_gb: float  # the LoRA base (frozen, not in DeepSpeed's estimate)
    reference_gpu_gb: float  # the frozen original for KL/NPO/SCRUB (none with LoRA: disable_adapter)
    hamu_gpu_gb: float  # HAMU's gradient copies on each GPU (gradient_copies)
    hamu_cpu_gb: float  # ... in CPU memory per node (ZeRO-1/2 with offload)
    total_gpu_gb: float
    gpu_memory_gb: float
    fits: bool


def model_size(config_path: str | Path, lora=None) -> ModelSize:
    """Counts from config.json alone: the model is built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_path)
    if not (path / "config.json").is_file() and not (path.is_file() and path.suffix == ".json"):
        raise MissingInputError(f"{config_path}: no config.json to read the model's size from "
                                "(give --model-config DIR_OR_FILE)")
    config = AutoConfig.from_pretrained(path.parent if path.is_file() else path)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks a deprecated transformers API
        model = AutoModelForCausalLM.from_config(config)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                     target_modules=lora.target_modules,
                                                     task_type="CAUSAL_LM"))
    unique = {id(p): p for p in model.parameters()}.values()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelSize(total=sum(p.numel() for p in unique),
                     trainable=sum(p.numel() for p in unique if p.requires_grad), largest_layer=largest,
                     largest_trainable=max((p.numel() for p in unique if p.requires_grad), default=0))


def gradient_copies(*, stage: int, offload: str, bf16: bool, trainable: int, largest_block: int,
                    gpus: int) -> tuple[float, float]:
    """(bytes per GPU, bytes in CPU memory per rank) that HAMU's two-backward step holds beside
    DeepSpeed's own buffers, as DeepSpeed 0.19 hands a rank its gradient (hamu_ray.engine.grads);
    T trainable parameters, N GPUs, b = 2 in bf16 else 4:
      ZeRO-0     g_r, a copy of p.grad (the weights' dtype)                 b·T on the GPU
      ZeRO-1/2   g_r, a copy of this rank's fragments (the weights' dtype)  b·T/N on the GPU
                 with offload: fp32 fragments in CPU memory                 4·T/N in CPU memory
      ZeRO-3     safe_get_local_grad is `.to(accelerator).float()`: g_r is  4·T/N on the GPU
                 an fp32 copy, and so is g_f in bf16 or with offload        + 4·T/N
                 (offload does not take them off the GPU)
    and where bf16 gradients are read in place (ZeRO-0–2, no offload), the statistics' fp32
    copies of one block of g_r and g_f: 8·min(largest block, T/N)."""
    shard = trainable / (gpus if stage else 1)
    if stage == 3:
        copy_of_g_f = bf16 or offload != "none"
        return 4 * shard * (2 if copy_of_g_f else 1), 0.0
    if offload != "none":
        return 0.0, 4 * shard
    weight_bytes = 2 if bf16 else 4
    statistics = 8 * min(largest_block, shard) if bf16 else 0
    return weight_bytes * shard + statistics, 0.0


def plan(cfg, *, gpus_per_node: int = 8, gpu_memory_gb: float = 80.0,
         model_config: str | None = None) -> MemoryPlan:
    """The per-GPU and per-node memory of `cfg`'s causal LM on cfg.cluster.num_workers GPUs."""
    with quiet.without_log_messages("DeepSpeed", ACCELERATOR_GUESS):  # a plan uses no accelerator
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from hamu_ray.objectives import needs_reference

    if cfg.model.kind != "causal_lm":
        raise MissingInputError("hamu-ray plan sizes causal LMs (model.kind causal_lm)")
    lora, stage, offload = cfg.model.lora, cfg.train.zero_stage, cfg.train.offload
    size = model_size(model_config or cfg.model.path, lora)
    gpus = cfg.cluster.num_workers
    per_node = min(gpus_per_node, gpus)
    nodes = math.ceil(gpus / per_node)
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            size.trainable, size.largest_layer, per_node, nodes, cpu_offload=offload != "none",
            cpu_offload_params=offload == "all", zero_init=True)
    else:  # ZeRO-1/2 (and ZeRO-0: the same states, unpartitioned)
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            size.trainable, per_node if stage else 1, nodes if stage else 1,
            cpu_offload=offload == "optimizer")
    weight_bytes = 2 if cfg.model.dtype == "bf16" else 4
    shards = gpus if stage == 3 and offload != "all" else 1
    on_gpu = 0 if offload == "all" else 1
    frozen = on_gpu * weight_bytes * (size.total - size.trainable) / shards
    reference = 0.0
    if lora is None and cfg.data.forget is not None and needs_reference(cfg.method.spec):
        reference = on_gpu * weight_bytes * size.total / shards
    hamu_gpu, hamu_cpu = 0.0, 0.0
    if cfg.data.forget is not None and not cfg.method.spec.implicit:  # two backwards (worker.step_function)
        hamu_gpu, hamu_cpu = gradient_copies(stage=stage, offload=offload, bf16=cfg.train.bf16,
                                             trainable=size.trainable, largest_block=size.largest_trainable,
                                             gpus=gpus)
        hamu_cpu *= per_node
    total = (gpu + frozen + reference + hamu_gpu) / GB
    return MemoryPlan(
        model=str(model_config or cfg.model.path), gpus=gpus, gpus_per_node=per_node, zero_stage=stage,
        offload=offload, lora=lora is not None, params=size.total, trainable_params=size.trainable,
        model_states_gpu_gb=round(gpu / GB, 2), model_states_cpu_gb=round(cpu / GB, 2),
        frozen_gpu_gb=round(frozen / GB, 2), reference_gpu_gb=round(reference / GB, 2),
        hamu_gpu_gb=round(hamu_gpu / GB, 3), hamu_cpu_gb=round(hamu_cpu / GB, 2), total_gpu_gb=round(total, 2),
        gpu_memory_gb=gpu_memory_gb,
        fits=total <= gpu_memory_gb)


def describe(p: MemoryPlan) -> str:
    lines = [
        f"model {p.model}: {p.params / 1e9:.2f}B parameters, {p.trainable_params / 1e6:.1f}M trainable"
        + (" (LoRA)" if p.lora else ""),
        f"{p.gpus} GPU(s), {p.gpus_per_node} per node, ZeRO-{p.zero_stage}, offload {p.offload}",
        f"  model states (DeepSpeed's estimate, Adam-mixed-precision bound): {p.model_states_gpu_gb} GB per GPU, "
        f"{p.model_states_cpu_gb} GB CPU per node",
        f"  frozen base weights: {p.frozen_gpu_gb} GB per GPU",
        f"  reference model: {p.reference_gpu_gb} GB per GPU",
        f"  HAMU's gradient copies (g_r kept; g_f where DeepSpeed hands out a copy): {p.hamu_gpu_gb} GB per GPU"
        + (f", {p.hamu_cpu_gb} GB CPU per node (offloaded)" if p.hamu_cpu_gb else ""),
        f"  total {p.total_gpu_gb} GB per GPU before activations: "
        + ("fits" if p.fits else "does NOT fit") + f" in {p.gpu_memory_gb} GB",
    ]
    return "\n".join(lines)


def as_dict(p: MemoryPlan) -> dict:
    return asdict(p)
