"""Language-model unlearning metrics, each defined once, from per-example model outputs.

Inputs are numbers a worker computes per example (summed answer log-probability and its token
count, the answer tokens' log-probabilities, the greedy answer's text); the functions here are
pure and run anywhere. Sources: TOFU (Maini et al. 2024: probability, ROUGE-L recall, truth ratio,
forget quality, model utility) and MUSE (Shi et al. 2024: Min-K% membership AUC, privacy leakage),
as the open-unlearning toolkit computes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import hmean, ks_2samp
from sklearn.metrics import roc_auc_score


def probability(logprob_sum: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Length-normalised answer probability P̃(a|q) = exp(mean answer-token log-prob) (TOFU)."""
    count = np.asarray(count, dtype=np.float64)
    if (count <= 0).any():
        raise ValueError("every answer needs at least one token")
    return np.exp(np.asarray(logprob_sum, dtype=np.float64) / count)


def fact_probability(fact_logprob: np.ndarray) -> np.ndarray:
    """P(value | question, answer prefix): the product of the value span's token probabilities,
    not their geometric mean. Once a model has the value's first token the rest is often easy
    ("Central African" → "CFA franc"), so a per-token mean would credit a model that does not
    know the fact; the joint probability is the chance it completes the value."""
    return np.exp(np.asarray(fact_logprob, dtype=np.float64))


def rouge_l_recall(generated: Sequence[str], reference: Sequence[str]) -> np.ndarray:
    """ROUGE-L recall of each greedy answer against its true answer, Porter stemmer on (TOFU)."""
    from rouge_score import rouge_scorer

    if len(generated) != len(reference):
        raise ValueError(f"{len(generated)} generated answers for {len(reference)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, gen)["rougeL"].recall for gen, ref in zip(generated, reference)])


def truth_ratio(perturbed_logp: np.ndarray, paraphrased_logp: np.ndarray) -> np.ndarray:
    """R = P̃(perturbed)/P̃(paraphrased) per question, the perturbed answers (columns) combined
    by their geometric mean (TOFU). Inputs are log P̃, mean answer-token log-probabilities: in log
    space, answers a collapsed model gives P̃ = 1e-400 (0 as a float) still compare."""
    perturbed = np.atleast_2d(np.asarray(perturbed_logp, dtype=np.float64))
    paraphrased = np.asarray(paraphrased_logp, dtype=np.float64)
    if perturbed.shape[0] != paraphrased.shape[0]:
        raise ValueError(f"{perturbed.shape[0]} rows of perturbed answers for {paraphrased.shape[0]} questions")
    with np.errstate(over="ignore"):  # R = inf: the model is sure of the false answers
        return np.exp(perturbed.mean(axis=1) - paraphrased)


def truth_ratio_forget_score(ratios: np.ndarray) -> float:
    """mean(min(R, 1/R)): 1 when the model cannot tell true from false answers (TOFU, forget).
    R = 0 (false answers underflowed against the paraphrase) scores 0, without numpy's
    divide-by-zero warning: what is wrong with such scores is said in words (outcomes.notes)."""
    r = np.asarray(ratios, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return float(np.minimum(r, 1.0 / r).mean())


def truth_ratio_retain_score(ratios: np.ndarray) -> float:
    """mean(max(0, 1 − R)): 1 when true answers are far likelier than false ones (TOFU, retain)."""
    return float(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=np.float64)).mean())


def forget_quality(unlearned_forget_ratios: np.ndarray, oracle_forget_ratios: np.ndarray) -> float:
    """p-value of a two-sample KS test between the unlearned model's and the oracle's forget
    truth ratios (TOFU): high when the unlearned model is indistinguishable from the oracle."""
    return float(ks_2samp(unlearned_forget_ratios, oracle_forget_ratios).pvalue)


def model_utility(scores: Sequence[float]) -> float:
    """Harmonic mean of the utility sets' probability, ROUGE-L and truth-ratio scores (TOFU):
    any one near zero drags it to zero."""
    values = np.asarray(scores, dtype=np.float64)
    if (values < 0).any():
        raise ValueError(f"utility scores must be ≥ 0, got {values.tolist()}")
    with np.errstate(over="ignore"):  # 1/x of a subnormal score: the mean is then ~0, as it should be
        return 0.0 if (values == 0).any() else float(hmean(values))


def min_k_percent(token_logprobs: Sequence[np.ndarray], k: float = 0.4) -> np.ndarray:
    """Min-K% score per example: the mean of its lowest k share of token log-probs (at least one
    token) (Shi et al. 2024). Higher: more likely a training member."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    out = []
    for lp in token_logprobs:
        lp = np.sort(np.asarray(lp, dtype=np.float64))
        if lp.size == 0:
            raise ValueError("an example without tokens has no Min-K% score")
        out.append(lp[:max(1, int(lp.size * k))].mean())
    return np.array(out)


def membership_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC AUC of telling forget rows (members) from holdout rows by a score where higher means
    member (Min-K%, or −loss). 0.5: indistinguishable."""
    members, nonmembers = np.asarray(member_scores), np.asarray(nonmember_scores)
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("membership inference needs both members and non-members")
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return float(roc_auc_score(labels, np.concatenate([members, nonmembers])))


def privacy_leakage(auc_unlearned: float, auc_oracle: float) -> float:
    """PrivLeak = ((1 − AUC_unlearned) − (1 − AUC_oracle)) / (1 − AUC_oracle) × 100 (MUSE, as in
    docs/design.md): 0 like the oracle; its sign says on which side of the oracle the model is."""
    if math.isclose(auc_oracle, 1.0):
        raise ValueError("the oracle's AUC is 1: privacy leakage is undefined")
    return ((1 - auc_unlearned) - (1 - auc_oracle)) / (1 - auc_oracle) * 100
