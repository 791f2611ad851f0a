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
from hamu_ray.tasks import lm_scores
from hamu_ray.tasks.causal_lm import TextData, encode_qa, fact_encoding, load_tokenizer, prompt_tokens
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


# ---- the fact metric ----------------------------------------------------------------------------

FACT_ROWS = [  # the value last in the answer, inside a word, and where it also occurs earlier
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris.", "fact": "Paris"},
    {"question": "What is the code of Peru?", "answer": "The code of Peru is PER.", "fact": "PER"},
    {"question": "Who founded Lima?", "answer": "Lima was founded by Lima Pizarro.", "fact": "Lima"},
    {"question": "What is the module os for?", "answer": "It gives operating system interfaces.",
     "fact": "operating system"},
]


def hand_fact_span(tokenizer, question: str, answer: str, fact: str) -> tuple[list[int], int, int]:
    """The scored ids and the positions [s, e) of the tokens that carry the fact's characters,
    found by decoding the answer's tokens one more at a time (no offsets)."""
    ids, labels = encode_qa(tokenizer, question, answer, "plain")
    first = labels.index(next(t for t in labels if t != -100))
    text = " " + answer
    begin = text.rindex(fact)
    lengths = [len(tokenizer.decode(ids[first:first + k + 1])) for k in range(len(ids) - first - 1)]
    s = first + next(k for k, n in enumerate(lengths) if n > begin)
    e = first + next(k for k, n in enumerate(lengths) if n >= begin + len(fact)) + 1
    return ids, s, e


def test_fact_scores_are_the_value_spans_probability_given_question_and_prefix_by_hand(tiny_lm):
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), load_tokenizer(str(tiny_lm))
    cfg = TextData(prompt="plain", max_length=64)
    rows = FACT_ROWS + [{"question": "No fact here?", "answer": "None.", "fact": None}]
    got = lm_scores.fact_scores(model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows],
                                  [r["fact"] for r in rows], cfg, batch_size=3)
    for i, r in enumerate(FACT_ROWS):
        ids, s, e = hand_fact_span(tokenizer, r["question"], r["answer"], r["fact"])
        assert s < e
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        # log P(fact | question, prefix) = Σ_{t in span} log p(token_t | tokens < t)
        by_hand = sum(float(lp[t - 1, ids[t]]) for t in range(s, e))
        assert got["fact_logprob"][i] == pytest.approx(by_hand, rel=1e-5), r
        greedy = all(int(logits[t - 1].argmax()) == ids[t] for t in range(s, e))
        assert bool(got["fact_exact"][i]) == greedy
    assert np.isnan(got["fact_logprob"][-1]) and not got["fact_exact"][-1]
    probability = lm_metrics.fact_probability(got["fact_logprob"][:len(FACT_ROWS)])
    assert (probability > 0).all() and (probability < 1).all()


def test_a_fact_the_model_predicts_greedily_is_an_exact_match(tiny_lm):
    """The output layer made to predict one token everywhere (weights 0, a bias on it): a
    one-token fact of that token is an exact match with probability ≈ 1, a longer one is not."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), load_tokenizer(str(tiny_lm))
    cfg = TextData(prompt="plain", max_length=64)
    one = {"question": "Which word?", "answer": "It is the", "fact": "the"}
    ids, s, e = hand_fact_span(tokenizer, one["question"], one["answer"], one["fact"])
    assert e - s == 1
    rows = [one, FACT_ROWS[3]]
    before = lm_scores.fact_scores(model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows],
                                     [r["fact"] for r in rows], cfg, 4)
    assert not before["fact_exact"].any()
    bias = torch.zeros(model.config.vocab_size)
    bias[ids[s]] = 50.0
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.lm_head.bias = torch.nn.Parameter(bias)
    after = lm_scores.fact_scores(model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows],
                                    [r["fact"] for r in rows], cfg, 4)
    assert after["fact_exact"].tolist() == [True, False]
    assert after["fact_logprob"][0] == pytest.approx(0, abs=1e-12)


def test_a_fact_cut_at_max_length_or_missing_from_its_answer_is_refused(tiny_lm):
    tokenizer = load_tokenizer(str(tiny_lm))
    rows = [{"question": "What is the capital of France?", "answer": "The capital of France is Paris.",
             "fact": "Paris"}]
    assert lm_evaluate.rows_without_answer_tokens(tokenizer, rows, TextData(prompt="plain"))["fact"] == 0
    # the question and two answer tokens ("The capital"): an answer, but not its fact
    short = TextData(prompt="plain", max_length=len(prompt_tokens(tokenizer, rows[0]["question"], "plain")) + 2)
    counts = lm_evaluate.rows_without_answer_tokens(tokenizer, rows, short)
    assert counts["fact"] == 1 and counts["answer"] == 0
    with pytest.raises(ValueError, match="not in its answer"):
        fact_encoding(tokenizer, rows[0]["question"], rows[0]["answer"], "Lyon", TextData())


def test_fact_and_utility_metrics_by_hand():
    """forget_fact: the mean of P(value | question, prefix) over the rows that mark a fact;
    model utility: the harmonic mean takes the utility set's probability, ROUGE and truth score
    beside the retain sample's."""
    retain = scores_of([0.8, 0.6], [1.0, 0.6], [-1.0, -1.0], para=[0.5, 0.5], pert=[[0.25], [0.5]])
    forget = scores_of([0.5, 0.1, 0.2], [1.0, 0.5, 0.0], [-1.0, -2.0, -1.0])
    forget.update(fact_logprob=np.array([np.log(0.9), np.log(0.3), np.nan]),
                  fact_exact=np.array([True, False, False]))
    utility = scores_of([0.5, 0.3], [0.5, 0.5], [-1.0, -1.0], para=[0.5, 0.5], pert=[[0.5], [0.5]])
    m = lm_evaluate.model_metrics({"forget": forget, "retain": retain, "utility": utility}, None)
    assert m["forget_fact"] == pytest.approx(0.6) and m["forget_fact_em"] == pytest.approx(0.5)
    assert m["retain_fact"] is None and m["holdout_fact"] is None
    assert m["utility_prob"] == pytest.approx(0.4)
    # retain 0.7, 0.8, 0.25; utility 0.4, 0.5 and truth ratios 1, 1 → 1 − R = 0: utility 0
    assert m["model_utility"] == 0.0
    utility["perturbed_logp"] = np.log([[0.25], [0.25]])  # R = 0.5: truth score 0.5
    m = lm_evaluate.model_metrics({"forget": forget, "retain": retain, "utility": utility}, None)
    assert m["model_utility"] == pytest.approx(6 / (1 / 0.7 + 1 / 0.8 + 1 / 0.25 + 1 / 0.4 + 1 / 0.5 + 1 / 0.5))


# ---- the attacks (robustness) ------------------------------------------------------------------

def forget_scores_by_hand() -> dict[str, dict[str, np.ndarray]]:
    original = scores_of([0.9, 0.7], [1.0, 0.5], [-1.0, -1.0])
    original.update(fact_logprob=np.log([0.8, 0.6]), fact_exact=np.array([True, True]))
    unlearned = scores_of([0.1, 0.3], [0.0, 0.5], [-2.0, -2.0])
    unlearned.update(fact_logprob=np.log([0.2, 0.4]), fact_exact=np.array([False, False]))
    attacked = scores_of([0.5, 0.5], [0.0, 0.5], [-2.0, -2.0])
    attacked.update(fact_logprob=np.log([0.5, np.nan]), fact_exact=np.array([True, False]))
    return {"original": original, "unlearned": unlearned, "attacked": attacked}


def test_attack_metrics_by_hand_recover_0_scored_twice_and_1_as_the_original():
    """An attack's forget metrics from the attacked model's forget scores alone, and the share
    of the model's forgetting they undo: (attacked − model) / (original − model)."""
    s = forget_scores_by_hand()
    original, unlearned = s["original"], s["unlearned"]
    row = {**lm_evaluate.attack_metrics("int8", unlearned, original, unlearned),
           **lm_evaluate.attack_metrics("int4", unlearned, original, s["attacked"])}
    assert list(row) == list(lm_evaluate.attack_columns(["int8", "int4"]))
    # int8 here scores exactly as the unlearned model: nothing recovered
    assert row["forget_prob_int8"] == pytest.approx(0.2) and row["recovered_prob_int8"] == 0
    assert row["recovered_rouge_int8"] == 0 and row["recovered_fact_int8"] == 0
    # int4: probability 0.5 of original 0.8, unlearned 0.2 → 0.5; ROUGE unchanged 0.25 of
    # original 0.75 → 0; fact 0.5 (its one marked row) of original 0.7, unlearned 0.3 → 0.5
    assert row["forget_prob_int4"] == pytest.approx(0.5) and row["recovered_prob_int4"] == pytest.approx(0.5)
    assert row["forget_rouge_int4"] == pytest.approx(0.25) and row["recovered_rouge_int4"] == pytest.approx(0)
    assert row["forget_fact_int4"] == pytest.approx(0.5) and row["recovered_fact_int4"] == pytest.approx(0.5)
    restored = lm_evaluate.attack_metrics("int4", unlearned, original, original)
    assert [restored[f"recovered_{m}_int4"] for m in ("prob", "rouge", "fact")] == pytest.approx([1, 1, 1])
    # the original's own row: nothing forgotten, no share; a set without facts: no fact columns
    own = lm_evaluate.attack_metrics("int4", original, original, s["attacked"])
    assert own["forget_prob_int4"] == pytest.approx(0.5) and own["recovered_prob_int4"] is None
    bare = {k: v for k, v in unlearned.items() if not k.startswith("fact_")}
    no_facts = lm_evaluate.attack_metrics("int4", bare, original, bare)
    assert no_facts["forget_fact_int4"] is None and no_facts["recovered_fact_int4"] is None


def test_attack_metrics_on_some_rows_use_those_rows_of_every_model():
    """Relearning scores the rows it did not train on: model, original and attacked alike.
    Row 1 alone: probability original 0.7, unlearned 0.3, attacked 0.5 → 0.5; ROUGE 0.5 all
    three (nothing forgotten: no share); fact: the attacked row has none."""
    s = forget_scores_by_hand()
    row = lm_evaluate.attack_metrics("relearn", s["unlearned"], s["original"], s["attacked"],
                                     np.array([False, True]))
    assert row["forget_prob_relearn"] == pytest.approx(0.5) and row["recovered_prob_relearn"] == pytest.approx(0.5)
    assert row["forget_rouge_relearn"] == pytest.approx(0.5) and row["recovered_rouge_relearn"] is None
    assert row["forget_fact_relearn"] is None and row["recovered_fact_relearn"] is None


def test_a_quantized_scoring_scores_the_fake_quantized_model(tiny_lm, qa_file, scored, tmp_path):
    """score_model with quantize_bits scores what a saved fake-quantized copy of the model scores,
    and int4 moves the scores of the model as it is."""
    import shutil

    from transformers import AutoModelForCausalLM

    from hamu_ray.attacks.quantize import fake_quantize

    path, _ = qa_file
    saved = tmp_path / "int4"
    shutil.copytree(tiny_lm, saved)
    fake_quantize(AutoModelForCausalLM.from_pretrained(tiny_lm), 4).save_pretrained(saved)
    text = TextData().model_dump()
    attacked = lm_evaluate.score_model(str(tiny_lm), {"forget": path}, text, batch_size=4, max_new_tokens=6,
                                       quantize_bits=4)["forget"]
    reference = lm_evaluate.score_model(str(saved), {"forget": path}, text, batch_size=4,
                                        max_new_tokens=6)["forget"]
    assert attacked.keys() == reference.keys() == scored.keys()
    for key in reference:
        np.testing.assert_allclose(attacked[key], reference[key], rtol=1e-5, err_msg=key)
    assert np.abs(attacked["logprob"] - scored["logprob"]).max() > 1e-3


def test_a_relearning_scoring_scores_the_model_fine_tuned_on_its_rows(tiny_lm, qa_file, scored, tmp_path):
    """score_model with relearning scores what a copy fine-tuned by hand scores: AdamW (no
    weight decay), one step per batch of the attack's order on transformers' own loss (the mean
    answer-token cross-entropy); the rows it trained on become likelier."""
    import shutil

    from transformers import AutoModelForCausalLM

    from hamu_ray.attacks.relearn import batch_rows

    path, rows = qa_file
    spec = lm_evaluate.Relearning(path, rows=(0, 2, 3), steps=4, lr=3e-3, batch_size=2, seed=5)
    tokenizer, model = load_tokenizer(str(tiny_lm)), AutoModelForCausalLM.from_pretrained(tiny_lm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    for batch in batch_rows(spec.rows, spec.steps, spec.batch_size, spec.seed):
        encoded = [encode_qa(tokenizer, rows[i]["question"], rows[i]["answer"], "auto") for i in batch]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in encoded])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in encoded])
        mask = torch.tensor([[1] * len(ids_) + [0] * (width - len(ids_)) for ids_, _ in encoded])
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    saved = tmp_path / "relearned"
    shutil.copytree(tiny_lm, saved)
    model.save_pretrained(saved)
    text = TextData().model_dump()
    attacked = lm_evaluate.score_model(str(tiny_lm), {"forget": path}, text, batch_size=4, max_new_tokens=6,
                                       relearning=spec)["forget"]
    reference = lm_evaluate.score_model(str(saved), {"forget": path}, text, batch_size=4,
                                        max_new_tokens=6)["forget"]
    for key in reference:
        np.testing.assert_allclose(attacked[key], reference[key], rtol=1e-4, atol=1e-6, err_msg=key)
    trained = list(spec.rows)
    assert (attacked["logprob"][trained] > scored["logprob"][trained]).all()
