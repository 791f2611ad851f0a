"""The pipeline's two figures, as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

REFERENCE_MARKERS = {"original": ("s", "black"), "oracle": ("*", "tab:red")}


def tradeoff(rows: list[dict], path: Path) -> None:
    """Forget accuracy (lower: more forgotten) against test accuracy on the retained classes
    (higher: more utility kept), one point per method, the original and the oracle marked."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        x, y = row.get("test_acc_retained"), row.get("forget_acc")
        if x is None or y is None:
            continue
        marker, color = REFERENCE_MARKERS.get(row["model"], ("o", None))
        ax.scatter(100 * x, 100 * y, marker=marker, color=color, s=90 if marker != "o" else 40)
        ax.annotate(row["model"], (100 * x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("test accuracy on retained classes (%)")
    ax.set_ylabel("forget accuracy (%)")
    ax.set_title("forgetting vs utility (oracle: retrained without the forget set)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def hardness(step_logs: dict[str, list[dict]], path: Path) -> None:
    """Per method: the mean retain/forget gradient cosine and HAMU's stopping margin by step."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for label, rows in step_logs.items():
        for ax, key in ((top, "hardness/cosine_mean"), (bottom, "stop/margin")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1)
    top.set_ylabel("cos(g_r, g_f), block mean")
    bottom.set_ylabel("stop margin (rhs − B)")
    bottom.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def pareto(rows: list[dict], floor: float, path: Path) -> None:
    """Search trials: forget quality (KS p-value, log scale) against test accuracy on the
    retained classes; the Pareto front of the finished trials, the utility floor, the choice."""
    done = [r for r in rows if r.get("forget_quality") is not None and r.get("test_acc_retained") is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    tiny = 1e-300  # p-values underflow to 0 with large forget sets: keep them on the log axis
    points = [(100 * r["test_acc_retained"], max(r["forget_quality"], tiny), r) for r in done]
    for x, y, r in points:
        ax.scatter(x, y, marker="*" if r["chosen"] else "o", s=160 if r["chosen"] else 30,
                   color="tab:red" if r["chosen"] else ("tab:blue" if r["feasible"] else "grey"), zorder=3)
    front = pareto_front([(x, y) for x, y, _ in points])
    if len(front) > 1:
        ax.plot(*zip(*front), color="tab:blue", linewidth=1, label="Pareto front")
    ax.axvline(100 * floor, color="grey", linestyle="--", linewidth=0.8, label="utility floor")
    if points:
        ax.set_yscale("log")
    ax.set_xlabel("test accuracy on retained classes (%)")
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
