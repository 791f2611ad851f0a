"""The attacks on a classifier (hamu_ray.pipeline.classifier_attacks) against plain torch and
hand-computed accuracies."""

from __future__ import annotations

import copy
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hamu_ray.attacks.quantize import fake_quantize
from hamu_ray.attacks.relearn import batch_rows
from hamu_ray.pipeline.classifier_attacks import attack_metrics, attacked, forget_correct
from hamu_ray.pipeline.lm_evaluate import Relearning
from hamu_ray.pipeline.lm_pipeline import Attack


def test_an_attacks_accuracy_and_recovered_share_are_taken_on_its_scored_rows():
    model = np.array([0, 0, 0, 1], bool)       # 1/3 right on the scored rows 0..2
    original = np.array([1, 1, 1, 0], bool)    # 3/3
    after = np.array([1, 0, 0, 1], bool)       # 1/3: row 0 is right again
    scored = np.array([True, True, True, False])
    assert attack_metrics("relearn", model, original, after, scored) == {
        "forget_acc_relearn": pytest.approx(1 / 3), "recovered_acc_relearn": pytest.approx((1 / 3 - 0) / (1 - 0))}
    # every row: model 1/4, original 3/4, after 2/4 → half the forgetting back
    assert attack_metrics("int4", model, original, after, None) == {
        "forget_acc_int4": 0.5, "recovered_acc_int4": pytest.approx(0.5)}
    assert attack_metrics("int8", original, original, after, None)["recovered_acc_int8"] is None  # the original


def small_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_relearning_a_classifier_is_adamw_on_its_rows_and_quantizing_is_fake_quantize(tmp_path):
    rng = np.random.default_rng(0)
    sets = {"forget": (rng.normal(size=(12, 6)).astype(np.float32), rng.integers(0, 3, 12)),
            "retain": (rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 3, 20))}
    retain = tmp_path / "retain.parquet"
    pq.write_table(pa.table({"x": list(sets["retain"][0]), "y": sets["retain"][1]}), retain)
    model = small_classifier()
    before = copy.deepcopy(model.state_dict())
    relearning = Relearning(str(retain), (1, 4, 7, 9, 12), steps=4, lr=0.01, batch_size=3, seed=5)
    tuned = attacked(model, Attack({"relearning": relearning}))

    reference = copy.deepcopy(model)  # plain torch: AdamW without weight decay, one step per batch
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.0)
    x, y = (torch.as_tensor(a) for a in sets["retain"])
    for rows in batch_rows((1, 4, 7, 9, 12), 4, 3, 5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(x[rows]), y[rows].long()).backward()
        optimizer.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], value, rtol=0, atol=0)
        torch.testing.assert_close(model.state_dict()[name], before[name], rtol=0, atol=0)  # the model stays
    assert not torch.equal(tuned.state_dict()["0.weight"], before["0.weight"])

    int4 = attacked(model, Attack({"quantize_bits": 4}))
    expected = fake_quantize(model, 4)
    assert all(torch.equal(int4.state_dict()[k], v) for k, v in expected.state_dict().items())
    logits = expected(torch.as_tensor(sets["forget"][0])).argmax(-1).numpy()
    assert (forget_correct(int4, sets) == (logits == sets["forget"][1])).all()
