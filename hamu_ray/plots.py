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


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
