"""The robustness attacks on a classifier pipeline's models: accuracy in place of probability.

The attacks are the language models' (hamu_ray.attacks; README, "Does the forgetting survive
attacks?"): int8/int4 fake quantization of the linear layers, relearning on a held-apart share
of the forget rows (scored on the others), and benign relearning on retain rows (scored on every
forget row). A classifier's forget rows have no entity column, so relearning holds rows apart
(lm_pipeline.relearn_split). Per attack the table gains `forget_acc_<attack>` and
`recovered_acc_<attack>` = (attacked − unlearned) / (original − unlearned) forget accuracy on the
same rows. No Ray here: numpy arrays and torch modules in, numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hamu_ray.attacks.quantize import fake_quantize
from hamu_ray.attacks.recovery import recovered_share
from hamu_ray.attacks.relearn import batch_rows, relearn
from hamu_ray.pipeline import evaluate, lm_pipeline


@dataclass(frozen=True)
class ClassifierAttack:
    """One attack: quantize to `bits`, or relearn on rows `train_rows` of `train_set` (forget or
    retain); `scored` masks the forget rows its accuracy is taken on (None: all)."""
    bits: int | None = None
    train_set: str | None = None
    train_rows: tuple[int, ...] = ()
    scored: np.ndarray | None = None


def attack_columns(names: list[str]) -> tuple[str, ...]:
    return tuple(column for name in names for column in (f"forget_acc_{name}", f"recovered_acc_{name}"))


def plan(cfg, prepared: dict[str, str]) -> dict[str, ClassifierAttack]:
    """Every attack of cfg.robustness by its name in lm_pipeline.attack_names."""
    r = cfg.robustness
    found = {f"int{bits}": ClassifierAttack(bits=bits) for bits in (r.quantize or [])}
    if r.relearn is not None:
        trained, scored = lm_pipeline.relearn_split(prepared["forget"], r.relearn.share, cfg.data.seed)
        found["relearn"] = ClassifierAttack(train_set="forget", train_rows=tuple(trained), scored=scored)
        if r.relearn.benign:
            rows = lm_pipeline.benign_rows(prepared["retain"], r.relearn.steps * r.relearn.batch_size, cfg.data.seed)
            found["benign"] = ClassifierAttack(train_set="retain", train_rows=rows)
    return found


def attacked(cfg, model: nn.Module, attack: ClassifierAttack, sets: dict[str, tuple]) -> nn.Module:
    """A copy of `model` after the attack; `model` is left as it was."""
    if attack.bits is not None:
        return fake_quantize(model, attack.bits)
    relearning = cfg.robustness.relearn
    x, y = (torch.as_tensor(a) for a in sets[attack.train_set])
    batches = ((x[rows].float(), y[rows].long())
               for rows in batch_rows(attack.train_rows, relearning.steps, relearning.batch_size, cfg.data.seed))
    return relearn(model, batches, cfg.relearn_lr, lambda tuned, batch: nn.functional.cross_entropy(tuned(batch[0]), batch[1]))


def forget_correct(model: nn.Module, sets: dict[str, tuple]) -> np.ndarray:
    """Per forget row, whether the model classifies it right."""
    return evaluate.predict(model, *sets["forget"]).correct


def attack_metrics(name: str, model: np.ndarray, original: np.ndarray, after: np.ndarray,
                   scored: np.ndarray | None) -> dict[str, float | None]:
    """One attack's columns from per-forget-row correctness of the model, the original and the
    attacked model, on the `scored` rows (None: all)."""
    keep = np.ones(len(model), bool) if scored is None else scored
    model_acc, original_acc, after_acc = (float(c[keep].mean()) for c in (model, original, after))
    return {f"forget_acc_{name}": after_acc,
            f"recovered_acc_{name}": recovered_share(original_acc, model_acc, after_acc)}
