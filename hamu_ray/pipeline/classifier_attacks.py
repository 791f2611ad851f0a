"""The robustness attacks on a classifier pipeline's models: accuracy in place of probability.

The attacks are the language models' (hamu_ray.attacks; README, "Does the forgetting survive
attacks?"): int8/int4 fake quantization of the linear layers, relearning on a held-apart share
of the forget rows (scored on the others), and benign relearning on retain rows (scored on every
forget row), planned by lm_pipeline.attacks as on a language model. A classifier's forget rows
have no entity column, so relearning holds rows apart (lm_pipeline.relearn_split). Per attack
the table gains `forget_acc_<attack>` and `recovered_acc_<attack>` = (attacked − unlearned) / (original − unlearned) forget accuracy on the
same rows. No Ray here: numpy arrays and torch modules in, numbers out.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hamu_ray.attacks.quantize import fake_quantize
from hamu_ray.attacks.recovery import recovered_share
from hamu_ray.attacks.relearn import batch_rows, relearn
from hamu_ray.pipeline import datasets, evaluate
from hamu_ray.pipeline.lm_pipeline import Attack


def attack_columns(names: list[str]) -> tuple[str, ...]:
    return tuple(column for name in names for column in (f"forget_acc_{name}", f"recovered_acc_{name}"))


def attacked(model: nn.Module, attack: Attack, read=datasets.read_split) -> nn.Module:
    """A copy of `model` after one attack of lm_pipeline.attacks (quantized, or relearned on the
    rows its Relearning (attacks.relearn) names, from that set's file as `read` gives it: a caller attacking many
    models passes a cached reader); `model` is left as it was."""
    if "quantize_bits" in attack.fields:
        return fake_quantize(model, attack.fields["quantize_bits"])
    how = attack.fields["relearning"]
    split = read(how.path)
    x, y = torch.as_tensor(split.x), torch.as_tensor(split.y)
    batches = ((x[rows].float(), y[rows].long())
               for rows in batch_rows(how.rows, how.steps, how.batch_size, how.seed))
    return relearn(model, batches, how.lr, lambda tuned, batch: nn.functional.cross_entropy(tuned(batch[0]), batch[1]))


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
