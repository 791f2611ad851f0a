"""Trade-off plot labels stay readable when methods land close together."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.text import Text

from hamu_ray.pipeline import plots

# the Fashion-MNIST demo's end points (README): five methods within two points of each other
DEMO = {"original": (87.7, 78.5), "oracle": (89.6, 66.2), "hamu-q": (89.7, 45.8), "hamu-u": (87.8, 44.7),
        "surgery": (90.5, 46.3), "surgery-implicit": (90.4, 46.1), "gdiff": (79.5, 40.8), "ga": (11.1, 5.4),
        "npo": (90.8, 46.5), "scrub": (87.8, 44.9)}


def overlaps(boxes) -> list:
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if plots._overlap(a, b)]


def test_placed_labels_overlap_neither_each_other_nor_the_points():
    anchors = [(100 + 3 * i, 100 + 2 * (i % 3)) for i in range(9)]  # nine points within 25 px
    sizes = [(60.0, 10.0)] * 9
    offsets = plots.place_labels(anchors, sizes)
    boxes = [(x + dx, y + dy, x + dx + w, y + dy + h) for (x, y), (dx, dy), (w, h) in zip(anchors, offsets, sizes)]
    assert overlaps(boxes) == []
    markers = [(x - 6, y - 6, x + 6, y + 6) for x, y in anchors]
    assert not any(plots._overlap(b, m) for b in boxes for m in markers)


def test_the_old_fixed_offsets_did_collide_on_this_cluster():
    """The check above can fail: one fixed offset per label (the old plot) overlaps here."""
    anchors = [(100 + 3 * i, 100 + 2 * (i % 3)) for i in range(9)]
    boxes = [(x + 5, y + 4, x + 65, y + 14) for x, y in anchors]
    assert overlaps(boxes)


def test_the_demo_plot_labels_are_apart_and_the_axes_say_which_way_is_better(tmp_path):
    rows = [{"model": name, "test_acc_retained": x / 100, "forget_acc": y / 100} for name, (x, y) in DEMO.items()]
    plots.tradeoff(rows, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 0

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ax.scatter(*zip(*DEMO.values()))
    plots.label_points(fig, ax, list(DEMO.values()), list(DEMO))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    # the text itself (an Annotation's own extent also covers its leader line)
    boxes = [tuple(Text.get_window_extent(t, renderer).extents) for t in ax.texts]
    assert len(boxes) == len(DEMO) and overlaps(boxes) == []
    plt.close(fig)
    fig, ax = plt.subplots()
    plots.label_points(fig, ax, [], [])  # nothing to label is fine
    plt.close(fig)


@pytest.mark.parametrize("label", ["→  better", "↓  more forgotten"])
def test_axis_labels_name_the_better_direction(tmp_path, label, monkeypatch):
    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.extend(
        [fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()]) or plt.close(fig))
    plots.tradeoff([{"model": "a", "test_acc_retained": 0.5, "forget_acc": 0.5}], tmp_path / "t.png")
    assert any(label in text for text in seen)


def test_the_hardness_plot_shows_the_retain_change_made_beside_the_one_predicted(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.update(
        lines=[(line.get_label(), list(line.get_ydata())) for line in fig.axes[2].lines]) or plt.close(fig))
    measured = [{"step": s, "hardness/cosine_mean": 0.1, "guarantee/retain_change": -0.01 * s,
                 "realised/retain_change": 0.02 * s} for s in (1, 2, 3)]
    unmeasured = [{"step": 1, "hardness/cosine_mean": 0.2}]
    plots.hardness({"hamu-q": measured, "gdiff": unmeasured}, tmp_path / "h.png")
    assert seen["lines"][:2] == [("hamu-q", [0.02, 0.04, 0.06]), ("_predicted", [-0.01, -0.02, -0.03])]
    assert len(seen["lines"]) == 3  # and the zero line; nothing for the method that did not measure


def drawn_bars(monkeypatch, rows, axes) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The tradeoff plot's error bars as ((x0, x1), (y0, y1)) segments in data units, and its y limits last."""
    from matplotlib.collections import LineCollection

    seen = []

    def keep(fig, path):
        ax = fig.axes[0]
        for collection in ax.collections:
            if isinstance(collection, LineCollection):
                seen.extend(tuple(map(tuple, segment.T)) for segment in collection.get_segments())
        seen.append(ax.get_ylim())
        plt.close(fig)

    monkeypatch.setattr(plots, "_save", keep)
    plots.tradeoff(rows, Path("unused.png"), axes)
    return seen


def test_a_methods_seeds_show_as_bars_of_one_sd_about_its_mean(monkeypatch):
    rows = [{"model": "original", "test_acc_retained": 0.9, "forget_acc": 0.9},
            {"model": "a", "test_acc_retained": 0.8, "test_acc_retained_sd": 0.02,
             "forget_acc": 0.1, "forget_acc_sd": 0.05, "seeds": 3}]
    *bars, _ = drawn_bars(monkeypatch, rows, plots.CLASSIFIER_AXES)
    # percent axes: x 80 ± 2, y 10 ± 5; the original (no spread) has none
    assert sorted(bars) == sorted([((78.0, 82.0), (10.0, 10.0)), ((80.0, 80.0), (5.0, 15.0))])


def test_on_a_log_axis_a_bar_below_zero_stops_at_the_bottom_of_the_axes(monkeypatch):
    rows = [{"model": "oracle", "model_utility": 0.6, "forget_quality": 1.0},
            {"model": "a", "model_utility": 0.5, "forget_quality": 0.01, "forget_quality_sd": 0.02}]
    *bars, (bottom, _) = drawn_bars(monkeypatch, rows, plots.LM_AXES)
    [(_, (low, high))] = bars
    assert high == pytest.approx(0.03) and low == pytest.approx(bottom) and 1e-4 < bottom < 0.01


def test_the_attacks_plot_puts_each_attacks_forget_probability_beside_the_models(monkeypatch):
    seen = {}

    def keep(fig, path):
        ax = fig.axes[0]
        seen["bars"] = {c.get_label(): [round(b.get_height(), 6) for b in c] for c in ax.containers}
        seen["ticks"] = [t.get_text() for t in ax.get_xticklabels()]
        plt.close(fig)

    monkeypatch.setattr(plots, "_save", keep)
    rows = [{"model": "original", "forget_prob": 0.9, "forget_prob_int4": 0.88, "forget_prob_relearn": 0.91},
            {"model": "hamu-q", "forget_prob": 0.2, "forget_prob_int4": 0.3, "forget_prob_relearn": None}]
    plots.attacks(rows, ["int4", "relearn"], Path("unused.png"))
    assert seen["ticks"] == ["original", "hamu-q"]
    assert seen["bars"] == {"as unlearned": [0.9, 0.2], "int4": [0.88, 0.3], "relearn": [0.91]}
