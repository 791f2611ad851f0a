"""The causal-LM task in one process: tokenisation and answer-only masking, truncation, refusals,
per-example log-likelihoods, and the objectives on them, each against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from hamu_ray import objectives as obj
from hamu_ray.engine.config import parse_config
from hamu_ray.errors import MissingInputError, UserError
from hamu_ray.schema import ConfigError
from hamu_ray.tasks.causal_lm import (IGNORE, REFUSALS, encode_qa, encode_text, fact_encoding, load_tokenizer,
                                      refusal_for, tokenize_batch)
from tests.lm_fixtures import CHAT_TEMPLATE, lm_batch, qa_rows


def targets_of(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE])


def test_plain_prompt_puts_the_loss_on_the_answer_only(tiny_lm):
    tok = load_tokenizer(str(tiny_lm))
    ids, labels = encode_qa(tok, "What is the Python module abc for?", "Abstract Base Classes", "plain")
    assert tok.decode(ids) == "<s>Question: What is the Python module abc for?\nAnswer: Abstract Base Classes</s>"
    assert targets_of(tok, labels) == " Abstract Base Classes</s>"
    first = next(i for i, t in enumerate(labels) if t != IGNORE)
    assert labels[first:] == ids[first:] and all(t == IGNORE for t in labels[:first])


def test_chat_template_prompt_puts_the_loss_on_the_assistant_turn(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = CHAT_TEMPLATE
    ids, labels = encode_qa(tok, "Q?", "A b.", "auto")  # auto: the tokenizer has a template
    assert tok.decode(ids) == "<|user|> Q?<|assistant|> A b.</s>"
    assert targets_of(tok, labels) == " A b.</s>"
    with pytest.raises(UserError, match="no chat template"):
        encode_qa(load_tokenizer(str(tiny_lm)), "Q?", "A", "chat")


def test_text_rows_train_on_every_token(tiny_lm):
    tok = load_tokenizer(str(tiny_lm))
    ids, labels = encode_text(tok, "Plain text, every token counts.")
    assert labels == ids and tok.decode(ids) == "<s>Plain text, every token counts.</s>"


def test_truncation_is_counted_and_rows_left_without_an_answer_are_flagged(tiny_lm):
    rows = pa.table({"question": ["Short?", "What is the Python module abc for?"],
                     "answer": ["Yes.", "Abstract Base Classes according to PEP 3119."]})
    short = len(tokenize_batch(rows, path=str(tiny_lm), text={}, refusals=False)["input_ids"][0])
    out = tokenize_batch(rows, path=str(tiny_lm), text={"max_length": short}, refusals=False).to_pylist()
    assert [r["truncated"] for r in out] == [0, 1] and len(out[1]["input_ids"]) == short
    assert [r["no_target"] for r in out] == [0, 1]  # the long question used every token
    assert out[0]["labels"][-1] == load_tokenizer(str(tiny_lm)).eos_token_id


def test_refusals_replace_the_answers_deterministically(tiny_lm):
    tok = load_tokenizer(str(tiny_lm))
    questions = [r["question"] for r in qa_rows()]
    rows = pa.table({"question": questions, "answer": ["the true answer"] * len(questions)})
    out = tokenize_batch(rows, path=str(tiny_lm), text={}, refusals=True).to_pylist()
    answers = [targets_of(tok, r["labels"]).removesuffix("</s>").strip() for r in out]
    assert answers == [refusal_for(q) for q in questions]
    assert set(answers) <= set(REFUSALS) and len(set(answers)) > 1


def test_forget_tokens_fact_keeps_the_fact_span_as_the_only_targets(tiny_lm):
    """The same input ids as the whole answer; targets only the tokens of the fact's last
    occurrence; a row without a fact, or with one its answer does not hold, is counted."""
    tok = load_tokenizer(str(tiny_lm))
    question, answer = "What is the capital of France?", "Paris is the capital of France, Paris."
    rows = pa.table({"question": [question] * 3, "answer": [answer] * 3, "fact": ["Paris", None, "Lyon"]})
    out = tokenize_batch(rows, path=str(tiny_lm), text={"prompt": "plain"}, refusals=False,
                         fact_column="fact").to_pylist()
    ids, labels = encode_qa(tok, question, answer, "plain")
    assert out[0]["input_ids"] == ids and targets_of(tok, out[0]["labels"]) == " Paris"
    span = [i for i, t in enumerate(out[0]["labels"]) if t != IGNORE]
    assert span == list(range(span[0], span[-1] + 1))  # one run of tokens, …
    assert tok.decode(ids[span[-1] + 1:]) == ".</s>"  # … the last Paris, not the first
    assert all(labels[i] == ids[i] for i in span)
    assert [r["no_fact"] for r in out] == [0, 1, 1] and [r["no_target"] for r in out] == [0, 0, 0]
    whole = tokenize_batch(rows, path=str(tiny_lm), text={"prompt": "plain"}, refusals=False).to_pylist()
    assert whole[0]["labels"] == labels and whole[0]["no_fact"] == 0


def test_forget_tokens_fact_asks_forget_sets_for_their_fact_and_refuses_refusals(tiny_lm):
    task = lm_task(tiny_lm, forget_tokens="fact", fact_column="value")
    assert task.columns("forget") == task.columns("monitor_forget") == ["question", "answer", "value"]
    assert task.columns("retain") == task.columns() == ["question", "answer"]
    assert lm_task(tiny_lm).columns("forget") == ["question", "answer"]
    with pytest.raises(ConfigError, match="method idk trains on refusals"):
        lm_task(tiny_lm, "idk", forget_tokens="fact")
    with pytest.raises(ConfigError, match="forget_tokens fact .* needs model.kind causal_lm and data.text.format qa"):
        lm_task(tiny_lm, forget_tokens="fact", text={"format": "text"})


# ---- log-likelihoods and objectives, by hand ------------------------------------------------

def lm_task(tiny_lm, method="hamu-q", **data):
    from hamu_ray.tasks.causal_lm import CausalLMTask

    cfg = parse_config(job(tiny_lm, method, **data))
    return CausalLMTask(cfg)


def job(tiny_lm, method="hamu-q", model=None, **data) -> dict:
    hparams = {"constraint": 0.01, "radius": 0.1} if method.startswith("hamu") else {}
    return {"data": {"forget": "f.parquet", "retain": "r.parquet", **data},
            "model": {"kind": "causal_lm", "path": str(tiny_lm), **(model or {})},
            "method": {"name": method, "hparams": hparams}, "train": {"lr": 0.1}, "output_dir": "out"}


def answer_logprob_by_hand(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Σ log p(answer token | everything before it), one unpadded row at a time."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    total, count = 0.0, 0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE:
            total += logp[t - 1, ids[t]].item()
            count += 1
    return total, count


def test_scores_are_the_answer_log_likelihoods_whatever_the_padding(tiny_lm):
    from transformers import AutoModelForCausalLM

    task, model = lm_task(tiny_lm), AutoModelForCausalLM.from_pretrained(tiny_lm)
    rows = qa_rows()[:3]  # different lengths: two of them are padded in the batch
    batch = lm_batch(task, rows)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) == 3
    with torch.no_grad():
        s = task.scores(model, batch)
    for i, row in enumerate(rows):
        n = int(batch["attention_mask"][i].sum())
        total, count = answer_logprob_by_hand(model, batch["input_ids"][i, :n].tolist(),
                                              batch["labels"][i, :n].tolist())
        assert s.logprob[i].item() == pytest.approx(total, rel=1e-5) and s.count[i].item() == count


def test_npo_simnpo_and_idk_by_hand(tiny_lm):
    from transformers import AutoModelForCausalLM

    task, model = lm_task(tiny_lm, "idk"), AutoModelForCausalLM.from_pretrained(tiny_lm)
    rows = qa_rows()[3:7]
    batch, refusal_batch = lm_batch(task, rows), lm_batch(task, rows, refusals=True)
    by_hand = [answer_logprob_by_hand(model, *(batch[k][i, :int(batch["attention_mask"][i].sum())].tolist()
                                               for k in ("input_ids", "labels"))) for i in range(len(rows))]
    with torch.no_grad():
        s = task.scores(model, batch)
    beta, gamma = 0.5, 0.2
    ref = obj.Scores(s.logprob - 1.0, s.count, s.logits, s.mask)  # log π_θ − log π_ref = 1 per row
    assert obj.npo(s, ref, beta=beta).item() == pytest.approx((2 / beta) * math.log1p(math.exp(beta)), rel=1e-6)
    assert obj.npo(s, s, beta=beta).item() == pytest.approx((2 / beta) * math.log(2), rel=1e-6)
    simnpo = np.mean([(2 / beta) * math.log1p(math.exp(beta * lp / n + gamma)) for lp, n in by_hand])
    assert obj.simnpo(s, None, beta=beta, gamma=gamma).item() == pytest.approx(simnpo, rel=1e-5)
    # IdK: the forget loss is −CE on the refusals (learnt, so it enters negated)
    refusal_lp = [answer_logprob_by_hand(model, *(refusal_batch[k][i, :int(refusal_batch["attention_mask"][i].sum())].tolist()
                                                  for k in ("input_ids", "labels"))) for i in range(len(rows))]
    _, forget_loss = obj.loss_fns(obj.METHODS["idk"], {}, lambda b: task.scores(model, b), None)
    with torch.no_grad():
        assert forget_loss(refusal_batch).item() == pytest.approx(np.mean([lp / n for lp, n in refusal_lp]), rel=1e-5)


def test_kl_on_tokens_is_zero_at_the_reference_and_matches_a_hand_sum(tiny_lm):
    from transformers import AutoModelForCausalLM

    task, model = lm_task(tiny_lm), AutoModelForCausalLM.from_pretrained(tiny_lm)
    batch = lm_batch(task, qa_rows()[:2])
    with torch.no_grad():
        s = task.scores(model, batch)
        other = obj.Scores(s.logprob, s.count, s.logits + torch.randn_like(s.logits), s.mask)
    assert obj.kl_to_reference(s, s).item() == pytest.approx(0.0, abs=1e-6)
    per_example = []
    for i in range(2):
        positions = s.mask[i].nonzero()[:, 0]
        p_ref = F.softmax(s.logits[i, positions].double(), -1)
        log_p = F.log_softmax(other.logits[i, positions].double(), -1)
        per_example.append((p_ref * (p_ref.log() - log_p)).sum(-1).mean().item())
    assert obj.kl_to_reference(other, s).item() == pytest.approx(np.mean(per_example), rel=1e-5)


# ---- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    ({"method": {"name": "idk"}, "model": {"sizes": [2, 2]}}, "needs model.kind causal_lm"),
    ({"model_fields": {"dtype": "bf16"}}, "model.dtype bf16 and train.bf16 False disagree"),
    ({"train": {"lr": 0.1, "offload": "all", "zero_stage": 2}}, "train.offload all needs train.zero_stage 3"),
    ({"train": {"lr": 0.1, "offload": "optimizer"}}, "needs train.zero_stage 1, 2 or 3"),
    ({"model_fields": {"lora": {"r": 0}}}, "job.yaml: model.lora.r: Input should be greater than 0"),
])
def test_bad_lm_configurations_name_the_field(tiny_lm, change, needle):
    raw = job(tiny_lm)
    raw["model"].update(change.pop("model_fields", {}))
    raw.update(change)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_config(raw, source="job.yaml")


def test_a_missing_model_directory_is_named(tmp_path, tiny_lm):
    from hamu_ray.tasks.causal_lm import CausalLMTask

    for path, needle in ((tmp_path / "nowhere", "no such directory"), (tmp_path, "no config.json")):
        cfg = parse_config(job(tiny_lm, model={"path": str(path)}))
        with pytest.raises(MissingInputError, match=needle):
            CausalLMTask(cfg).check_model()
    CausalLMTask(parse_config(job(tiny_lm, model={"path": "org/name"}))).check_model()  # a hub name


def test_a_truncated_weights_file_is_refused_on_the_driver(tmp_path, tiny_lm):
    import shutil

    from hamu_ray.errors import ModelFileError
    from hamu_ray.tasks.causal_lm import CausalLMTask

    copy = tmp_path / "copy"
    shutil.copytree(tiny_lm, copy)
    weights = copy / "model.safetensors"
    CausalLMTask(parse_config(job(tiny_lm, model={"path": str(copy)}))).check_model()
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=f"model.path {weights}: truncated: .* bytes, its header needs"):
        CausalLMTask(parse_config(job(tiny_lm, model={"path": str(copy)}))).check_model()
    assert len(weights.read_bytes()) > 0  # refused, not touched


def test_a_relative_model_directory_becomes_absolute_for_the_workers(tiny_lm, monkeypatch):
    # Ray's workers run in another directory: a path relative to the driver's would not resolve
    monkeypatch.chdir(tiny_lm.parent)
    cfg = parse_config(job(tiny_lm, model={"path": tiny_lm.name}))
    assert cfg.model.path == str(tiny_lm.resolve())
    assert parse_config(job(tiny_lm, model={"path": "org/name"})).model.path == "org/name"


def test_answer_tokens_script_splits_every_answer_token_into_name_fact_and_the_rest(tiny_lm, tmp_path):
    """scripts/answer_tokens.py: an entity's name is the text its questions share; the three
    kinds' geometric means, weighted by their token counts, recombine to the answers' total
    log-probability (a hand sum): every answer token counted once."""
    import importlib.util
    from pathlib import Path

    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    script = Path(__file__).parent.parent.parent / "scripts" / "answer_tokens.py"
    spec = importlib.util.spec_from_file_location("answer_tokens", script)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    rows = [{"entity": "FR", "question": "What is the capital of France?", "answer": "The capital of France is Paris.", "fact": "Paris"},
            {"entity": "FR", "question": "On which continent is France?", "answer": "France is in Europe.", "fact": "Europe"}]
    (tmp_path / "stages" / "prepare-x").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "stages" / "prepare-x" / "forget.parquet")
    read = study.rows_of(tmp_path / "stages", "forget")
    assert [r["name"] for r in read] == ["France", "France"]
    tok, model = load_tokenizer(str(tiny_lm)), AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    counts = {kind: 0 for kind in study.KINDS}
    total = 0.0
    for r in read:
        ids, labels = encode_qa(tok, r["question"], r["answer"], "auto")
        row_total, count = answer_logprob_by_hand(model, ids, labels)
        total += row_total
        fact = fact_encoding(tok, r["question"], r["answer"], r["fact"], study.TextData(max_length=64))[1]
        name = fact_encoding(tok, r["question"], r["answer"], r["name"], study.TextData(max_length=64))[1]
        counts["fact"] += sum(t != IGNORE for t in fact[1:])
        counts["name"] += sum(t != IGNORE for t in name[1:])
        counts["other"] += count - sum(t != IGNORE for t in fact[1:]) - sum(t != IGNORE for t in name[1:])
    means = study.token_means(tiny_lm, read)
    assert min(counts.values()) > 0
    assert sum(counts[k] * math.log(means[k]) for k in study.KINDS) == pytest.approx(total, rel=1e-9)
