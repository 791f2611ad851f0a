"""Evaluation during a run (a job's `monitor:` section): how much of a small fixed sample of the
forget and of the retain set the model still knows, measured with the task's own scores.

The measure is the mean over rows of exp(log p(targets) / |targets|): for a language model TOFU's
length-normalised answer probability, for a classifier the probability of the true label. Every
rank scores every row of both samples (they are small): the ranks' forward passes then line up,
as ZeRO-3's parameter gathers require, and every rank gets the same numbers with no reduction.
"""

from __future__ import annotations

import math

import torch

from hamu_ray.engine import data

ROLES = ("forget", "retain")
FORGET_TARGET = "forget_target"  # the stop reason when the forget probability reaches the target


def dataset_name(role: str) -> str:
    return f"monitor_{role}"


def sample_paths(section) -> dict[str, str]:
    """Dataset name → file of a job's monitor samples."""
    return {dataset_name(role): getattr(section, role) for role in ROLES}


def sample_batches(samples: dict, task, batch_size: int, device: torch.device | None = None) -> dict[str, list[dict]]:
    """Both samples (engine.shards.Shard, whole) as the task's batches, every row kept, in file order."""
    batches = {}
    for role in ROLES:
        rows = samples[dataset_name(role)].batches(batch_size, None, drop_last=False)
        batches[role] = [data.to_device(task.make_batch(b), device) if device else task.make_batch(b)
                         for b in rows]
    return batches


ROW_LOSSES = "monitor/forget_row_loss"  # the forget sample's per-row losses (a list)


@torch.no_grad()
def measure(model, task, batches: dict[str, list[dict]]) -> dict:
    """`monitor/<role>_prob` (mean per-row probability) and `monitor/<role>_loss` (mean per-row
    length-normalised negative log-likelihood), in eval mode; and the forget sample's per-row
    losses (numbers only), from which a pipeline computes forget quality against the oracle's."""
    was_training = model.training
    model.eval()
    try:
        values = {}
        for role, role_batches in batches.items():
            per_row = torch.cat([s.logprob / s.count for s in (task.scores(model, b) for b in role_batches)])
            values[f"monitor/{role}_prob"] = per_row.exp().mean().item()
            values[f"monitor/{role}_loss"] = (-per_row).mean().item()
            if role == "forget":
                values[ROW_LOSSES] = (-per_row).double().tolist()
        return values
    finally:
        model.train(was_training)


def scalars(record: dict) -> dict:
    """A step record without the per-row list: what goes into Ray Train's reports."""
    return {key: value for key, value in record.items() if key != ROW_LOSSES}


class Monitor:
    """The worker's side: when to evaluate, and whether the forget target is reached."""

    def __init__(self, section, task, batches: dict[str, list[dict]], step_log: list[dict] = ()):
        self.every, self.target = section.every, section.stop_forget_prob
        self.task, self.batches = task, batches
        # (step, forget prob) of the evaluations so far (a resumed run's from its step log)
        self.history = [(r["step"], r["monitor/forget_prob"]) for r in step_log if "monitor/forget_prob" in r]

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == next_evaluation(self.history, self.target, self.every)

    def evaluate(self, model, step: int) -> dict:
        """The monitor's values, and `stop` = forget_target when the target is reached."""
        values = measure(model, self.task, self.batches)
        self.history.append((step, values["monitor/forget_prob"]))
        if self.target is not None and values["monitor/forget_prob"] <= self.target:
            values["stop"] = FORGET_TARGET
        return values


def next_evaluation(history: list[tuple[int, float]], target: float | None, every: int) -> int | None:
    """An extra evaluation before the next multiple of `every` when the forget probability is
    heading for the target: the last two evaluations, extrapolated log-linearly, say in how many
    steps it gets there; evaluating after half of them (at least one) closes in geometrically,
    so the stop lands near the target instead of up to `every` steps past it. None: no extra."""
    if target is None or target <= 0 or len(history) < 2:
        return None
    (s0, p0), (s1, p1) = history[-2], history[-1]
    if not (p1 > target and 0 < p1 < p0 and s1 > s0):
        return None
    rate = (math.log(p1) - math.log(p0)) / (s1 - s0)  # per step, < 0
    steps_to_target = (math.log(target) - math.log(p1)) / rate
    return s1 + max(1, min(every, int(steps_to_target / 2)))
