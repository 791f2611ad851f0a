"""Language-model evaluation: the per-example scores a Ray task computes, against plain
transformers on one unpadded row at a time, and the metrics from them, by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import ks_2samp

from hamu_ray.pipeline import lm_evaluate, lm_metrics
from hamu_ray.tasks.causal_lm import TextData, encode_qa, load_tokenizer, prompt_tokens
from tests.lm_fixtures import qa_rows

ROWS = 6


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    rows = [{**r, "paraphrased_answer": r["answer"].upper(),
             "perturbed_answers": [r["answer"][::-1], "no", r["question"]]} for r in qa_rows()[:ROWS]]
    path = tmp_path_factory.mktemp("qa") / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path), rows


@pytest.fixture(scope="module")
def scored(tiny_lm, qa_file):
    path, _ = qa_file
    # batch 4 over 6 rows: two batches, the second padded differently from the first
    return lm_evaluate.score_model(str(tiny_lm), {"forget": path}, TextData().model_dump(),
                                   batch_size=4, max_new_tokens=6)["forget"]


def row_logprobs(model, tokenizer, question: str, answer: str) -> np.ndarray:
    """The answer tokens' log-probs of one unpadded row, by plain transformers."""
    ids, labels = encode_qa(tokenizer, question, answer, "auto")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    targets = torch.tensor(labels[1:])
    lp = torch.log_softmax(logits.double(), -1)[torch.arange(len(targets)), targets.clamp(min=0)]
    return lp[targets != -100].numpy()


def test_answer_scores_equal_one_unpadded_row_at_a_time(tiny_lm, qa_file, scored):
    from transformers import AutoModelForCausalLM

    _, rows = qa_file
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), load_tokenizer(str(tiny_lm))
    answer = [row_logprobs(model, tokenizer, r["question"], r["answer"]) for r in rows]
    assert scored["logprob"] == pytest.approx([lp.sum() for lp in answer], rel=1e-4)
    assert scored["count"].tolist() == [len(lp) for lp in answer]
    assert scored["min_k"] == pytest.approx(
        [np.sort(lp)[:max(1, int(0.4 * len(lp)))].mean() for lp in answer], rel=1e-4)
    para = [row_logprobs(model, tokenizer, r["question"], r["paraphrased_answer"]) for r in rows]
    assert scored["paraphrased_logp"] == pytest.approx([lp.mean() for lp in para], rel=1e-4)
    perturbed = [[row_logprobs(model, tokenizer, r["question"], a).mean() for a in r["perturbed_answers"]]
                 for r in rows]
    assert scored["perturbed_logp"].shape == (ROWS, 3)
    assert scored["perturbed_logp"] == pytest.approx(np.array(perturbed), rel=1e-4)


def test_greedy_answers_equal_a_token_by_token_argmax_loop(tiny_lm, qa_file, scored):
    from transformers import AutoModelForCausalLM

    _, rows = qa_file
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), load_tokenizer(str(tiny_lm))
    answers = []
    for r in rows:  # no padding, no generate(): argmax, append, until EOS or 6 new tokens
        ids = prompt_tokens(tokenizer, r["question"], "auto")
        new = []
        with torch.no_grad():
            while len(new) < 6:
                token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    assert scored["rouge"] == pytest.approx(lm_metrics.rouge_l_recall(answers, [r["answer"] for r in rows]))


def scores_of(prob: list[float], rouge: list[float], min_k: list[float], para=None, pert=None) -> dict:
    """A set's scores with one-token answers: log-prob = log(probability)."""
    s = {"logprob": np.log(prob), "count": np.ones(len(prob)), "rouge": np.array(rouge),
         "min_k": np.array(min_k)}
    if para is not None:
        s["paraphrased_logp"], s["perturbed_logp"] = np.log(para), np.log(pert)
    return s


def test_model_metrics_by_hand_and_absent_without_an_oracle():
    model = {"forget": scores_of([0.5, 0.1], [1.0, 0.5], [-1.0, -2.0], para=[0.5, 0.2], pert=[[0.25], [0.4]]),
             "retain": scores_of([0.8, 0.6], [1.0, 0.6], [-1.0, -1.0], para=[0.5, 0.5], pert=[[0.25], [0.5]]),
             "holdout": scores_of([0.1, 0.1], [0.0, 0.0], [-3.0, -1.5])}
    oracle = {"forget": scores_of([0.1, 0.1], [0.2, 0.2], [-3.0, -2.0], para=[0.1, 0.1], pert=[[0.4], [0.8]]),
              "retain": model["retain"], "holdout": model["holdout"]}
    m = lm_evaluate.model_metrics(model, oracle)
    assert m["forget_prob"] == pytest.approx(0.3) and m["forget_rouge"] == pytest.approx(0.75)
    # forget truth ratios 0.5 and 2 → min(R, 1/R) = 0.5 each; retain 0.5 and 1 → 1 − R = 0.5, 0
    assert m["forget_truth"] == pytest.approx(0.5) and m["retain_truth"] == pytest.approx(0.25)
    assert m["model_utility"] == pytest.approx(3 / (1 / 0.7 + 1 / 0.8 + 1 / 0.25))
    # members' Min-K −1, −2 vs non-members −3, −1.5: 3 of 4 pairs ranked right
    assert m["mia_auc"] == pytest.approx(0.75)
    # the oracle's ratios 4 and 8 lie above both of the model's (0.5, 2): KS statistic 1, and
    # 2 of the C(4, 2) = 6 equally likely orders of four values are that far apart: p = 1/3
    assert m["forget_quality"] == pytest.approx(1 / 3)
    assert m["forget_quality"] == pytest.approx(ks_2samp([0.5, 2.0], [4.0, 8.0]).pvalue)
    oracle_auc = 1.5 / 4  # −3, −2 vs −3, −1.5: one pair right, one tie (half)
    assert m["priv_leak"] == pytest.approx(((1 - 0.75) - (1 - oracle_auc)) / (1 - oracle_auc) * 100)
    alone = lm_evaluate.model_metrics(model, None)
    assert alone["forget_quality"] is None and alone["priv_leak"] is None
    assert alone["mia_auc"] == m["mia_auc"]
    without_truth = {name: {k: v for k, v in s.items() if not k.endswith("_logp")}
                     for name, s in model.items()}
    bare = lm_evaluate.model_metrics(without_truth, oracle)
    assert bare["forget_truth"] is None and bare["forget_quality"] is None
    assert bare["model_utility"] == pytest.approx(2 / (1 / 0.7 + 1 / 0.8))
