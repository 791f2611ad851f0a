"""What the benchmark times: the models, their batches, and one step of each method.

Every method here is the engine's own step function (hamu_ray.engine.step) on the engine's own
gradient access, so a timing is the timing of what a job runs. The losses are plain
cross-entropy on both sets for every method: methods differ only in how they step.

  ft               one backward on L_r (the floor: what plain training costs)
  gdiff-1bwd       one backward on (L_r − L_f)/2, the cheapest two-objective step
  gdiff-2bwd       the rule `gdiff` on g_r and g_f from two backwards (same update as gdiff-1bwd)
  hamu-q           HAMU-Q per block; hamu-q-full the whole model as one block
  surgery          explicit gradient surgery (two backwards)
  implicit         implicit surgery, one backward (+1 forward to measure the retain change)
  implicit-fast    implicit surgery, one backward, the change measured on the next step's loss
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from hamu_ray.engine.step import (ImplicitSurgery, Lap, MeanAcrossRanks, SumAcrossRanks, descent_step,
                                  implicit_surgery_step, unlearning_step)
from hamu_ray.rules import get_rule
from hamu_ray.rules.surgery import ImplicitSurgeryParams


@dataclass(frozen=True)
class ModelCase:
    """One model of the matrix. `build()` returns a fresh, identically seeded torch module;
    `batches(rank, world)` this rank's (retain, forget) batch pairs, the same global rows at
    every world size; `loss(model, batch)` the scalar loss."""
    name: str
    lr: float
    hamu: dict[str, Any]  # HAMU-Q's constraint and radius for this model's gradient scale
    build: Callable[[dict], torch.nn.Module]  # DeepSpeed config → module (LM: ZeRO-3-aware load)
    batches: Callable[[int, int], list[tuple[Any, Any]]]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    bf16: bool = False
    rows_per_step: int = 0  # global retain + forget rows
    tokens_per_step: int = 0  # global retain + forget tokens (LMs)


def make_step(method: str, case: ModelCase, model, grads, world: int) -> Callable[[Lap], dict]:
    """`step(lap) -> {"stopped": bool}` for one method on one batch stream (bound by `feed`)."""
    batch: dict[str, Any] = {}

    def retain_loss():
        return case.loss(model, batch["retain"])

    def forget_loss():
        return case.loss(model, batch["forget"])

    reduce = (SumAcrossRanks(device=grads.engine.device)  # DeepSpeed's: plain torch never reduces
              if world > 1 or not grads.holds_full_gradient else None)
    if method == "ft":
        def step(lap):
            descent_step(grads, retain_loss, lap)
            return {"stopped": False}
    elif method == "gdiff-1bwd":
        def step(lap):
            descent_step(grads, lambda: (retain_loss() - forget_loss()) / 2, lap)
            return {"stopped": False}
    elif method in ("implicit", "implicit-fast"):
        state = ImplicitSurgery(ImplicitSurgeryParams(fast=method == "implicit-fast"))
        mean = MeanAcrossRanks() if world > 1 else None

        def step(lap):
            implicit_surgery_step(grads, state, lr=case.lr, retain_loss=retain_loss,
                                  forget_loss=forget_loss, reduce_mean=mean, lap=lap)
            return {"stopped": False}
    else:
        rule = {"gdiff-2bwd": lambda: get_rule("gdiff"),
                "hamu-q": lambda: get_rule("hamu-q", **case.hamu),
                "hamu-q-full": lambda: get_rule("hamu-q", full_grad=True, **case.hamu),
                "surgery": lambda: get_rule("surgery")}[method]()

        def step(lap):
            out = unlearning_step(grads, rule, lr=case.lr, retain_loss=retain_loss,
                                  forget_loss=forget_loss, reduce_stats=reduce, lap=lap)
            return {"stopped": not out.stepped, "stats_values": out.reduced_values}

    def fed(pair, lap):
        batch["retain"], batch["forget"] = pair
        return step(lap)
    return fed


# ---- the MLP -------------------------------------------------------------------------------

def mlp_case(hidden: int, batch: int, steps: int) -> ModelCase:
    """784-hidden-hidden-10 on fixed random inputs: the classifier engine's shape, no data I/O."""
    gen = torch.Generator().manual_seed(1)
    rows = [tuple((torch.randn(batch, 784, generator=gen), torch.randint(10, (batch,), generator=gen))
                  for _ in range(2)) for _ in range(steps)]

    def build(ds_config: dict) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(),
                                    torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                    torch.nn.Linear(hidden, 10))

    def batches(rank: int, world: int):
        return [tuple((x[rank::world], y[rank::world]) for x, y in pair) for pair in rows]

    def loss(model, xy):
        x, y = xy
        return F.cross_entropy(model(x.to(_device_of(model))), y.to(_device_of(model)))

    return ModelCase(f"mlp-{hidden}", lr=0.05, hamu={"constraint": 1e-4, "radius": 0.05},
                     build=build, batches=batches, loss=loss, rows_per_step=2 * batch)


# ---- the small Llama ------------------------------------------------------------------------

LLAMA_LR = 0.01  # every method stays finite over the benchmark's steps (0.1 diverges implicit surgery)
LLAMA_SHAPES = {  # micro for CI's small run, the tiny model of the tests, ~1B for a GPU
    "micro": {"hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "kv_heads": 1},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "layers": 4, "heads": 4, "kv_heads": 2},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "layers": 22, "heads": 32, "kv_heads": 4},
}


def build_llama(directory: Path, size: str) -> Path:
    """A Llama of that shape with a tokenizer trained on the built-in country QA text, saved."""
    from hamu_ray.pipeline import country_qa
    from hamu_ray.tasks import small_llama

    rows = [r for rows in country_qa.build(forget_share=0.1).values() for r in rows]
    shape = small_llama.SmallLlama(vocab_size=1024, **LLAMA_SHAPES[size])
    return small_llama.build(directory, shape, [f"{r['question']} {r['answer']}" for r in rows])


def llama_case(model_dir: Path, variant: str, batch: int, steps: int) -> ModelCase:
    """The causal-LM task on the country QA retain and forget rows. variant: fp32, bf16 (bf16 weights, fp32 master
    copy in DeepSpeed) or lora (r=8 adapters on every linear layer, fp32)."""
    import numpy as np
    import pyarrow as pa

    from hamu_ray.engine.config import parse_config
    from hamu_ray.objectives import mean_nll
    from hamu_ray.pipeline import country_qa
    from hamu_ray.tasks.causal_lm import CausalLMTask, tokenize_batch

    model: dict[str, Any] = {"kind": "causal_lm", "path": str(model_dir)}
    if variant == "bf16":
        model["dtype"] = "bf16"
    if variant == "lora":
        model["lora"] = {"r": 8, "alpha": 16}
    cfg = parse_config({"data": {"forget": "f.parquet", "retain": "r.parquet"}, "model": model,
                        "method": {"name": "gdiff"}, "train": {"lr": LLAMA_LR, "bf16": variant == "bf16"},
                        "output_dir": "unused"})
    task = CausalLMTask(cfg)
    sets = country_qa.build(forget_share=0.1)
    tokenized = {}
    for name in ("retain", "forget"):  # each step takes `batch` rows of each set, in order
        rows = (sets[name] * (1 + batch * steps // len(sets[name])))[:batch * steps]
        table = tokenize_batch(pa.Table.from_pylist(rows), path=str(model_dir),
                               text=task.text.model_dump(), refusals=False)
        tokenized[name] = (table.column("input_ids").to_pylist(), table.column("labels").to_pylist())
    tokens = sum(len(x) for ids, _ in tokenized.values() for x in ids) // steps

    def rows_of(name: str, step: int, rank: int, world: int) -> dict:
        ids, labels = tokenized[name]
        picked = slice(step * batch + rank, (step + 1) * batch, world)
        return task.make_batch({"input_ids": np.array(ids[picked], dtype=object),
                                "labels": np.array(labels[picked], dtype=object)})

    def batches(rank: int, world: int):
        return [(rows_of("retain", s, rank, world), rows_of("forget", s, rank, world)) for s in range(steps)]

    def loss(module, b):
        device = _device_of(module)
        return mean_nll(task.scores(module, {k: v.to(device) for k, v in b.items()}))

    def build(ds_config: dict) -> torch.nn.Module:
        torch.manual_seed(0)  # LoRA's A matrices are drawn at random: the same draw every time
        return task.build(ds_config)

    return ModelCase(f"llama-{variant}", lr=LLAMA_LR, hamu={"constraint": 0.02, "radius": 0.2},
                     build=build, batches=batches, loss=loss, bf16=variant == "bf16",
                     rows_per_step=2 * batch, tokens_per_step=tokens)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
