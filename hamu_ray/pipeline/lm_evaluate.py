"""Evaluating language models after unlearning: the metrics of per-example scores (tasks.lm_scores,
computed where each model lives: engine.evaluation), on the driver; and `score_model`, one
process scoring a model directory, the reference the workers' scores are tested against
(`score_all` runs it as Ray tasks for scripts).

Only numbers leave a task: the forget rows' text and the model's answers to them stay there
(ROUGE is computed where the answers are generated). The metric definitions are in lm_metrics.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from hamu_ray.attacks.quantize import fake_quantize
from hamu_ray.attacks.relearn import Relearning
from hamu_ray.attacks.recovery import recovered_share
from hamu_ray.pipeline import lm_metrics
from hamu_ray.tasks.causal_lm import TextData, fact_encoding, has_target, load_tokenizer
from hamu_ray.tasks.lm_scores import FACT, PARAPHRASED, PERTURBED, encode_pair, relearned, score_rows

EVAL_SETS = ("forget", "retain", "holdout")  # retain: a fixed sample of the retain set
TABLE_COLUMNS = ("model", "forget_prob", "forget_rouge", "forget_truth", "forget_fact", "forget_fact_em",
                 "retain_prob", "retain_rouge", "retain_truth", "retain_fact", "holdout_fact",
                 "utility_prob", "model_utility", "forget_quality", "mia_auc", "priv_leak",
                 "steps", "stop", "wall_s")
ATTACKED = ("forget_prob", "forget_rouge", "forget_fact")  # scored again under each attack (robustness)


# ---- per-example scores (in a Ray task) -------------------------------------------------------

def score_model(model_dir: str, sets: dict[str, str], text: dict, *, bf16: bool = False,
                batch_size: int = 64, max_new_tokens: int = 32,
                quantize_bits: int | None = None,
                relearning: Relearning | None = None) -> dict[str, dict[str, np.ndarray]]:
    """For every row of each set (parquet): the answer's summed log-prob and token count, its
    Min-K% score, the ROUGE-L recall of the greedy answer; with the optional columns, the
    paraphrased answer's and each perturbed answer's mean token log-prob (log P̃).
    `quantize_bits`: the model's linear layers fake-quantized to 8 or 4 bits first (attacks.quantize);
    `relearning`: the model fine-tuned so first (attacks.relearn)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = TextData(**text)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    if quantize_bits is not None:
        model = fake_quantize(model, quantize_bits)
    if relearning is not None:
        model = relearned(model, tokenizer, relearning, cfg)
    return {name: score_rows(model, tokenizer, pq.read_table(path).to_pylist(), cfg, batch_size=batch_size,
                             max_new_tokens=max_new_tokens)
            for name, path in sets.items()}


def rows_without_answer_tokens(tokenizer, rows: list[dict], cfg: TextData) -> dict[str, int]:
    """Per scored column (the answer; with the truth-ratio columns the paraphrase and the
    perturbed answers, any of them), the rows left without an answer token at max_length: they
    have no score (no Min-K% token, a 0/0 mean log-prob)."""
    columns = {cfg.answer_column: [[r[cfg.answer_column]] for r in rows]}
    if rows and PARAPHRASED in rows[0] and PERTURBED in rows[0]:
        columns[PARAPHRASED] = [[r[PARAPHRASED]] for r in rows]
        columns[PERTURBED] = [r[PERTURBED] for r in rows]

    def unscored(question: str, answers: list[str]) -> bool:
        return any(not has_target(encode_pair(tokenizer, question, a, cfg)[1]) for a in answers)
    questions = [r[cfg.question_column] for r in rows]
    counts = {column: sum(map(unscored, questions, per_row)) for column, per_row in columns.items()}
    if rows and FACT in rows[0]:
        counts[FACT] = sum(r[FACT] is not None and not fact_kept(tokenizer, r[cfg.question_column],
                                                                   r[cfg.answer_column], r[FACT], cfg)
                           for r in rows)
    return counts


def fact_kept(tokenizer, question: str, answer: str, fact: str, cfg: TextData) -> bool:
    try:
        fact_encoding(tokenizer, question, answer, fact, cfg)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Scoring:
    """One `score_model` call: model `name` on some sets, fake-quantized to `quantize_bits` or
    fine-tuned by `relearning` first (None: as it is); `attack` names that in the table."""
    name: str
    model_dir: str
    sets: dict[str, str]
    quantize_bits: int | None = None
    relearning: Relearning | None = None
    attack: str | None = None

    @property
    def label(self) -> str:  # the progress line's
        return self.name if self.attack is None else f"{self.name} under {self.attack}"


def score_all(scorings: dict[Hashable, Scoring], text: dict, *,
              bf16: bool = False) -> dict[Hashable, dict[str, dict[str, np.ndarray]]]:
    """Every `score_model` call as a Ray task (one CPU each, as many at once as fit), by the
    caller's keys; a progress line as each finishes."""
    import ray

    # DEFAULT: outside the caller's placement group (a search trial's has no CPU to give)
    task = ray.remote(num_cpus=1, scheduling_strategy="DEFAULT")(score_model)
    pending = {task.remote(s.model_dir, s.sets, text, bf16=bf16, quantize_bits=s.quantize_bits,
                           relearning=s.relearning): key
               for key, s in scorings.items()}
    results, start = {}, time.monotonic()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(done[0])
        results[key] = ray.get(done[0])
        print(f"[evaluate] {scorings[key].label} scored ({len(results)}/{len(scorings)}, "
              f"{time.monotonic() - start:.0f} s)", flush=True)
    return {key: results[key] for key in scorings}


# ---- metrics (on the driver) ------------------------------------------------------------------

def truth_ratios(scores: dict[str, np.ndarray]) -> np.ndarray | None:
    if "perturbed_logp" not in scores:
        return None
    return lm_metrics.truth_ratio(scores["perturbed_logp"], scores["paraphrased_logp"])


def model_metrics(scores: dict[str, dict[str, np.ndarray]],
                  oracle: dict[str, dict[str, np.ndarray]] | None) -> dict[str, float | None]:
    """TOFU's and MUSE's metrics from per-example scores; those that need the oracle (or the
    truth-ratio columns) are None when it (or they) are absent, never 0."""
    m: dict[str, float | None] = {**answer_metrics("forget", scores["forget"]),
                                  **answer_metrics("retain", scores["retain"])}
    forget_ratios, retain_ratios = truth_ratios(scores["forget"]), truth_ratios(scores["retain"])
    m["forget_truth"] = None if forget_ratios is None else lm_metrics.truth_ratio_forget_score(forget_ratios)
    m["retain_truth"] = None if retain_ratios is None else lm_metrics.truth_ratio_retain_score(retain_ratios)
    m["model_utility"] = lm_metrics.model_utility(utility_scores(scores))
    m["utility_prob"] = None
    if "utility" in scores:
        s = scores["utility"]
        m["utility_prob"] = float(lm_metrics.probability(s["logprob"], s["count"]).mean())
    m.update(fact_metrics(scores))
    oracle_ratios = None if oracle is None else truth_ratios(oracle["forget"])
    m["forget_quality"] = (None if oracle_ratios is None or forget_ratios is None
                           else lm_metrics.forget_quality(forget_ratios, oracle_ratios))
    m["mia_auc"] = m["priv_leak"] = None  # without holdout rows there are no non-members
    if "holdout" in scores:
        m["mia_auc"] = lm_metrics.membership_auc(scores["forget"]["min_k"], scores["holdout"]["min_k"])
        if oracle is not None:
            m["priv_leak"] = lm_metrics.privacy_leakage(m["mia_auc"], lm_metrics.membership_auc(
                oracle["forget"]["min_k"], oracle["holdout"]["min_k"]))
    return m


def answer_metrics(name: str, s: dict[str, np.ndarray]) -> dict[str, float]:
    """A set's mean answer probability (`<set>_prob`) and greedy answers' ROUGE-L recall (`<set>_rouge`)."""
    return {f"{name}_prob": float(lm_metrics.probability(s["logprob"], s["count"]).mean()),
            f"{name}_rouge": float(s["rouge"].mean())}


def attack_columns(attacks: Sequence[str]) -> tuple[str, ...]:
    """The table's columns of the attacks (`int8`, `int4`, `relearn`, `benign`): per attack each
    ATTACKED metric of the attacked model and its recovered share."""
    return tuple(column for attack in attacks for metric in ATTACKED
                 for column in (f"{metric}_{attack}", recovered_column(metric, attack)))


def recovered_column(metric: str, attack: str) -> str:
    return f"recovered_{metric.removeprefix('forget_')}_{attack}"  # forget_prob → recovered_prob_int4


def attack_metrics(attack: str, model: dict[str, np.ndarray], original: dict[str, np.ndarray],
                   attacked: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, float | None]:
    """One attack's attack_columns from the forget set's per-example scores of the model, the
    original and the attacked model, all on the forget `rows` (None: every row; relearning
    scores only those it did not train on): each ATTACKED metric of the attacked model and its
    recovered share (attacked − model) / (original − model), None for the original (attacks.recovery)."""
    model_m, original_m, attacked_m = (forget_metrics(s, rows) for s in (model, original, attacked))
    row: dict[str, float | None] = {}
    for metric in ATTACKED:
        row[f"{metric}_{attack}"] = attacked_m[metric]
        row[recovered_column(metric, attack)] = recovered_share(original_m[metric], model_m[metric],
                                                                attacked_m[metric])
    return row


def forget_metrics(scores: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, float | None]:
    """The ATTACKED metrics of a forget set's per-example scores, on `rows` (None: all)."""
    if rows is not None:
        scores = {name: values[rows] for name, values in scores.items()}
    return {**answer_metrics("forget", scores), "forget_fact": fact_metrics({"forget": scores})["forget_fact"]}


def utility_scores(scores: dict[str, dict[str, np.ndarray]]) -> list[float]:
    """TOFU's model utility inputs: probability, ROUGE-L and truth-ratio score of the retain
    sample and, where the set has one, of the utility set (facts no forget request touches)."""
    values = []
    for name in ("retain", "utility"):
        if name not in scores:
            continue
        s = scores[name]
        values += [float(lm_metrics.probability(s["logprob"], s["count"]).mean()), float(s["rouge"].mean())]
        ratios = truth_ratios(s)
        if ratios is not None:
            values.append(lm_metrics.truth_ratio_retain_score(ratios))
    return values


def fact_metrics(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, float | None]:
    """Per scored set with marked facts: the mean probability of the fact given the question and
    the answer's prefix (`<set>_fact`), and on forget the share of facts greedy decoding
    reproduces (`forget_fact_em`); None where a set marks no fact."""
    m: dict[str, float | None] = {"forget_fact": None, "forget_fact_em": None, "retain_fact": None,
                                  "holdout_fact": None}
    for name in ("forget", "retain", "holdout"):
        s = scores.get(name, {})
        marked = ~np.isnan(s["fact_logprob"]) if "fact_logprob" in s else np.zeros(0, dtype=bool)
        if marked.any():
            m[f"{name}_fact"] = float(lm_metrics.fact_probability(s["fact_logprob"][marked]).mean())
            if name == "forget":
                m["forget_fact_em"] = float(s["fact_exact"][marked].mean())
    return m
