"""A causal-LM unlearning job through the whole engine: the workers tokenise the QA rows on the
cluster, two Ray Train workers run HAMU-Q under ZeRO-3, the driver publishes a Hugging Face
directory. Checked against the single-process step, and for disjoint per-rank rows."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
import pytest
import torch

from hamu_ray.engine.config import parse_config
from hamu_ray.engine.worker import EXPORT_LOG
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


def job(tiny_lm, root, out, monitor=None, workers=WORKERS, zero_stage=3, evaluate=False, **data) -> dict:
    """Full-batch steps (each worker's batch is its whole shard), so any row order gives the
    same gradients and the single-process step on the whole sets is the reference. `evaluate`:
    the final model scored on forget and retain by the workers (batches of 3: uneven)."""
    monitor = {"monitor": {"forget": str(root / "forget.parquet"), "retain": str(root / "retain.parquet"),
                           "every": 1, "batch_size": 5, **monitor}} if monitor is not None else {}
    if evaluate:
        monitor["evaluation"] = {"sets": {name: str(root / f"{name}.parquet") for name in ("forget", "retain")},
                                 "batch_size": 3, "max_new_tokens": 6}
    return parse_config({**monitor,
        "data": {"forget": str(root / "forget.parquet"), "retain": str(root / "retain.parquet"),
                 "retain_batch_size": 16 // workers, "forget_batch_size": 8 // workers, **data},
        "model": {"kind": "causal_lm", "path": str(tiny_lm)},
        "method": HAMU,
        "train": {"lr": LR, "epochs": STEPS, "zero_stage": zero_stage},
        "cluster": {"num_workers": workers},
        "output_dir": str(out)})


def digest(directory) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def monitored_run(ray_cluster, tiny_lm, qa_sets, tmp_path_factory):
    """HAMU-Q on two ZeRO-3 workers, evaluated during the run at every step."""
    from hamu_ray.engine.driver import run_unlearning

    root, _ = qa_sets
    before = digest(tiny_lm)
    result = run_unlearning(job(tiny_lm, root, tmp_path_factory.mktemp("run") / "out", monitor={}, evaluate=True))
    assert digest(tiny_lm) == before  # the input model is only read
    log = [json.loads(line) for line in (result.output_dir / EXPORT_LOG).read_text().splitlines()]
    return result, log


def test_two_zero3_workers_equal_the_single_process_step(tiny_lm, qa_sets, monitored_run, tmp_path):
    """...with evaluation during the run on: it does not change the training."""
    from transformers import AutoModelForCausalLM

    from hamu_ray.engine.grads import TorchGrads

    root, rows = qa_sets
    result, _ = monitored_run
    assert result.steps == STEPS
    exported = AutoModelForCausalLM.from_pretrained(result.output_dir / MODEL_DIR)

    task = CausalLMTask(job(tiny_lm, root, tmp_path / "unused"))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    whole = (lm_batch(task, rows["retain"]), lm_batch(task, rows["forget"]))
    # the job's account: every row's tokens once a step (full-batch steps), the widest batch
    # as wide as the longest row
    used = json.loads((result.output_dir / "summary.json").read_text())["usage"]
    assert used["tokens_per_step"] == sum(int(b["attention_mask"].sum()) for b in whole)
    assert used["longest_batch"] == max(b["attention_mask"].shape[1] for b in whole)
    run_steps(task, grads, lambda b: task.scores(model, b), None, [whole] * STEPS)
    expected = model.state_dict()
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)


def assert_scores_equal(got: dict, expected: dict) -> None:
    """Per-example scores alike: the same sets and scores, numbers to 1e-5, ROUGE identical."""
    assert {name: set(s) for name, s in got.items()} == {name: set(s) for name, s in expected.items()}
    for name, scores in expected.items():
        for score, values in scores.items():
            if score == "rouge":
                assert got[name][score].tolist() == values.tolist(), name
            else:
                np.testing.assert_allclose(got[name][score], values, rtol=1e-5, atol=1e-6, err_msg=f"{name} {score}")


def test_the_job_evaluates_its_final_model_on_its_workers_as_one_process_scores_the_export(
        qa_sets, monitored_run):
    from hamu_ray.engine import evaluation
    from hamu_ray.pipeline import lm_evaluate

    root, _ = qa_sets
    result, _ = monitored_run
    got = evaluation.read_scores(result.output_dir / evaluation.SCORES_FILE)
    sets = {name: str(root / f"{name}.parquet") for name in ("forget", "retain")}
    expected = lm_evaluate.score_model(str(result.output_dir / MODEL_DIR), sets, {}, max_new_tokens=6)
    assert_scores_equal(got, expected)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["evaluation_s"] > 0 and summary["evaluation_whole_model"] is True  # auto: it fits


def test_an_evaluation_only_job_scores_the_model_as_given_on_zero3_workers(ray_cluster, tiny_lm, qa_sets, tmp_path):
    from hamu_ray.engine.driver import run_evaluation
    from hamu_ray.pipeline import lm_evaluate

    root, _ = qa_sets
    before = digest(tiny_lm)
    got = run_evaluation(job(tiny_lm, root, tmp_path / "unused", evaluate=True))
    assert digest(tiny_lm) == before and not (tmp_path / "unused").exists()
    sets = {name: str(root / f"{name}.parquet") for name in ("forget", "retain")}
    assert_scores_equal(got.scores, lm_evaluate.score_model(str(tiny_lm), sets, {}, max_new_tokens=6))
    assert got.seconds > 0


def test_monitor_values_are_the_answer_probabilities_of_the_model_at_that_step(
        tiny_lm, qa_sets, monitored_run, tmp_path):
    """Step 0 scores the original and the last step the exported model, each equal to a plain
    transformers computation of TOFU's answer probability, row by row, and to the driver's
    single-process monitor_values (which a pipeline uses for the oracle's stop target)."""
    from transformers import AutoModelForCausalLM

    from hamu_ray.engine.driver import monitor_values
    from hamu_ray.tasks.lm_scores import answer_scores
    from hamu_ray.tasks.causal_lm import TextData, load_tokenizer

    root, rows = qa_sets
    result, log = monitored_run
    assert [r["step"] for r in log] == list(range(STEPS + 1))
    for position, model_dir in ((0, tiny_lm), (-1, result.output_dir / MODEL_DIR)):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = load_tokenizer(str(model_dir))
        single = monitor_values(job(model_dir, root, tmp_path / "unused", monitor={}))
        for role in ("forget", "retain"):
            with torch.no_grad():
                logprob, count, _ = answer_scores(model, tokenizer, [r["question"] for r in rows[role]],
                                                  [r["answer"] for r in rows[role]], TextData(), batch_size=1)
            expected = float(np.mean(np.exp(logprob / count)))
            assert log[position][f"monitor/{role}_prob"] == pytest.approx(expected, rel=1e-5), (position, role)
            assert single[f"monitor/{role}_prob"] == pytest.approx(expected, rel=1e-5), (position, role)
            assert log[position][f"monitor/{role}_loss"] == pytest.approx(np.mean(-logprob / count), rel=1e-5)
    assert log[-1]["monitor/forget_prob"] < log[0]["monitor/forget_prob"]  # HAMU-Q forgets


def test_a_forget_target_stops_at_the_first_evaluation_that_meets_it(tiny_lm, qa_sets, monitored_run, tmp_path):
    """The same run (full batch: one ZeRO-0 worker takes the same steps) with a target between
    the forget probabilities after steps 1 and 2 stops after step 2, and exports that model; a
    target the original already meets takes no step."""
    from transformers import AutoModelForCausalLM

    from hamu_ray.engine.driver import run_unlearning

    root, _ = qa_sets
    _, log = monitored_run
    prob = [r["monitor/forget_prob"] for r in log]
    assert prob[2] < prob[1] < prob[0]
    result = run_unlearning(job(tiny_lm, root, tmp_path / "out", workers=1, zero_stage=0,
                                monitor={"every": 2, "stop_forget_prob": (prob[1] + prob[2]) / 2}))
    stopped = [json.loads(line) for line in (result.output_dir / EXPORT_LOG).read_text().splitlines()]
    assert (result.steps, result.stop) == (2, "forget_target")
    assert "monitor/forget_prob" not in stopped[1]  # every 2 steps: step 1 is not evaluated
    assert stopped[2]["monitor/forget_prob"] == pytest.approx(prob[2], rel=1e-5)

    result = run_unlearning(job(tiny_lm, root, tmp_path / "none", workers=1, zero_stage=0,
                                monitor={"stop_forget_prob": 1.0}))
    assert (result.steps, result.stop) == (0, "forget_target")
    exported = AutoModelForCausalLM.from_pretrained(result.output_dir / MODEL_DIR).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict().items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)


def test_ranks_get_disjoint_retain_and_forget_rows(ray_cluster, tiny_lm, qa_sets, tmp_path):
    """Every rank's batches come from its own rows (a known toolkit gives every rank the same
    retain rows): through the driver's own preparation and the engine's sharding."""
    from hamu_ray.engine import shards
    from hamu_ray.engine.driver import check_inputs
    from hamu_ray.engine.worker import Prepared

    root, _ = qa_sets
    cfg = job(tiny_lm, root, tmp_path / "out", retain_batch_size=2, forget_batch_size=1)
    check_inputs(cfg)
    task = CausalLMTask(cfg)
    seen = []
    for rank in range(WORKERS):
        prepared = Prepared(task)
        pairs = shards.paired_batches(prepared.rank_shard(cfg, "retain", rank, WORKERS),
                                      prepared.rank_shard(cfg, "forget", rank, WORKERS), retain_batch_size=2,
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


def read_whole(cfg, role: str) -> tuple[list[dict], dict]:
    """A set's prepared rows as a worker (the only rank) reads them, in file order, and the counts."""
    from hamu_ray.engine.worker import Prepared

    prepared = Prepared(CausalLMTask(cfg))
    shard = prepared.rank_shard(cfg, role, 0, 1)
    rows = [row for window in shard.windows(None) for row in window.to_pylist()]
    return rows, prepared.tallies[role]


def test_truncated_rows_are_counted_and_rows_without_an_answer_refused_as_read(tiny_lm, qa_sets, tmp_path):
    from hamu_ray.errors import UserError

    root, rows = qa_sets
    # the longest forget row: a limit one token below it cuts exactly the rows that long
    task = CausalLMTask(job(tiny_lm, root, tmp_path / "out"))
    lengths = sorted(len(lm_batch(task, [r])["input_ids"][0]) for r in rows["forget"])
    cfg = job(tiny_lm, root, tmp_path / "out", text={"max_length": lengths[-1] - 1})
    _, counts = read_whole(cfg, "forget")
    cut = sum(n == lengths[-1] for n in lengths)
    assert counts == {"rows": 8, "truncated": cut} and cut > 0
    assert CausalLMTask(cfg).prepared_lines({"forget": counts, "retain": {"rows": 16, "truncated": 0}}) == [
        f"forget set: {cut} of 8 rows read were cut at data.text.max_length={lengths[-1] - 1}"]
    cfg = job(tiny_lm, root, tmp_path / "out", text={"max_length": 8})  # shorter than any prompt
    with pytest.raises(UserError, match=r"retain set .*retain.parquet: 16 row\(s\) keep no answer token"):
        read_whole(cfg, "retain")


def test_forget_tokens_fact_trains_and_monitors_the_fact_spans_only(ray_cluster, tiny_lm, tmp_path):
    """With data.forget_tokens fact the prepared forget rows are fact_encoding's (the retain
    rows whole answers), the monitor's forget probability is the facts' (by hand, row by row),
    and a forget row without its fact, or a set without the column, is refused by name."""
    from transformers import AutoModelForCausalLM

    from hamu_ray.engine.data import DataError
    from hamu_ray.engine.driver import check_inputs, monitor_values, run_unlearning
    from hamu_ray.errors import UserError
    from hamu_ray.tasks.causal_lm import TextData, encode_qa, fact_encoding, load_tokenizer
    from tests.tasks.test_causal_lm import answer_logprob_by_hand

    rows = [{**r, "fact": r["answer"].split()[-1]} for r in qa_rows()]
    pq.write_table(pa.Table.from_pylist(rows[:8]), tmp_path / "forget.parquet")
    pq.write_table(pa.Table.from_pylist(rows[8:24]), tmp_path / "retain.parquet")
    cfg = job(tiny_lm, tmp_path, tmp_path / "out", monitor={}, forget_tokens="fact")
    check_inputs(cfg)
    tokenizer, text = load_tokenizer(str(tiny_lm)), TextData()
    for role, part, encode in (("forget", rows[:8], lambda r: fact_encoding(tokenizer, r["question"], r["answer"], r["fact"], text)),
                               ("retain", rows[8:24], lambda r: encode_qa(tokenizer, r["question"], r["answer"], "auto"))):
        got = {(tuple(r["input_ids"]), tuple(r["labels"])) for r in read_whole(cfg, role)[0]}
        assert got == {tuple(map(tuple, encode(r))) for r in part}, role

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    per_row = [answer_logprob_by_hand(model, *fact_encoding(tokenizer, r["question"], r["answer"], r["fact"], text))
               for r in rows[:8]]
    expected = float(np.mean([np.exp(total / count) for total, count in per_row]))
    assert monitor_values(cfg)["monitor/forget_prob"] == pytest.approx(expected, rel=1e-5)

    pq.write_table(pa.Table.from_pylist([{**r, "fact": None if i == 3 else r["fact"]} for i, r in enumerate(rows[:8])]),
                   tmp_path / "forget.parquet")
    with pytest.raises(UserError, match=r"forget set .*forget.parquet: 1 row\(s\) have no fact found"):
        read_whole(cfg, "forget")
    with pytest.raises(UserError, match=r"forget set .*forget.parquet: 1 row\(s\) have no fact found"):
        run_unlearning(cfg)  # found by the workers as they read: the job's error, no output
    assert not (tmp_path / "out").exists()
    pq.write_table(pa.Table.from_pylist(qa_rows()[:8]), tmp_path / "forget.parquet")
    with pytest.raises(DataError, match=r"forget set .*forget.parquet: missing column\(s\) fact"):
        check_inputs(cfg)
