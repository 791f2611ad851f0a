"""Each language-model metric against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hamu_ray.pipeline import lm_metrics as m


def test_probability_is_the_length_normalised_likelihood():
    assert m.probability([-2.0, -3.0], [2, 3]) == pytest.approx([math.exp(-1)] * 2)
    with pytest.raises(ValueError, match="at least one token"):
        m.probability([-1.0], [0])


def test_rouge_l_recall_by_hand():
    # longest common subsequence "the cat sat" (3 of the reference's 6 tokens); the stemmer
    # makes "cats" match "cat"; nothing generated recalls nothing
    got = m.rouge_l_recall(["the cat sat", "cats", ""], ["the cat sat on the mat", "the cat", "a b"])
    assert got == pytest.approx([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="2 generated answers for 1 references"):
        m.rouge_l_recall(["a", "b"], ["a"])


def test_truth_ratio_and_its_summaries_by_hand():
    # geometric mean of the perturbed 0.1 and 0.4 is 0.2, the paraphrased answer's 0.2: R = 1
    log = np.log
    assert m.truth_ratio(log([[0.1, 0.4]]), log([0.2])) == pytest.approx([1.0])
    assert m.truth_ratio(log([[0.1, 0.1], [0.4, 0.4]]), log([0.2, 0.2])) == pytest.approx([0.5, 2.0])
    # probabilities far below the smallest float (a collapsed model) still give their ratio
    assert m.truth_ratio([[-900.0, -902.0]], [-900.0]) == pytest.approx([math.exp(-1.0)])
    ratios = np.array([0.5, 2.0, 1.0])
    assert m.truth_ratio_forget_score(ratios) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert m.truth_ratio_retain_score(ratios) == pytest.approx((0.5 + 0.0 + 0.0) / 3)


def test_forget_quality_is_the_ks_p_value():
    same = np.linspace(0.1, 1.0, 10)
    assert m.forget_quality(same, same) == pytest.approx(1.0)
    # every unlearned ratio below every oracle ratio, 10 and 10: exact p = 2 / C(20, 10)
    assert m.forget_quality(same, same + 10) == pytest.approx(2 / math.comb(20, 10), rel=1e-6)


def test_model_utility_is_a_harmonic_mean():
    assert m.model_utility([0.5, 1.0]) == pytest.approx(2 / (1 / 0.5 + 1 / 1.0))
    assert m.model_utility([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError, match="≥ 0"):
        m.model_utility([0.5, -0.1])


def test_min_k_percent_by_hand():
    tokens = [np.array([-1.0, -2.0, -3.0, -4.0, -5.0])]
    assert m.min_k_percent(tokens, k=0.4) == pytest.approx([-4.5])  # the lowest 2 of 5
    assert m.min_k_percent(tokens, k=0.1) == pytest.approx([-5.0])  # at least one token
    assert m.min_k_percent(tokens, k=1.0) == pytest.approx([-3.0])


def test_membership_auc_and_privacy_leakage_by_hand():
    assert m.membership_auc([3, 4], [1, 2]) == 1.0
    assert m.membership_auc([1, 3], [2, 4]) == pytest.approx(0.25)  # 1 of 4 pairs ordered
    assert m.privacy_leakage(0.75, 0.5) == pytest.approx(-50.0)
    assert m.privacy_leakage(0.5, 0.5) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        m.privacy_leakage(0.5, 1.0)
