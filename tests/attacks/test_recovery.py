"""The recovered share, (attacked − unlearned) / (original − unlearned), and where it is undefined."""

from __future__ import annotations

import pytest

from hamu_ray.attacks.recovery import recovered_share


def test_an_attack_that_changes_nothing_recovers_0_and_one_that_restores_the_original_1():
    original, unlearned = 0.8, 0.2
    assert recovered_share(original, unlearned, unlearned) == 0  # the unlearned model scored twice
    assert recovered_share(original, unlearned, original) == 1
    assert recovered_share(original, unlearned, 0.35) == pytest.approx(0.25)
    assert recovered_share(original, unlearned, 0.1) == pytest.approx(-1 / 6)  # it forgot more
    assert recovered_share(0.2, 0.8, 0.65) == pytest.approx(0.25)  # a metric the unlearning raised


def test_it_is_undefined_without_a_gap_to_recover_or_a_value():
    assert recovered_share(0.5, 0.5, 0.7) is None  # forgot nothing measurable (the original's own row)
    assert recovered_share(0.5, 0.5, 0.5) is None
    for missing in ((None, 0.2, 0.3), (0.8, None, 0.3), (0.8, 0.2, None)):
        assert recovered_share(*missing) is None
