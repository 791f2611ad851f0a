"""`hamu-ray plan`: will a job's model fit, before any GPU is asked for.

The model is read from its `config.json` only and built on PyTorch's meta device (no weights, no
memory), which gives its exact parameter count, the largest layer, and with LoRA the trainable
share. Model states (parameters, gradients, optimizer) come from DeepSpeed's own estimators
(`estimate_zero2/3_model_states_mem_needs`, which assume mixed-precision Adam: an upper bound
for SGD); to them the plan adds what they do not count: the frozen base of a LoRA model, the
frozen reference copy that KL/NPO/SCRUB need without LoRA, and the gradient copies HAMU's
two-backward step holds (`gradient_copies`), the activations a backward keeps at the job's
batch and max_length (`activation_bytes`: the model run on the meta device, its saved tensors
counted), and at ZeRO-3 its working memory: the parameters it keeps gathered
(`zero3_gathered_bytes`) and the gradient reduction's buffers (`zero3_reduction_bytes`). A job
with `evaluation:` scores its final model on the workers after the last step: that phase keeps
the engine's states and, under ZeRO-3 on 2+ ranks, may add a whole copy of the model on every
rank (`evaluation_phase`); the job's peak is the larger of the two phases'.

`device="cpu"` plans a job on CPU workers (ZeRO-3): every term lands in the worker's memory, and
the model states are counted as DeepSpeed 0.19 allocates them for the job's optimizer
(`zero3_states`) rather than by its mixed-precision-Adam estimator; checked against measured peak
RSS in tests/test_plan_measured.py and scripts/big_llama.py.
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
    device: str  # gpu: per GPU (host memory per node beside); cpu: per CPU worker, everything in RAM
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
    activations_gb: float  # saved for backward at the job's batch and max_length (the larger set's batch)
    working_gb: float  # ZeRO-3's working memory: the parameters held gathered, the gradient reduction's buffers
    training_gb: float  # the step's peak: every term above
    evaluation: str  # none (no evaluation: section), partitioned, whole or auto (EvaluationPhase)
    evaluation_why: str
    evaluation_copy_gb: float  # the whole copy per rank (whole and auto; else 0)
    evaluation_gb: float  # the evaluation's peak as counted in the total (auto: without the copy)
    total_gpu_gb: float  # max(training, evaluation) per GPU; with device cpu, per CPU worker (the name kept for --json readers)
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
                    gpus: int, device: str = "gpu") -> tuple[float, float]:
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
    copies of one block of g_r and g_f: 8·min(largest block, T/N). On CPU workers (`device`
    cpu) the accelerator is the CPU: an offloaded fp32 ZeRO-3 gradient is handed out as it is,
    so g_f is a copy only in bf16."""
    shard = trainable / (gpus if stage else 1)
    if stage == 3:
        copy_of_g_f = bf16 or (offload != "none" and device == "gpu")
        return 4 * shard * (2 if copy_of_g_f else 1), 0.0
    if offload != "none":
        return 0.0, 4 * shard
    weight_bytes = 2 if bf16 else 4
    statistics = 8 * min(largest_block, shard) if bf16 else 0
    return weight_bytes * shard + statistics, 0.0


OPTIMIZER_STATE_BYTES = {"SGD": 0, "AdamW": 8}  # per trainable parameter (HAMU's SGD: lr only, no momentum)


def zero3_states(*, trainable: int, gpus: int, bf16: bool, offload: str, optimizer: str) -> dict[str, tuple[float, str]]:
    """Model states per rank as DeepSpeed 0.19's ZeRO-3 allocates them (stage3.py), T trainable
    parameters on N ranks, b = 2 in bf16 else 4, each with where it lives (accelerator or host):
      the parameters' partition (lp_param_buffer)            b·T/N   host with offload all
      the fp32 master partition: none in fp32 without         4·T/N   host with offload
        offload (the partition is already fp32 on the device: DeepSpeed uses it)
      the gradient partition (grad_partitions_flat_buffer)   b·T/N   host with offload
      the optimizer's state (AdamW 8 bytes; SGD without momentum none)"""
    b, shard = (2 if bf16 else 4), trainable / gpus
    states_at = "host" if offload != "none" else "accelerator"
    return {
        "parameters": (b * shard, "host" if offload == "all" else "accelerator"),
        "fp32 master": (4 * shard if bf16 or offload != "none" else 0.0, states_at),
        "gradients": (b * shard, states_at),
        "optimizer": (OPTIMIZER_STATE_BYTES[optimizer] * shard, states_at),
    }


def zero3_gathered_bytes(*, params: int, bf16: bool) -> float:
    """The parameters ZeRO-3 holds gathered whole on every rank (DeepSpeed 0.19 defaults): it
    keeps a gathered parameter until `stage3_max_live_parameters` are live and does not release
    one it will use again within `stage3_max_reuse_distance` (the backward reuses the forward's),
    so a model under those limits (1e9 parameters) is held whole between forward and backward."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return (2 if bf16 else 4) * min(params, int(DeepSpeedZeroConfig().max_live_parameters))


def zero3_reduction_bytes(*, trainable: int, bf16: bool, gloo: bool) -> float:
    """The gradient reduction's working buffers per rank at ZeRO-3 (DeepSpeed 0.19, defaults):
    the reduce bucket (`reduce_bucket_size` elements, filled with every gradient before it is
    reduced), the flat copy `reduce_scatter_coalesced` concatenates the bucket's parameters
    into, and on CPU (gloo) the backend's copy of it for the reduce-scatter (measured: not in
    any tensor Python sees). All in the weights' dtype, min(T, bucket) elements each."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    bucket = min(trainable, int(DeepSpeedZeroConfig().reduce_bucket_size))
    return (2 if bf16 else 4) * bucket * (3 if gloo else 2)


def activation_bytes(config_path: str | Path, *, rows: int, seq_len: int, bf16: bool,
                     checkpointing: bool = False) -> float:
    """What one backward keeps: the model run on the meta device (no memory, no compute) on a
    `rows` × `seq_len` batch under autograd's saved-tensor hooks, every storage a saved tensor
    uses counted once, the parameters' not. Attention is counted as the math kernel keeps it
    (its softmax weights, rows × heads × seq_len² each layer); the fused kernels keep less, so
    this is an upper bound there (tests/test_plan.py). With gradient checkpointing only the
    checkpoints are kept, and one layer's activations come back during its recomputation."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_path)
    config = AutoConfig.from_pretrained(path.parent if path.is_file() else path)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.train()
    if checkpointing:  # as CausalLMTask.build sets it up
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # a storage's identity: its StorageImpl (meta storages have no data pointer to tell them apart)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            kept[storage._cdata] = storage.nbytes()
        return t

    ids = torch.zeros(rows, seq_len, dtype=torch.long, device="meta")
    # a 4-d mask as given (a 2-d one, or none, is inspected for values, which meta tensors lack)
    mask = torch.ones(rows, 1, seq_len, seq_len, dtype=torch.bool, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    saved = sum(kept.values())
    if checkpointing:
        saved += activation_bytes(config_path, rows=rows, seq_len=seq_len, bf16=bf16) / config.num_hidden_layers
    return float(saved)


def whole_copy_bytes(size: ModelSize, *, bf16: bool, lora: bool) -> float:
    """The unpartitioned copy a ZeRO-3 evaluation fills on each rank (the task's `unpartitioned`):
    every parameter at the model's dtype, except LoRA adapters, which peft keeps in fp32 under a
    bf16 base (get_peft_model's autocast_adapter_dtype)."""
    adapters = size.trainable if lora else 0
    return (2 if bf16 else 4) * (size.total - adapters) + 4 * adapters


@dataclass(frozen=True)
class EvaluationPhase:
    mode: str  # none, partitioned (no copy), whole (a copy on every rank), auto (a copy where it fits)
    why: str


def evaluation_phase(cfg) -> EvaluationPhase:
    """How the job's evaluation holds the model, as worker.evaluate decides it: a whole copy per
    rank only under ZeRO-3 on 2+ ranks (elsewhere each rank scores with the model it holds, or the
    ranks score partitioned in lockstep, gathering as a training step does)."""
    if cfg.evaluation is None:
        return EvaluationPhase("none", "no evaluation: section")
    if cfg.train.zero_stage != 3 or cfg.cluster.num_workers < 2:
        return EvaluationPhase("partitioned", "not ZeRO-3 on 2+ workers: each rank scores with the model it holds")
    choice = cfg.evaluation.whole_model
    if choice == "auto":
        return EvaluationPhase("auto", "whole_model auto: the copy is made only where twice it fits in the "
                                       "rank's free memory, so the total counts the peak without it")
    if choice:
        return EvaluationPhase("whole", "whole_model true: every rank fills a whole copy of the model")
    return EvaluationPhase("partitioned", "whole_model false: the ranks score partitioned, in lockstep")


def plan(cfg, *, device: str = "gpu", gpus_per_node: int = 8, gpu_memory_gb: float = 80.0,
         model_config: str | None = None, batch_rows: int | None = None,
         seq_len: int | None = None) -> MemoryPlan:
    """The per-GPU (device gpu) or per-CPU-worker (device cpu, ZeRO-3) memory of `cfg`'s causal
    LM on cfg.cluster.num_workers workers; activations at `batch_rows` × `seq_len` (default: the
    larger of the job's two per-worker batches × data.text.max_length)."""
    with quiet.without_log_messages("DeepSpeed", ACCELERATOR_GUESS):  # a plan uses no accelerator
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from hamu_ray.objectives import needs_reference

    if cfg.model.kind != "causal_lm":
        raise MissingInputError("hamu-ray plan sizes causal LMs (model.kind causal_lm)")
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be gpu or cpu, got {device!r}")
    lora, stage, offload = cfg.model.lora, cfg.train.zero_stage, cfg.train.offload
    if device == "cpu" and stage != 3:
        raise MissingInputError(f"hamu-ray plan --device cpu sizes ZeRO-3 jobs (the stage measured on CPU "
                                f"workers); train.zero_stage is {stage}")
    path = model_config or cfg.model.path
    size = model_size(path, lora)
    gpus = cfg.cluster.num_workers
    per_node = min(gpus_per_node, gpus)
    nodes = math.ceil(gpus / per_node)
    two_backwards = cfg.data.forget is not None and not cfg.method.spec.implicit
    if device == "cpu":  # every state in the worker's memory, counted as allocated
        states = zero3_states(trainable=size.trainable, gpus=gpus, bf16=cfg.train.bf16, offload=offload,
                              optimizer=cfg.train.optimizer)
        gpu, cpu = sum(b for b, _ in states.values()), 0.0
    elif stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            size.trainable, size.largest_layer, per_node, nodes, cpu_offload=offload != "none",
            cpu_offload_params=offload == "all", zero_init=True)
    else:  # ZeRO-1/2 (and ZeRO-0: the same states, unpartitioned)
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            size.trainable, per_node if stage else 1, nodes if stage else 1,
            cpu_offload=offload == "optimizer")
    weight_bytes = 2 if cfg.model.dtype == "bf16" else 4
    shards = gpus if stage == 3 and offload != "all" else 1
    on_gpu = 0 if offload == "all" and device == "gpu" else 1
    frozen = on_gpu * weight_bytes * (size.total - size.trainable) / shards
    reference = 0.0
    if lora is None and cfg.data.forget is not None and needs_reference(cfg.method.spec):
        reference = on_gpu * weight_bytes * size.total / shards
    hamu_gpu, hamu_cpu = 0.0, 0.0
    if two_backwards:  # (worker.step_function)
        hamu_gpu, hamu_cpu = gradient_copies(stage=stage, offload=offload, bf16=cfg.train.bf16,
                                             trainable=size.trainable, largest_block=size.largest_trainable,
                                             gpus=gpus, device=device)
        hamu_cpu *= per_node
    rows = batch_rows or max(cfg.data.retain_batch_size, cfg.data.forget_batch_size if cfg.data.forget else 0)
    activations = activation_bytes(path, rows=rows, seq_len=seq_len or cfg.data.text.max_length,
                                   bf16=cfg.model.dtype == "bf16", checkpointing=cfg.model.gradient_checkpointing)
    working = 0.0
    if stage == 3:
        working = (zero3_reduction_bytes(trainable=size.trainable, bf16=cfg.train.bf16, gloo=device == "cpu")
                   + zero3_gathered_bytes(params=size.total, bf16=cfg.model.dtype == "bf16"))
    training = gpu + frozen + reference + hamu_gpu + activations + working
    # after the last step the step's gradient copies and activations are freed; the engine's
    # states stay (the working memory counted as in training: an upper bound once the step's
    # gathered parameters are released). The evaluation's own activations (no autograd) are not counted.
    phase = evaluation_phase(cfg)
    copy = 0.0
    if phase.mode in ("whole", "auto"):
        copy = whole_copy_bytes(size, bf16=cfg.model.dtype == "bf16", lora=lora is not None)
    evaluating = 0.0
    if phase.mode != "none":
        evaluating = gpu + frozen + reference + working + (copy if phase.mode == "whole" else 0.0)
    total = max(training, evaluating) / GB
    return MemoryPlan(
        device=device, model=str(path), gpus=gpus, gpus_per_node=per_node, zero_stage=stage,
        offload=offload, lora=lora is not None, params=size.total, trainable_params=size.trainable,
        model_states_gpu_gb=round(gpu / GB, 3), model_states_cpu_gb=round(cpu / GB, 2),
        frozen_gpu_gb=round(frozen / GB, 3), reference_gpu_gb=round(reference / GB, 3),
        hamu_gpu_gb=round(hamu_gpu / GB, 3), hamu_cpu_gb=round(hamu_cpu / GB, 2),
        activations_gb=round(activations / GB, 3), working_gb=round(working / GB, 3),
        training_gb=round(training / GB, 3), evaluation=phase.mode, evaluation_why=phase.why,
        evaluation_copy_gb=round(copy / GB, 3), evaluation_gb=round(evaluating / GB, 3),
        total_gpu_gb=round(total, 3), gpu_memory_gb=gpu_memory_gb, fits=total <= gpu_memory_gb)


def describe(p: MemoryPlan) -> str:
    where = "per GPU" if p.device == "gpu" else "per CPU worker"
    if p.device == "gpu":
        states = (f"  model states (DeepSpeed's estimate, Adam-mixed-precision bound): {p.model_states_gpu_gb} GB "
                  f"{where}, {p.model_states_cpu_gb} GB CPU per node")
    else:
        states = f"  model states (as ZeRO-3 allocates them for train.optimizer): {p.model_states_gpu_gb} GB {where}"
    lines = [
        f"model {p.model}: {p.params / 1e9:.2f}B parameters, {p.trainable_params / 1e6:.1f}M trainable"
        + (" (LoRA)" if p.lora else ""),
        (f"{p.gpus} GPU(s), {p.gpus_per_node} per node" if p.device == "gpu" else f"{p.gpus} CPU worker(s)")
        + f", ZeRO-{p.zero_stage}, offload {p.offload}",
        states,
        f"  frozen base weights: {p.frozen_gpu_gb} GB {where}",
        f"  reference model: {p.reference_gpu_gb} GB {where}",
        f"  HAMU's gradient copies (g_r kept; g_f where DeepSpeed hands out a copy): {p.hamu_gpu_gb} GB {where}"
        + (f", {p.hamu_cpu_gb} GB CPU per node (offloaded)" if p.hamu_cpu_gb else ""),
        f"  activations kept for a backward (the job's batch × max_length): {p.activations_gb} GB {where}",
        f"  ZeRO-3 working memory (parameters held gathered, the reduction's buffers): {p.working_gb} GB {where}",
        *evaluation_lines(p, where),
        f"  total {p.total_gpu_gb} GB {where}: " + ("fits" if p.fits else "does NOT fit")
        + f" in {p.gpu_memory_gb} GB",
    ]
    return "\n".join(lines)


def evaluation_lines(p: MemoryPlan, where: str) -> list[str]:
    """The training and evaluation phases' peaks, where the job evaluates after its last step."""
    if p.evaluation == "none":
        return []
    peak = f"{p.evaluation_gb} GB {where}"
    if p.evaluation == "whole":
        peak += f" with the whole copy ({p.evaluation_copy_gb} GB)"
    elif p.evaluation == "auto":
        peak += (f" without the whole copy, {round(p.evaluation_gb + p.evaluation_copy_gb, 3)} GB "
                 f"with it ({p.evaluation_copy_gb} GB)")
    return [f"  training peak (every term above): {p.training_gb} GB {where}",
            f"  evaluation peak (model states, frozen base, reference, working memory): {peak}",
            f"    ({p.evaluation_why}; the evaluation's own activations not counted)"]


def as_dict(p: MemoryPlan) -> dict:
    return asdict(p)
