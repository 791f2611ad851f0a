"""Relearning: fine-tune an unlearned model briefly on a little of what it forgot (or on data it
kept) and see how much of the rest comes back (Hu et al., arXiv 2406.13356; Łucki et al.,
arXiv 2410.08827: a few steps on a few forget facts restore most of an unlearned model's
accuracy on the others).

Plain AdamW (no weight decay) on the given batches, one step each, in a copy of the model.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Relearning:
    """The relearning attack's fine-tuning before a scoring: `steps` AdamW steps at `lr` on
    batches of `batch_size` of the given `rows` (row numbers) of the parquet file `path`, in a
    seeded order (batch_rows)."""
    path: str
    rows: tuple[int, ...]
    steps: int
    lr: float
    batch_size: int
    seed: int


def relearn(model: nn.Module, batches: Iterable, lr: float,
            loss: Callable[[nn.Module, object], torch.Tensor]) -> nn.Module:
    """A copy of `model` after one AdamW step at `lr` per batch on `loss(model, batch)`, in eval
    mode; the given model is left as it was."""
    tuned = copy.deepcopy(model)
    tuned.train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss(tuned, batch).backward()
        optimizer.step()
    return tuned.eval()


def batch_rows(rows: Sequence[int], steps: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """`steps` batches of `batch_size` of `rows` (fewer when there are fewer rows): epochs of a
    seeded shuffle, one after another, a batch never straddling two."""
    rng = random.Random(seed)
    size = min(batch_size, len(rows))
    order: list[int] = []
    for _ in range(steps):
        if len(order) < size:
            order = list(rows)
            rng.shuffle(order)
        yield order[:size]
        order = order[size:]
