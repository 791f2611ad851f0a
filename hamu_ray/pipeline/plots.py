"""The pipeline's figures, as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from scipy.stats import ks_2samp  # noqa: E402

from hamu_ray.engine.monitor import ROW_LOSSES  # noqa: E402

REFERENCE_MARKERS = {"original": ("s", "black"), "oracle": ("*", "tab:red")}


@dataclass(frozen=True)
class Axis:
    key: str  # the comparison row's column
    label: str
    scale: float = 1.0  # 100: shown in percent
    log: bool = False  # p-values: kept on a log axis (0 is drawn at 1e-300)


# forgetting (y) against utility kept (x)
CLASSIFIER_AXES = (Axis("test_acc_retained", "test accuracy on retained classes (%)  →  better", 100),
                   Axis("forget_acc", "forget accuracy (%)  ↓  more forgotten", 100))
LM_AXES = (Axis("model_utility", "model utility (retain and utility sets)  →  better"),
           Axis("forget_quality", "forget quality (KS p vs oracle, log)  ↑  better", log=True))
TINY = 1e-300  # p-values underflow to 0 with large sets: keep them on a log axis


def tradeoff(rows: list[dict], path: Path, axes: tuple[Axis, Axis] = CLASSIFIER_AXES) -> None:
    """Forgetting against utility kept, one point per method, the original and the oracle
    marked; a method run with several seeds is its mean, with error bars of ± one sd (its row's
    `<key>_sd`). Labels are placed apart from each other and from the points, so close methods
    stay readable."""
    x_axis, y_axis = axes
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    points, names, bars = [], [], []
    for row in rows:
        x, y = row.get(x_axis.key), row.get(y_axis.key)
        if x is None or y is None:
            continue
        x, y = x * x_axis.scale, max(y * y_axis.scale, TINY) if y_axis.log else y * y_axis.scale
        marker, color = REFERENCE_MARKERS.get(row["model"], ("o", None))
        drawn = ax.scatter(x, y, marker=marker, color=color, s=90 if marker != "o" else 40, zorder=3)
        points.append((x, y))
        names.append(row["model"])
        spread = [(row.get(f"{axis.key}_sd") or 0.0) * axis.scale for axis in axes]
        if any(spread):
            bars.append((x, y, *spread, drawn.get_facecolor()[0]))
    if y_axis.log and points:
        ax.set_yscale("log")
    spread_bars(ax, bars, y_axis.log)
    ax.set_xlabel(x_axis.label)
    ax.set_ylabel(y_axis.label)
    ax.set_title("forgetting vs utility (oracle: retrained without the forget set)")
    ax.grid(alpha=0.3)
    label_points(fig, ax, points, names)
    _save(fig, path)


def spread_bars(ax, bars: list[tuple], log: bool) -> None:
    """Error bars (x, y, x sd, y sd, colour) of ± one sd. On a log y axis a bar whose lower end
    is not positive runs to the bottom of the axes (the points' own range), not to 1e-300."""
    if not bars:
        return
    bottom = ax.get_ylim()[0] if log else None
    for x, y, x_sd, y_sd, color in bars:
        below = min(y_sd, y - bottom) if log and y - y_sd <= 0 else y_sd
        ax.errorbar(x, y, xerr=x_sd or None, yerr=[[below], [y_sd]] if y_sd else None, fmt="none",
                    ecolor=color, elinewidth=1, capsize=3, zorder=2)
    if log:
        ax.set_ylim(bottom=bottom)


def label_points(fig, ax, points: list[tuple[float, float]], names: list[str], fontsize: int = 8) -> None:
    """Annotate each point with its name where place_labels finds room; a thin leader line joins
    a label pushed away from its point."""
    if not points:
        return
    ax.margins(0.15)  # room for labels near the edges
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    anchors = [tuple(ax.transData.transform(p)) for p in points]
    sizes = []
    for name in names:
        text = ax.text(0, 0, name, fontsize=fontsize)
        box = text.get_window_extent(renderer)
        sizes.append((box.width, box.height))
        text.remove()
    to_points = 72.0 / fig.dpi
    for (x, y), name, (dx, dy), (w, h) in zip(points, names, place_labels(anchors, sizes), sizes):
        far = math.hypot(dx + w / 2, dy + h / 2) > 25 + w / 2
        ax.annotate(name, (x, y), xytext=(dx * to_points, dy * to_points), textcoords="offset points",
                    fontsize=fontsize, ha="left", va="bottom",
                    arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.6} if far else None)


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels


def place_labels(anchors: list[tuple[float, float]], sizes: list[tuple[float, float]], *,
                 marker: float = 6.0, step: float = 6.0, max_radius: float = 150.0) -> list[tuple[float, float]]:
    """Offsets (pixels, of each label's lower-left corner from its point) such that no label
    overlaps another label or any point's marker: greedily, each label takes the nearest free
    spot on rings of growing radius around its point (eight directions per ring). A label that
    finds no free spot within max_radius keeps the last one tried."""
    taken: list[Box] = [(x - marker, y - marker, x + marker, y + marker) for x, y in anchors]
    offsets = []
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for (x, y), (w, h) in zip(anchors, sizes):
        choice = (marker, marker)
        radius = marker
        while radius <= max_radius:
            free = next((o for o in (_corner_offset(dx, dy, radius, w, h) for dx, dy in directions)
                         if not any(_overlap((x + o[0], y + o[1], x + o[0] + w, y + o[1] + h), b)
                                    for b in taken)), None)
            if free is not None:
                choice = free
                break
            choice = _corner_offset(1, 1, radius, w, h)
            radius += step
        offsets.append(choice)
        taken.append((x + choice[0], y + choice[1], x + choice[0] + w, y + choice[1] + h))
    return offsets


def _corner_offset(dx: int, dy: int, radius: float, w: float, h: float) -> tuple[float, float]:
    """The lower-left corner of a w×h box that sits `radius` from the point in direction (dx, dy)."""
    x = radius if dx > 0 else (-radius - w if dx < 0 else -w / 2)
    y = radius if dy > 0 else (-radius - h if dy < 0 else -h / 2)
    return x, y


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def hardness(step_logs: dict[str, list[dict]], path: Path) -> None:
    """Per method: the mean retain/forget gradient cosine, HAMU's stopping margin, and the retain
    change each step was predicted to make (first order, dashed) beside the one it made (solid)."""
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True)
    for label, rows in step_logs.items():
        for ax, key in ((top, "hardness/cosine_mean"), (middle, "stop/margin")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1)
        measured = [r for r in rows if "realised/retain_change" in r]
        if measured:
            line, = bottom.plot([r["step"] for r in measured], [r["realised/retain_change"] for r in measured],
                                label=label, linewidth=1)
            bottom.plot([r["step"] for r in measured], [r["guarantee/retain_change"] for r in measured],
                        color=line.get_color(), linewidth=1, linestyle="--", label="_predicted")
    top.set_ylabel("cos(g_r, g_f), block mean")
    middle.set_ylabel("stop margin (rhs − B)")
    bottom.set_ylabel("retain change: made (—)\nfirst-order (- -)")
    for ax in (middle, bottom):
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    bottom.set_xlabel("step")
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
        if any(not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def attacks(rows: list[dict], names: list[str], path: Path, metric: str = "prob") -> None:
    """Per model, its forget probability (a classifier: `metric` acc, its forget accuracy) as it
    is beside the one after each attack (`names`, e.g. int4, relearn: the table's
    `forget_<metric>_<attack>`), grouped bars; a bar the run has no value for (a metric the sets
    lack) is left out. Relearning's is over the forget rows it did not train on, the others' over
    every forget row."""
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(rows) * (len(names) + 1) / 2), 4.2))
    series = [("as unlearned", f"forget_{metric}"), *((name, f"forget_{metric}_{name}") for name in names)]
    width = 0.8 / len(series)
    for k, (label, key) in enumerate(series):
        drawn = [(i, row[key]) for i, row in enumerate(rows) if row.get(key) is not None]
        if drawn:
            xs, ys = zip(*drawn)
            ax.bar([x + (k - (len(series) - 1) / 2) * width for x in xs], ys, width, label=label)
    ax.set_xticks(range(len(rows)), [row["model"] for row in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"forget {'probability' if metric == 'prob' else 'accuracy'}  ↓  more forgotten")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(series))
    _save(fig, path)


def preflight(summary: dict, path: Path) -> None:
    """Per block: cos(g_r, g_f) of the whole-set gradients, and the forget gain reachable inside
    its radius with and without retain damage (first order)."""
    blocks = summary["blocks"]
    x = range(len(blocks))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.28 * len(blocks) + 2), 6), sharex=True)
    top.bar(x, [b["cosine"] for b in blocks], color=["tab:red" if b["cosine"] > 0 else "tab:blue" for b in blocks])
    top.axhline(0.0, color="grey", linewidth=0.8)
    top.set_ylim(-1.05, 1.05)
    top.set_ylabel("cos(g_r, g_f)")
    bottom.bar(x, [b["reach"] for b in blocks], color="lightgrey", label="reachable in the radius")
    bottom.bar(x, [b["reach_without_own_damage"] for b in blocks], color="tab:green",
               label="... without raising its own retain loss")
    bottom.set_ylabel("gain per step")
    bottom.legend(fontsize=7)
    bottom.set_xticks(list(x), [b["name"] for b in blocks], rotation=90, fontsize=6)
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def curves(step_logs: dict[str, list[dict]], path: Path, target: float | None = None,
           oracle_losses: list[float] | None = None) -> None:
    """Per method, its path over the run on the monitor's samples, one point per evaluation
    (step 0 = the original, the last = the exported model): forget against retain probability;
    with the oracle's per-row forget losses also forget quality (KS p-value of the model's per-row
    forget losses against the oracle's) against retain probability."""
    panels = 2 if oracle_losses is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    prob_ax = axes[0][0]
    for label, rows in step_logs.items():
        evaluated = [r for r in rows if "monitor/forget_prob" in r]
        if not evaluated:
            continue
        x = [r["monitor/retain_prob"] for r in evaluated]
        line, = prob_ax.plot(x, [r["monitor/forget_prob"] for r in evaluated], marker=".", markersize=4,
                             linewidth=1, label=label)
        prob_ax.scatter(x[-1], evaluated[-1]["monitor/forget_prob"], color=line.get_color(), s=40, zorder=3)
        if oracle_losses is not None:
            quality = [max(ks_2samp(r[ROW_LOSSES], oracle_losses).pvalue, TINY) for r in evaluated]
            axes[0][1].plot(x, quality, marker=".", markersize=4, linewidth=1, color=line.get_color(), label=label)
            axes[0][1].scatter(x[-1], quality[-1], color=line.get_color(), s=40, zorder=3)
    if target is not None:
        prob_ax.axhline(target, color="tab:red", linestyle="--", linewidth=0.8, label="stop target (oracle)")
    prob_ax.set_ylabel("forget probability (monitor sample)  ↓  more forgotten")
    prob_ax.set_title("each method's path during unlearning (dot: the exported model)", fontsize=10)
    if oracle_losses is not None:
        axes[0][1].set_yscale("log")
        axes[0][1].set_ylabel("forget quality (KS p vs oracle, per-row loss, log)  ↑  better")
        axes[0][1].set_title("forget quality on the monitor sample", fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("retain probability (monitor sample)  →  better")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def pareto(rows: list[dict], floor: float, path: Path, utility: Axis = CLASSIFIER_AXES[0]) -> None:
    """Search trials: forget quality (KS p-value, log scale) against the utility (test accuracy
    on the retained classes, or a language model's model utility); the Pareto front of the
    finished trials, the utility floor, the choice."""
    done = [r for r in rows if r.get("forget_quality") is not None and r.get(utility.key) is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = [(utility.scale * r[utility.key], max(r["forget_quality"], TINY), r) for r in done]
    for x, y, r in points:
        ax.scatter(x, y, marker="*" if r["chosen"] else "o", s=160 if r["chosen"] else 30,
                   color="tab:red" if r["chosen"] else ("tab:blue" if r["feasible"] else "grey"), zorder=3)
    front = pareto_front([(x, y) for x, y, _ in points])
    if len(front) > 1:
        ax.plot(*zip(*front), color="tab:blue", linewidth=1, label="Pareto front")
    ax.axvline(utility.scale * floor, color="grey", linestyle="--", linewidth=0.8, label="utility floor")
    if points:
        ax.set_yscale("log")
    ax.set_xlabel(utility.label)
    ax.set_ylabel("forget quality (KS p vs oracle)")
    ax.set_title("threshold search: the chosen trial is the red star")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (both maximised), by increasing x."""
    front = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):  # best utility first
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
