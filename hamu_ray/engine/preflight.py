"""The hardness pre-flight's passes over the sets, on any GradAccess (plain torch or DeepSpeed).

No optimizer step is taken. `full_pass` accumulates this rank's pieces of the whole-set mean
gradients g_r and g_f batch by batch (each batch weighted by its rows) and returns their K×3
statistics, summed over ranks by the same single reduction as a step's. `row_alignment` then
takes the forget rows one at a time, every rank the same row (so DeepSpeed's averaged gradient
is that row's), and returns each row's (‖g_f,i‖², g_r·g_f,i), again one reduction for all rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from hamu_ray.engine.grads import GradAccess
from hamu_ray.rules import BlockStats

LossFn = Callable[[dict], torch.Tensor]
Reduce = Callable[[torch.Tensor], torch.Tensor]


def mean_gradient(grads: GradAccess, batches: Iterable[tuple[dict, int]], loss: LossFn,
                  total_rows: int) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Σ_batches (rows/total_rows)·∇loss(batch) as this rank's pieces (float32 accumulators), the
    per-block Σ_batches ‖∇loss(batch)‖² (this rank's partial sums, float64) and the batch count.
    `total_rows` counts one rank's rows: every rank sees as many, batch by batch."""
    total: list[torch.Tensor] | None = None
    batch_sq, count = None, 0
    for batch, rows in batches:
        grads.zero_grads()
        grads.backward(loss(batch))
        pieces = grads.local_grads()
        if total is None:
            total = [torch.zeros_like(g, dtype=torch.float32) for g in pieces]
            batch_sq = torch.zeros(len(pieces), dtype=torch.float64, device=pieces[0].device if pieces else None)
        for acc, g in zip(total, pieces):
            acc.add_(g.float(), alpha=rows / total_rows)
        batch_sq += BlockStats.from_grads(pieces, pieces).rr.to(batch_sq.device)
        count += 1
    grads.zero_grads()
    if total is None:
        raise ValueError("no batches: the pre-flight needs at least one row per worker in each set")
    return total, batch_sq, count


@dataclass(frozen=True)
class FullPass:
    stats: BlockStats  # of the whole-set mean gradients (global)
    batch_rr: torch.Tensor  # per block, the mean over batches of ‖g_r,batch‖² (global)
    batch_ff: torch.Tensor  # ... of ‖g_f,batch‖²
    retain_pieces: list[torch.Tensor]  # this rank's pieces of g_r, for the row pass


def full_pass(grads: GradAccess, retain: Iterable[tuple[dict, int]], forget: Iterable[tuple[dict, int]],
              retain_loss: LossFn, forget_loss: LossFn, *, retain_rows: int, forget_rows: int,
              reduce: Reduce | None) -> FullPass:
    """The whole-set statistics and the batches' mean squared norms, in one reduction of K×5."""
    g_r, retain_sq, retain_batches = mean_gradient(grads, retain, retain_loss, retain_rows)
    g_f, forget_sq, forget_batches = mean_gradient(grads, forget, forget_loss, forget_rows)
    stats = BlockStats.from_grads(g_r, g_f).to_tensor()
    table = torch.cat([stats, torch.stack([retain_sq, forget_sq], dim=1).to(stats.device)], dim=1)
    if not grads.holds_full_gradient:
        table = _reduced(table, reduce)
    table = table.cpu()
    result = FullPass(BlockStats.from_tensor(table[:, :3]), table[:, 3] / retain_batches,
                      table[:, 4] / forget_batches, g_r)
    result.stats.check_finite()
    return result


def row_alignment(grads: GradAccess, g_r: list[torch.Tensor], rows: Iterable[dict], forget_loss: LossFn,
                  reduce: Reduce | None) -> torch.Tensor:
    """[N, 2] float64 (‖g_f,i‖², g_r·g_f,i) for each row, summed over ranks."""
    values = []
    for row in rows:
        grads.zero_grads()
        grads.backward(forget_loss(row))
        stats = BlockStats.from_grads(g_r, [g.float() for g in grads.local_grads()])
        values.append(torch.stack([stats.ff.sum(), stats.rf.sum()]))  # this rank's partial sums
    grads.zero_grads()
    if not values:
        return torch.zeros(0, 2, dtype=torch.float64)
    table = torch.stack(values)
    if not grads.holds_full_gradient:
        table = _reduced(table, reduce)
    return table.cpu()


def _reduced(values: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
    if reduce is None:
        raise ValueError("this gradient backend holds shards: pass reduce=SumAcrossRanks()")
    return reduce(values)
