"""The benchmark's Markdown: the measured matrix, the phase breakdown, and the derived scaling table.

Scaling (derived, not measured): per step and rank, with P parameters of b bytes' gradient, K
blocks and N ranks, ring collectives sending (N−1)/N of their payload (reduce-scatter,
all-gather) or 2(N−1)/N (all-reduce) per rank:
  GradDiff, one backward      one gradient reduce-scatter            (N−1)/N·b·P
  HAMU in hamu-ray            + a second reduce-scatter (g_f's)      (N−1)/N·b·P
                              + the statistics all-reduce            2(N−1)/N·24·K
  the HAMU paper's layout     every rank all-gathers g_r and g_f     2·(N−1)·b·P
and the memory HAMU keeps: this rank's shard of g_r, b·P/N (the paper's layout: 2·b·P).
The table takes b = 4 (fp32 gradients), as the paper's layout does.
"""

from __future__ import annotations

from collections import defaultdict

from hamu_ray.bench import BASELINE, METHODS

PARAMS = (1e9, 8e9, 70e9)
RANKS = (2, 8, 64, 1024)
LINK_GB_S = 50.0  # per rank, ≈ 400 Gb/s InfiniBand: an assumption, stated in the table
BLOCKS_AT_SCALE = 723  # a 70B Llama: 80 layers × 9 tensors + embeddings, final norm, head


def markdown(rows: list[dict], meta: dict) -> str:
    parts = [f"# hamu-ray bench\n\n{meta['where']}\n"]
    for model in dict.fromkeys(r["model"] for r in rows):
        parts.append(matrix(model, [r for r in rows if r["model"] == model]))
        parts.append(breakdown([r for r in rows if r["model"] == model]))
    parts.append(checks_table(meta["checks"]))
    parts.append(scaling(rows))
    return "\n".join(parts)


def config_name(r: dict) -> str:
    return "torch, 1 process" if r["backend"] == "torch" else f"ZeRO-{r['stage']}, {r['workers']}w"


def matrix(model: str, rows: list[dict]) -> str:
    """Methods down, configurations across: median ms (ratio to gdiff-1bwd), spread below."""
    configs = list(dict.fromkeys(config_name(r) for r in rows))
    cell = {(r["method"], config_name(r)): r for r in rows}
    lines = [f"## {model}: step time, median ms (× {BASELINE}); interquartile range\n",
             "| method | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        cells = []
        for c in configs:
            r = cell.get((method, c))
            if r is None:
                cells.append("")
                continue
            ratio = f" (×{r['ratio']:.2f})" if r["ratio"] else ""
            stop = " stopped" if r["stopped_steps"] else ""
            cells.append(f"{r['ms']:.1f}{ratio} [{r['q1_ms']:.1f}–{r['q3_ms']:.1f}]{stop}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    first = rows[0]
    if first["tokens_per_step"]:
        lines.append(f"\nTokens/s (retain + forget tokens, {first['tokens_per_step']} per step, over the "
                     "median step time):\n")
        lines.append("| method | " + " | ".join(configs) + " |")
        lines.append("|---" * (len(configs) + 1) + "|")
        for method in [m for m in ("ft", BASELINE, "hamu-q") if any(r["method"] == m for r in rows)]:
            lines.append(f"| {method} | " + " | ".join(
                f"{cell[(method, c)]['tokens_per_step'] / cell[(method, c)]['ms'] * 1e3:,.0f}"
                if (method, c) in cell else "" for c in configs) + " |")
    lines.append("\nMax |Δθ| vs plain torch after every step, peak memory per worker (MiB), "
                 "g_r kept (MiB per worker):\n")
    lines.append("| method | " + " | ".join(configs) + " |")
    lines.append("|---" * (len(configs) + 1) + "|")
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        cells = []
        for c in configs:
            r = cell.get((method, c))
            cells.append("" if r is None else
                         f"{r['max_abs_diff_vs_torch']:.1e} · {r['peak_mib']:.0f} · {r['g_r_bytes'] / 2**20:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def breakdown(rows: list[dict]) -> str:
    """Median ms per phase for the baseline and HAMU-Q in each configuration."""
    picked = [r for r in rows if r["method"] in (BASELINE, "hamu-q", "implicit-fast")]
    phases = list(dict.fromkeys(p for r in picked for p in r["phases_ms"]))
    for r in picked:  # measured beside the steps: what one more gradient reduction costs
        r["phases_ms"]["(one gradient all-reduce)"] = r.get("gradient_all_reduce_ms", 0.0)
    phases.append("(one gradient all-reduce)")
    lines = ["Phases (median ms; ZeRO's own collectives run inside forward+backward and the optimizer "
             "step):\n", "| configuration | method | " + " | ".join(phases) + " |",
             "|---" * (len(phases) + 2) + "|"]
    for r in picked:
        lines.append(f"| {config_name(r)} | {r['method']} | "
                     + " | ".join(f"{r['phases_ms'][p]:.2f}" if p in r["phases_ms"] else "" for p in phases)
                     + " |")
    return "\n".join(lines) + "\n"


def checks_table(checks: dict[str, float]) -> str:
    lines = ["## Equivalence (max |Δθ| after every step)\n", "| check | value |", "|---|---|"]
    lines += [f"| {name} | {value:.2e} |" for name, value in checks.items()]
    return "\n".join(lines) + "\n"


def scaling(rows: list[dict], link_gb_s: float = LINK_GB_S) -> str:
    """Bytes and seconds per rank per step for large P and N (derived, not measured): the
    collectives from the formulas in this module's docstring at `link_gb_s`, HAMU's local work
    (keep g_r, statistics, combine) from its cost per gradient element measured in this run."""
    measured = [r for r in rows if r["method"] == "hamu-q" and r["backend"] == "torch"]
    per_element = None
    if measured:
        r = max(measured, key=lambda r: r["trainable_params"])
        local = sum(r["phases_ms"].get(p, 0.0) for p in ("keep g_r", "statistics", "combine + write back"))
        per_element = local * 1e-3 / r["trainable_params"]
    lines = [f"## Scaling (derived, not measured): per rank and step, fp32 gradients, links of "
             f"{link_gb_s:.0f} GB/s\n",
             "| P | N | GradDiff: 1 reduce-scatter | HAMU extra in hamu-ray: 1 reduce-scatter + K×3 floats "
             "| the paper: all-gather g_r and g_f | paper ÷ hamu-ray | HAMU's local work per rank "
             "| g_r kept per rank: hamu-ray (ZeRO ≥ 1) / paper |",
             "|---|---|---|---|---|---|---|---|"]
    for p in PARAMS:
        for n in RANKS:
            reduce_scatter = (n - 1) / n * 4 * p
            extra = reduce_scatter + 2 * (n - 1) / n * 24 * BLOCKS_AT_SCALE
            paper = 2 * (n - 1) * 4 * p
            local = _seconds(per_element * p / n) if per_element else "n/a"
            lines.append(f"| {p / 1e9:.0f}B | {n} | {_sent(reduce_scatter, link_gb_s)} | {_sent(extra, link_gb_s)} "
                         f"| {_sent(paper, link_gb_s)} | {paper / extra:,.0f}× | {local} "
                         f"| {_bytes(4 * p / n)} / {_bytes(8 * p)} |")
    if per_element:
        lines.append(f"\nHAMU's local work: {per_element * 1e9:.2f} ns per gradient element measured here "
                     f"(plain torch, {r['model']}), times P/N; the rule itself is a constant "
                     f"{r['phases_ms'].get('rule', 0.0):.1f} ms per step on the host. K = {BLOCKS_AT_SCALE} "
                     "blocks (a 70B Llama's parameter tensors).")
    return "\n".join(lines) + "\n"


def _sent(n: float, link_gb_s: float) -> str:
    return f"{_bytes(n)} ({_seconds(n / (link_gb_s * 1e9))})"


def _seconds(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 10 else f"{t:,.0f} s"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def summary(rows: list[dict]) -> dict:
    """Ratios to gdiff-1bwd by (model, configuration) for each method: the JSON's quick view."""
    out: dict = defaultdict(dict)
    for r in rows:
        if r["ratio"] is not None:
            out[f"{r['model']} {config_name(r)}"][r["method"]] = round(r["ratio"], 3)
    return dict(out)
