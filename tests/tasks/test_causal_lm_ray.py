"""A causal-LM unlearning job through the whole engine: Ray Data tokenises the QA rows on the
cluster, two Ray Train workers run HAMU-Q under ZeRO-3, the driver publishes a Hugging Face
directory. Checked against the single-process step, and for disjoint per-rank rows."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hamu_ray.engine.config import parse_config
from hamu_ray.tasks.causal_lm import MODEL_DIR, CausalLMTask
from tests.lm_fixtures import lm_batch, qa_rows
from tests.tasks.test_causal_lm_zero import run_steps

pytestmark = pytest.mark.integration

LR, STEPS, WORKERS = 0.1, 3, 2
HAMU = {"name": "hamu-q", "hparams": {"constraint": 0.02, "radius": 0.2}}


@pytest.fixture(scope="module")
def qa_sets(tmp_path_factory):
    root, rows = tmp_path_factory.mktemp("qa"), qa_rows()
    pq.write_table(pa.Table.from_pylist(rows[:8]), root / "forget.parquet")
    pq.write_table(pa.Table.from_pylist(rows[8:24]), root / "retain.parquet")
    return root, {"forget": rows[:8], "retain": rows[8:24]}


def job(tiny_lm, root, out, **data) -> dict:
    """Full-batch steps (each worker's batch is its whole shard), so any row order gives the
    same gradients and the single-process step on the whole sets is the reference."""
    return parse_config({
        "data": {"forget": str(root / "forget.parquet"), "retain": str(root / "retain.parquet"),
                 "retain_batch_size": 16 // WORKERS, "forget_batch_size": 8 // WORKERS, **data},
        "model": {"kind": "causal_lm", "path": str(tiny_lm)},
        "method": HAMU,
        "train": {"lr": LR, "epochs": STEPS, "zero_stage": 3},
        "cluster": {"num_workers": WORKERS},
        "output_dir": str(out)})


def digest(directory) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_two_zero3_workers_equal_the_single_process_step(ray_cluster, tiny_lm, qa_sets, tmp_path):
    from transformers import AutoModelForCausalLM

    from hamu_ray.engine.driver import run_unlearning
    from hamu_ray.engine.grads import TorchGrads

    root, rows = qa_sets
    before = digest(tiny_lm)
    result = run_unlearning(job(tiny_lm, root, tmp_path / "out"))
    assert result.steps == STEPS and digest(tiny_lm) == before  # the input model is only read
    exported = AutoModelForCausalLM.from_pretrained(result.output_dir / MODEL_DIR)

    task = CausalLMTask(job(tiny_lm, root, tmp_path / "unused"))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    whole = (lm_batch(task, rows["retain"]), lm_batch(task, rows["forget"]))
    run_steps(task, grads, lambda b: task.scores(model, b), None, [whole] * STEPS)
    expected = model.state_dict()
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)


def test_ranks_get_disjoint_retain_and_forget_rows(ray_cluster, tiny_lm, qa_sets, tmp_path):
    """Every rank's batches come from its own rows (a known toolkit gives every rank the same
    retain rows): through the driver's own preparation and the engine's sharding."""
    from hamu_ray.engine import data
    from hamu_ray.engine.driver import check_inputs, prepared_sets

    root, _ = qa_sets
    cfg = job(tiny_lm, root, tmp_path / "out", retain_batch_size=2, forget_batch_size=1)
    task = CausalLMTask(cfg)
    shards = data.worker_shards(prepared_sets(cfg, check_inputs(cfg)), WORKERS)
    seen = []
    for rank, shard in enumerate(shards):
        pairs = data.paired_batches(shard["retain"], shard["forget"], retain_batch_size=2,
                                    forget_batch_size=1, anchor="retain", epochs=1,
                                    make_batch=task.make_batch, shuffle_seed=0, rank=rank)
        rows = {"retain": set(), "forget": set()}
        for retain, forget in pairs:
            for role, batch in (("retain", retain), ("forget", forget)):
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                    rows[role].add(tuple(ids[mask.bool()].tolist()))
        seen.append(rows)
    for role, total in (("retain", 16), ("forget", 8)):
        assert not seen[0][role] & seen[1][role], role
        assert len(seen[0][role]) + len(seen[1][role]) == total, role


def test_truncated_rows_are_counted_and_rows_without_an_answer_refused_before_training(
        ray_cluster, tiny_lm, qa_sets, tmp_path, capsys):
    from hamu_ray.engine.driver import check_inputs, prepared_sets
    from hamu_ray.errors import UserError

    root, rows = qa_sets
    # the longest forget row: a limit one token below it cuts exactly the rows that long
    task = CausalLMTask(job(tiny_lm, root, tmp_path / "out"))
    lengths = sorted(len(lm_batch(task, [r])["input_ids"][0]) for r in rows["forget"])
    cfg = job(tiny_lm, root, tmp_path / "out", text={"max_length": lengths[-1] - 1})
    prepared_sets(cfg, check_inputs(cfg))
    cut = sum(n == lengths[-1] for n in lengths)
    assert f"forget set: {cut} of 8 rows cut at data.text.max_length={lengths[-1] - 1}" in capsys.readouterr().out
    cfg = job(tiny_lm, root, tmp_path / "out", text={"max_length": 8})  # shorter than any prompt
    with pytest.raises(UserError, match=r"retain set .*retain.parquet: 16 row\(s\) keep no answer token"):
        prepared_sets(cfg, check_inputs(cfg))
