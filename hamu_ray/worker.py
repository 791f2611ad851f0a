"""The Ray Train loop: one function, top to bottom, run by every worker."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from hamu_ray import data, engine as eng, models
from hamu_ray.config import UnlearnConfig
from hamu_ray.grads import DeepSpeedGrads
from hamu_ray.rules import get_rule
from hamu_ray.step import StepOutput, SumAcrossRanks, unlearning_step

log = logging.getLogger(__name__)
DS_TAG = "ds"  # the DeepSpeed checkpoint tag inside every Ray checkpoint
STATE_FILE = "loop_state.json"  # step and step log, written by rank 0
EXPORT_WEIGHTS, EXPORT_LOG, EXPORT_INFO = "model.safetensors", "step_log.jsonl", "run_info.json"


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = UnlearnConfig.model_validate(config)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.train.seed)

    # build: the original model, wrapped by DeepSpeed at the configured ZeRO stage
    model = models.build_model(cfg.model)
    engine = eng.initialize(model, eng.deepspeed_config(
        stage=cfg.train.zero_stage, lr=cfg.train.lr, micro_batch_size=cfg.data.retain_batch_size,
        bf16=cfg.train.bf16, optimizer=cfg.train.optimizer))
    grads, reduce = DeepSpeedGrads(engine), SumAcrossRanks()
    rule = get_rule(cfg.method.rule, **cfg.method.hparams)

    # resume: weights and optimizer state from the latest checkpoint, then skip the steps done
    start_step, step_log = restore(engine, ray.train.get_checkpoint())
    resumed = start_step > 0
    pairs = data.paired_batches(
        ray.train.get_dataset_shard("retain"), ray.train.get_dataset_shard("forget"),
        retain_batch_size=cfg.data.retain_batch_size, forget_batch_size=cfg.data.forget_batch_size,
        anchor=cfg.data.anchor, epochs=cfg.train.epochs,
        columns=(cfg.data.input_column, cfg.data.label_column))
    for _ in range(start_step):
        next(pairs)

    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    step = start_step
    for retain_batch, forget_batch in pairs:
        if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
            break
        step += 1
        # the step: both gradients on this worker's micro-batches, statistics all-reduced
        out = unlearning_step(
            grads, rule, lr=cfg.train.lr, reduce_stats=reduce, clip_norm=cfg.train.clip_norm,
            retain_loss=lambda: classifier_loss(engine, retain_batch, dtype),
            forget_loss=lambda: classifier_loss(engine, forget_batch, dtype))
        record = step_record(step, out)
        step_log.append(record)

        # report every step; checkpoint every k steps (every worker saves its shard, then reports)
        stop = out.result.stop is not None
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and not stop:
            with tempfile.TemporaryDirectory() as tmp:
                save(engine, tmp, step, step_log, rank)
                ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(record)
        if cfg.train.fail_after_step == step and not resumed:
            raise RuntimeError(f"injected failure after step {step} (train.fail_after_step)")
        if stop:
            break

    # export: whole weights (a collective under ZeRO-3) and the step log, from rank 0
    state = eng.full_state_dict(engine)
    summary = {"steps": step, "stop": step_log[-1]["stop"] if step_log else "none",
               "resumed_from_step": start_step}
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            export(tmp, state, step_log, summary)
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def classifier_loss(engine, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    return F.cross_entropy(engine(batch["x"].to(dtype)).float(), batch["y"])


def step_record(step: int, out: StepOutput) -> dict:
    """One flat, slash-namespaced metrics row per step (no forget-set content, only numbers)."""
    d = out.result.diagnostics
    cosine = d["cosine"]
    branches = out.result.branch
    record = {
        "step": step,
        "loss/retain": out.retain_loss,
        "loss/forget": out.forget_loss,
        "hardness/cosine_mean": float(cosine.mean()),
        "hardness/cosine_min": float(cosine.min()),
        "hardness/cosine_max": float(cosine.max()),
        "guarantee/forget_gain": float(d["forget_gain"]),
        "guarantee/retain_change": float(d["retain_change"]),
        "comm/stats_values": out.reduced_values,
        "clip/retain_scale": out.retain_scale,
        "clip/forget_scale": out.forget_scale,
        "stop": out.result.stop.value if out.result.stop else "none",
    }
    if "stop_rhs" in d:
        record["guarantee/constraint"] = float(d["constraint"].sum())
        record["stop/rhs"] = d["stop_rhs"]
        record["stop/margin"] = d["stop_margin"]
    for name in sorted(set(branches)):
        record[f"branch/{name}"] = branches.count(name) / len(branches)
    return record


def save(engine, directory: str, step: int, step_log: list[dict], rank: int) -> None:
    engine.save_checkpoint(directory, tag=DS_TAG)  # collective: each rank writes its shard
    if rank == 0:
        (Path(directory) / STATE_FILE).write_text(json.dumps({"step": step, "log": step_log}))


def restore(engine, checkpoint) -> tuple[int, list[dict]]:
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory, tag=DS_TAG)
        state = json.loads((Path(directory) / STATE_FILE).read_text())
    log.info("resumed from step %d", state["step"])
    return state["step"], state["log"]


def export(directory: str, state: dict[str, torch.Tensor], step_log: list[dict], info: dict) -> None:
    from safetensors.torch import save_file

    (Path(directory) / EXPORT_INFO).write_text(json.dumps(info))
    save_file({k: v.contiguous() for k, v in state.items()}, str(Path(directory) / EXPORT_WEIGHTS))
    with open(Path(directory) / EXPORT_LOG, "w") as f:
        for row in step_log:
            f.write(json.dumps(row) + "\n")
