"""A language model's per-example scores on question/answer rows, wherever the model lives: one
process with a loaded model, or the ranks of a job, each scoring its share of the rows.

Per row: the answer's summed log-prob and token count, its Min-K% score, the ROUGE-L recall of
the greedy answer; with the optional columns, the paraphrased and perturbed answers' mean token
log-probs (the truth ratio's inputs) and the fact span's log-prob and exact match. Only numbers
come back: the greedy answers (a forget row's text) are scored where they are generated.

Data-parallel (`Ranks`): rank r scores the r-th contiguous share of every set. Under ZeRO-3 every
forward pass gathers parameters from all ranks, so the ranks run the same number of forwards:
a rank out of rows runs a one-token stand-in batch while the others finish, and greedy decoding
runs with `synced_gpus` (transformers keeps a finished rank stepping until every rank is done).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from hamu_ray.engine.evaluation import ALONE, Ranks
from hamu_ray.pipeline import lm_metrics
from hamu_ray.tasks.causal_lm import (IGNORE, TextData, encode_qa, eval_mode, fact_encoding, pad_batch,
                                      prompt_tokens, sequence_scores, truncate)

MIN_K = 0.4  # Min-K%: the share of lowest-probability answer tokens averaged (MUSE uses 0.4)
PARAPHRASED, PERTURBED = "paraphrased_answer", "perturbed_answers"  # optional columns
FACT = "fact"  # optional: the answer's value (its last occurrence in the answer is the fact's span)


def score_rows(model, tokenizer, rows: list[dict], cfg: TextData, *, batch_size: int = 64,
               max_new_tokens: int = 32, ranks: Ranks = ALONE) -> dict[str, np.ndarray]:
    """Every score of every row of a set (`rows`: the whole set, the same on every rank), each
    rank scoring its share; the same numbers on every rank after. `model`: a Hugging Face causal
    LM (under ZeRO-3 the engine's module), scored in eval mode."""
    mine = rows[ranks.share(len(rows))]
    questions = [r[cfg.question_column] for r in mine]
    answers = [r[cfg.answer_column] for r in mine]
    with torch.no_grad(), eval_mode(model):
        logprob, count, min_k = answer_scores(model, tokenizer, questions, answers, cfg, batch_size, ranks)
        generated = greedy_answers(model, tokenizer, questions, cfg, batch_size, max_new_tokens, ranks)
        scores = {"logprob": logprob, "count": count, "min_k": min_k,
                  "rouge": lm_metrics.rouge_l_recall(generated, answers)}
        if rows and PARAPHRASED in rows[0] and PERTURBED in rows[0]:
            scores.update(truth_ratio_inputs(model, tokenizer, mine, questions, cfg, batch_size, ranks,
                                             perturbed=len(rows[0][PERTURBED])))
        if rows and FACT in rows[0]:
            scores.update(fact_scores(model, tokenizer, questions, answers, [r[FACT] for r in mine],
                                      cfg, batch_size, ranks))
    return ranks.gather(scores)


def in_batches(items: Sequence, batch_size: int, ranks: Ranks, run: Callable, stand_in: Callable) -> list:
    """`run` on each batch of `items`; in lockstep, `stand_in()` after them until every rank has
    run as many batches (its results dropped). The count is agreed first: every forward of a
    rank must meet the same forward of the others."""
    starts = range(0, len(items), batch_size)
    total = ranks.most(len(starts))
    out = [run(items[start:start + batch_size]) for start in starts]
    for _ in range(total - len(out)):
        stand_in()
    return out


def one_token_forward(model, ranks: Ranks) -> None:
    """A forward pass of one token: a rank with no rows left keeps ZeRO-3's gathers in step."""
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=ranks.device))


def answer_scores(model, tokenizer, questions: Sequence[str], answers: Sequence[str], cfg: TextData,
                  batch_size: int, ranks: Ranks = ALONE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed answer-token log-prob, answer token count and Min-K% score per (question, answer)."""
    def run(pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        encoded = [encode_pair(tokenizer, q, a, cfg) for q, a in pairs]
        batch = on_device(pad_batch([ids for ids, _ in encoded], [labels for _, labels in encoded]), ranks)
        scores = sequence_scores(model, batch)
        targets = batch["labels"][:, 1:]
        token_lp = torch.log_softmax(scores.logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        min_k = lm_metrics.min_k_percent(
            [lp[t != IGNORE].double().cpu().numpy() for lp, t in zip(token_lp, targets)], MIN_K)
        return scores.logprob.double().cpu().numpy(), scores.count.double().cpu().numpy(), min_k

    parts = in_batches(list(zip(questions, answers)), batch_size, ranks, run,
                       lambda: one_token_forward(model, ranks))
    return tuple(np.concatenate([p[i] for p in parts]) if parts else np.empty(0) for i in range(3))


def fact_scores(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                facts: Sequence[str | None], cfg: TextData, batch_size: int,
                ranks: Ranks = ALONE) -> dict[str, np.ndarray]:
    """The fact metric's inputs per row: the value span's summed log-prob given the question and
    the answer up to it (`fact_logprob`; P(value | question, prefix) = exp of it) and whether
    greedy decoding from that prefix reproduces the span's tokens (`fact_exact`: the argmax at
    every span position is the span's token). Rows without a fact (None) get NaN and False."""
    logprob, exact = np.full(len(answers), np.nan), np.zeros(len(answers), dtype=bool)
    marked = [i for i, f in enumerate(facts) if f is not None]

    def run(rows: list[int]) -> None:
        encoded = [fact_encoding(tokenizer, questions[i], answers[i], facts[i], cfg) for i in rows]
        batch = on_device(pad_batch([ids for ids, _ in encoded], [labels for _, labels in encoded]), ranks)
        scores = sequence_scores(model, batch)
        targets = batch["labels"][:, 1:]
        hit = (scores.logits.argmax(-1) == targets) | (targets == IGNORE)
        logprob[rows] = scores.logprob.double().cpu().numpy()
        exact[rows] = hit.all(-1).cpu().numpy()

    with torch.no_grad():
        in_batches(marked, batch_size, ranks, run, lambda: one_token_forward(model, ranks))
    return {"fact_logprob": logprob, "fact_exact": exact}


def truth_ratio_inputs(model, tokenizer, rows: list[dict], questions: Sequence[str], cfg: TextData,
                       batch_size: int, ranks: Ranks = ALONE, *, perturbed: int | None = None) -> dict[str, np.ndarray]:
    """Mean answer-token log-probs (log P̃) of the paraphrased answer [n] and the perturbed ones
    [n, k]; k: `perturbed` (the whole set's, so every rank agrees), else the first row's."""
    k = perturbed if perturbed is not None else len(rows[0][PERTURBED])
    if any(len(r[PERTURBED]) != k for r in rows):
        raise ValueError(f"every row needs the same number of {PERTURBED} (the first has {k})")
    para_lp, para_n, _ = answer_scores(model, tokenizer, questions, [r[PARAPHRASED] for r in rows],
                                       cfg, batch_size, ranks)
    pert_lp, pert_n, _ = answer_scores(model, tokenizer, [q for q in questions for _ in range(k)],
                                       [a for r in rows for a in r[PERTURBED]], cfg, batch_size, ranks)
    return {"paraphrased_logp": para_lp / para_n, "perturbed_logp": (pert_lp / pert_n).reshape(len(rows), k)}


def greedy_answers(model, tokenizer, questions: Sequence[str], cfg: TextData, batch_size: int,
                   max_new_tokens: int, ranks: Ranks = ALONE) -> list[str]:
    """The model's greedy answer to each question (prompts left-padded, stopped at EOS)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                              synced_gpus=ranks.lockstep)

    def run(part: Sequence[str]) -> list[str]:
        prompts = [prompt_tokens(tokenizer, q, cfg.prompt) for q in part]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(p)
            mask[i, width - len(p):] = 1
        new = generate(ids.to(ranks.device), mask.to(ranks.device))
        return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in new.cpu()]

    stand_in = torch.full((1, 1), pad, dtype=torch.long, device=ranks.device)
    parts = in_batches(questions, batch_size, ranks, run, lambda: generate(stand_in, torch.ones_like(stand_in)))
    return [answer for part in parts for answer in part]


def encode_pair(tokenizer, question: str, answer: str, cfg: TextData) -> tuple[list[int], list[int]]:
    """input_ids and labels of one scored (question, answer), cut at max_length as in training."""
    return truncate(*encode_qa(tokenizer, question, answer, cfg.prompt), cfg.max_length)[:2]


# ---- attacks (README, "Does the forgetting survive attacks?") ----------------------------------

def attacked(model, tokenizer, attack, cfg: TextData) -> torch.nn.Module:
    """A copy of `model` (whole: not ZeRO-3 partitioned) after one attack of an evaluation
    section (engine.config.AttackSection): its linear layers fake-quantized, or relearned."""
    from hamu_ray.attacks.quantize import fake_quantize
    from hamu_ray.attacks.relearn import Relearning

    if attack.quantize_bits is not None:
        return fake_quantize(model, attack.quantize_bits)
    spec = attack.relearning
    return relearned(model, tokenizer, Relearning(spec.path, tuple(spec.rows), spec.steps, spec.lr,
                                                  spec.batch_size, spec.seed), cfg)


def relearned(model, tokenizer, spec, cfg: TextData) -> torch.nn.Module:
    """A copy of `model` fine-tuned on the rows of `spec` (attacks.relearn.Relearning): the mean
    answer-token cross-entropy (the loss the original learned them with), one AdamW step per
    batch, on the model's device."""
    import pyarrow.parquet as pq

    from hamu_ray.attacks.relearn import batch_rows, relearn

    device = next(model.parameters()).device
    rows = pq.read_table(spec.path, columns=[cfg.question_column, cfg.answer_column]).take(list(spec.rows))
    encoded = {i: encode_pair(tokenizer, row[cfg.question_column], row[cfg.answer_column], cfg)
               for i, row in zip(spec.rows, rows.to_pylist())}
    batches = ({name: t.to(device) for name, t in pad_batch([encoded[i][0] for i in rows],
                                                             [encoded[i][1] for i in rows]).items()}
               for rows in batch_rows(spec.rows, spec.steps, spec.batch_size, spec.seed))

    def mean_token_loss(tuned, batch) -> torch.Tensor:
        scores = sequence_scores(tuned, batch)
        return -scores.logprob.sum() / scores.count.sum()
    return relearn(model, batches, spec.lr, mean_token_loss)


def on_device(batch: dict[str, torch.Tensor], ranks: Ranks) -> dict[str, torch.Tensor]:
    return {name: value.to(ranks.device) for name, value in batch.items()}
