"""The adaptive radius of HAMU: a trust region on the first-order model (docs/design.md §3b).

HAMU's step is solved on the first-order model L(θ + Δ) ≈ L(θ) + g·Δ, which is only accurate
inside some radius; the rule's R says nothing about where that is. After every step the engine
measures the retain loss again on the same batch, and the model's error on the retain side is

    e = (realised retain change) − (predicted retain change g_r·Δ).

Classical trust-region methods compare actual and predicted reduction of one objective; HAMU has
a constraint (the forget gain) and an objective (the retain cost), and the failure that matters
is unforeseen retain damage, so the test is on e, in retain-loss units:
  e > tolerance       the model was wrong: halve the scale s on R (and on an absolute B);
  e ≤ tolerance / 8   the model was accurate: double s back, at most to 1;
  otherwise           keep s.
With a twice-differentiable loss e = ½·Δᵀ H_r Δ + o(‖Δ‖²) scales as s², so a few halvings bring
it under any tolerance where the curvature is bounded, and doubling s multiplies it by 4: growing
only below tolerance/8 leaves the next step a factor 2 under the tolerance (a threshold of 1/2, as
in textbook trust regions, made the radius oscillate on every other step here). If s must fall
below MIN_SCALE the steps the rule can take are too small to matter and the run stops (stop
reason trust_region).
A step that failed the test is kept (undoing it would need a copy of the weights); the next
step is the smaller one.
"""

from __future__ import annotations

import math

SHRINK, GROW = 0.5, 2.0
GROW_BELOW = 1 / 8  # of the tolerance
MIN_SCALE = 2.0**-6  # six halvings: R and B at 1/64 of what was asked
STOP = "trust_region"  # the engine's stop reason when the scale would fall below MIN_SCALE


def next_scale(scale: float, predicted_retain_change: float, realised_retain_change: float,
               tolerance: float) -> float:
    """The trust region's factor for the next step; below MIN_SCALE means stop."""
    error = realised_retain_change - predicted_retain_change
    if not math.isfinite(error) or error > tolerance:
        return scale * SHRINK
    if error <= tolerance * GROW_BELOW:
        return min(1.0, scale * GROW)
    return scale
