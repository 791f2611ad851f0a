"""How much of what a model forgot an attack brings back."""

from __future__ import annotations


def recovered_share(original: float | None, unlearned: float | None, attacked: float | None) -> float | None:
    """(attacked − unlearned) / (original − unlearned) of one metric (a forget probability, a
    ROUGE): 0 when the attack changes nothing, 1 when it restores the original's value, below 0
    when it forgets more, above 1 when it overshoots the original.

    None where it is undefined: a missing value (a metric the sets do not have), or an unlearned
    model that scores exactly as the original (it forgot nothing measurable, so there is no
    share to recover; the original itself is such a model)."""
    if original is None or unlearned is None or attacked is None or original == unlearned:
        return None
    return (attacked - unlearned) / (original - unlearned)
