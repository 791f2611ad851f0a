"""Several seeds per method (`seeds: N`): the table's mean ± sd, and which differences between
methods exceed the spread of the seeds.

Every method runs once per seed (data order and every random draw; PipelineConfig.seed_runs);
the original and the oracle are one model each, the references every run is measured against.
The spread is the sample standard deviation over the seeds (ddof 1). Two methods differ on a
metric beyond it when Welch's t-test (unequal variances) over their per-seed values gives
p < ALPHA, two-sided, not corrected for the number of pairs compared. No Ray here: rows in, rows
and text out.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import ttest_ind

from hamu_ray import files
from hamu_ray.pipeline import evaluate

ALPHA = 0.05
# what the statement compares: forget quality and the utility kept (higher is better for both)
HEADLINE = {True: ("forget_quality", "model_utility"), False: ("forget_quality", "test_acc_retained")}
TEXT = ("model", "stop")
SEED_FILES = ("comparison_seeds.csv", "spread.md")  # written with seeds > 1 only


# ---- the table -----------------------------------------------------------------------------

def method_runs(cfg, runs: Sequence[dict]) -> dict[str, list[tuple[int, dict]]]:
    """Per method label, its (seed, row) over the seeds, from the rows of every run."""
    by_name = {row["model"]: row for row in runs}
    return {m.key: [(seed, by_name[name]) for seed, name in cfg.seed_runs(m.key)] for m in cfg.methods}


def table_rows(cfg, runs: Sequence[dict], columns: Sequence[str]) -> list[dict]:
    """The comparison table: the references' rows as they are, each method's runs as one row of
    means with `<column>_sd` beside each number and `seeds`, the runs it summarises. With one
    seed the rows are the runs themselves."""
    if cfg.seeds == 1:
        return list(runs)
    grouped = method_runs(cfg, runs)
    in_methods = {row["model"] for group in grouped.values() for _, row in group}
    references = [row for row in runs if row["model"] not in in_methods]
    return references + [aggregate(key, [row for _, row in group], columns) for key, group in grouped.items()]


def aggregate(model: str, runs: Sequence[dict], columns: Sequence[str]) -> dict:
    """One row for `runs` of one model: per numeric column the mean and the sample sd of the
    runs that have a value (None where none has; sd None from one value); `stop` the stop
    reasons, counted where they differ."""
    row: dict = {"model": model, "seeds": len(runs)}
    for column in columns:
        if column == "model":
            continue
        values = [run.get(column) for run in runs if run.get(column) is not None]
        if column == "stop":
            row[column] = stop_reasons(values)
            continue
        row[column] = float(np.mean(values)) if values else None
        row[f"{column}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return row


def stop_reasons(values: Sequence[str]) -> str | None:
    counts = {value: values.count(value) for value in dict.fromkeys(values)}
    if len(counts) <= 1:
        return next(iter(counts), None)
    return ", ".join(f"{value} ×{count}" for value, count in counts.items())


def spread_cell(column: str, row: dict) -> str:
    """`mean ± sd` in the column's own format (evaluate.format_cell); a value without a spread alone."""
    text = evaluate.format_cell(column, row.get(column))
    sd = row.get(f"{column}_sd")
    return text if sd is None or row.get(column) is None else f"{text} ± {evaluate.format_cell(column, sd)}"


def write_table(rows: Sequence[dict], columns: Sequence[str], report: Path) -> str:
    """comparison.csv and comparison.md, and the table's text for the terminal. Rows with a
    spread (table_rows) show `mean ± sd`, and the csv has a `<column>_sd` column beside each
    number and `seeds`; without one the tables are those of a single seed."""
    if not any("seeds" in row for row in rows):
        evaluate.write_csv(rows, report / "comparison.csv", columns)
        files.write_atomic(report / "comparison.md", evaluate.to_markdown(rows, columns) + "\n")
        return evaluate.to_text(rows, columns)
    numbers = [c for c in columns if c not in TEXT]
    evaluate.write_csv(rows, report / "comparison.csv",
                       [*columns, *(f"{c}_sd" for c in numbers), "seeds"])
    shown = [{c: spread_cell(c, row) for c in columns} for row in rows]
    files.write_atomic(report / "comparison.md", evaluate.to_markdown(shown, columns, formatted) + "\n")
    return evaluate.to_text(shown, columns, formatted)


def formatted(column: str, text: str) -> str:
    """The cell of a row spread_cell has formatted already."""
    return text


def write_seed_rows(cfg, runs: Sequence[dict], columns: Sequence[str], path: Path) -> None:
    """Every method's run per seed (comparison_seeds.csv): the values the table summarises."""
    rows = [{**row, "model": key, "seed": seed}
            for key, group in method_runs(cfg, runs).items() for seed, row in group]
    evaluate.write_csv(rows, path, [columns[0], "seed", *columns[1:]])


# ---- which differences exceed the spread ------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    """Method `higher` against `lower` on one metric (by their means over the seeds)."""
    metric: str
    higher: str
    lower: str
    p: float  # Welch's t-test, two-sided
    exceeds: bool  # p < ALPHA: the difference exceeds the spread of the seeds


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test. Both without spread: 0 when the means differ, 1 when
    they are equal (the t statistic is ±inf or 0/0 there)."""
    if np.std(a) == 0 and np.std(b) == 0:
        return 0.0 if np.mean(a) != np.mean(b) else 1.0
    return float(ttest_ind(a, b, equal_var=False).pvalue)


def differences(metric: str, values: dict[str, Sequence[float]], alpha: float = ALPHA) -> list[Difference]:
    """Every pair of methods (≥ 2 finite values each), ordered by mean, highest first."""
    usable = {k: [float(v) for v in vs] for k, vs in values.items()
              if len(vs) > 1 and all(v is not None and math.isfinite(v) for v in vs)}
    ranked = sorted(usable, key=lambda k: -np.mean(usable[k]))
    pairs = []
    for higher, lower in itertools.combinations(ranked, 2):
        p = welch_p(usable[higher], usable[lower])
        pairs.append(Difference(metric, higher, lower, p, p < alpha))
    return pairs


def statement(cfg, runs: Sequence[dict]) -> str:
    """The spread section of the report: per headline metric, the methods' mean ± sd, best
    first, and for every pair whether their difference exceeds the spread of the seeds."""
    grouped = method_runs(cfg, runs)
    lines = [f"Seeds: {cfg.seeds} runs per method (seeds {', '.join(map(str, cfg.method_seeds))}); "
             f"the original and the oracle are one model each. A difference exceeds the spread when "
             f"Welch's t-test over the seeds gives p < {ALPHA} (two-sided, not corrected for the "
             "number of pairs)."]
    for metric in HEADLINE[cfg.is_lm]:
        values = {key: [row.get(metric) for _, row in group] for key, group in grouped.items()}
        pairs = differences(metric, values)
        left_out = [k for k, vs in values.items() if not any(k in (d.higher, d.lower) for d in pairs)]
        if not pairs:
            lines.append(f"\n{metric}: not compared (it needs two methods with a finite value at every seed)")
            continue
        ranked = list(dict.fromkeys(k for d in pairs for k in (d.higher, d.lower)))
        means = ", ".join(f"{k} {spread_cell(metric, aggregate(k, [{metric: v} for v in values[k]], [metric]))}"
                          for k in ranked)
        lines.append(f"\n{metric} (mean ± sd, best first): {means}")
        for d in pairs:
            verdict = f"{d.higher} > {d.lower}" if d.exceeds else f"{d.higher} vs {d.lower}: within the spread"
            lines.append(f"  {verdict} (p {d.p:.3g})")
        if left_out:
            lines.append(f"  not compared (a run without a finite value): {', '.join(left_out)}")
    return "\n".join(lines)


def write_spread(cfg, runs: Sequence[dict], columns: Sequence[str], report: Path) -> str:
    """With seeds > 1: comparison_seeds.csv and spread.md (the statement, returned for the
    terminal); with one seed they are removed (an earlier run's would describe other runs)."""
    if cfg.seeds == 1:
        for name in SEED_FILES:
            (report / name).unlink(missing_ok=True)
        return ""
    write_seed_rows(cfg, runs, columns, report / "comparison_seeds.csv")
    text = statement(cfg, runs)
    files.write_atomic(report / "spread.md", text + "\n")
    return text
