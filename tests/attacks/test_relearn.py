"""The relearning attack's fine-tuning: the batch order, and a copy trained while the model stays."""

from __future__ import annotations

import torch
from torch import nn

from hamu_ray.attacks.relearn import batch_rows, relearn


def test_batches_are_seeded_epochs_of_distinct_rows():
    rows = [10, 11, 12, 13, 14, 15]
    batches = list(batch_rows(rows, steps=6, batch_size=2, seed=3))
    assert len(batches) == 6 and all(len(b) == len(set(b)) == 2 for b in batches)
    for epoch in (batches[:3], batches[3:]):  # every row once per epoch of 3 batches
        assert sorted(r for b in epoch for r in b) == rows
    assert batches == list(batch_rows(rows, steps=6, batch_size=2, seed=3))
    assert batches != list(batch_rows(rows, steps=6, batch_size=2, seed=4))


def test_a_batch_never_straddles_two_epochs_and_is_cut_to_the_rows():
    # 3 rows in batches of 2: the odd row out waits for a fresh shuffle, never joins the next epoch's
    assert all(len(b) == 2 for b in batch_rows([1, 2, 3], steps=5, batch_size=2, seed=0))
    assert all(sorted(b) == [7, 8] for b in batch_rows([7, 8], steps=3, batch_size=8, seed=0))


def test_relearn_trains_a_copy_in_eval_mode_and_leaves_the_model():
    """AdamW without weight decay, one step per batch: the loss of the copy falls on its data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def loss(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    tuned = relearn(model, [(x, y)] * 20, lr=0.05, loss=loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not tuned.training
    with torch.no_grad():
        assert loss(tuned, (x, y)) < 0.5 * loss(model.eval(), (x, y))
