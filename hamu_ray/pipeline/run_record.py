"""Where a pipeline's numbers came from, and the README block made from a run's outputs.

`report/run.json` is written beside the table when a pipeline finishes: the date, the code's
commit, the machine and the seeds. `hamu-ray report RUN_DIR` prints the table with that line
above it, so a results table in the README is pasted from a run, never typed by hand.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from hamu_ray import files
from hamu_ray.errors import MissingInputError, UserError

RECORD = "run.json"
CODE_DIR = Path(__file__).resolve().parents[2]  # the checkout hamu_ray runs from, if it is one


def write_run_record(name: str, seeds: int, report: Path) -> dict:
    record = {"pipeline": name, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": code_commit(), "machine": machine(), "seeds": seeds}
    files.write_atomic(report / RECORD, json.dumps(record, indent=1) + "\n")
    return record


def code_commit() -> str | None:
    """`git describe --always --dirty` of the checkout the code runs from; None when it is not
    one (an installed package)."""
    try:
        done = subprocess.run(["git", "-C", str(CODE_DIR), "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine() -> dict:
    """The driver's machine: CPU model, logical cores, memory, the CPU kernels torch runs (and
    the pins that chose them, hamu_ray.kernels.KERNEL_ENV); GPUs when torch sees any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    from hamu_ray.kernels import kernel_env

    record = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1),
              "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "kernel_pins": kernel_env()}

    if torch.cuda.is_available():
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return record


def readme_block(run_dir: Path, columns: list[str] | None = None) -> str:
    """The run's comparison table (with its notes and, with seeds, the spread) under one line
    that says when, where and from which commit it was measured; with `columns`, only those
    columns of the table, in that order (from comparison.csv: with seeds, mean ± sd)."""
    report = Path(run_dir) / "report"
    table, record_file = report / "comparison.md", report / RECORD
    for needed in (report / "comparison.csv" if columns else table, record_file):
        if not needed.is_file():
            raise MissingInputError(f"{needed}: not found; `hamu-ray report` reads the output_dir "
                                    "of a finished `hamu-ray run` (one that wrote report/run.json)")
    record = json.loads(record_file.read_text())
    where = record["machine"]
    device = ", ".join(where.get("gpus", [])) or f"{where['cpu']}, {where['cores']} cores, {where['memory_gib']} GiB"
    if "cpu_kernels" in where:  # (a record written before kernels were recorded has none)
        pins = " ".join(f"{k}={v}" for k, v in where["kernel_pins"].items())
        device += f", {where['cpu_kernels']} kernels" + (f" (pinned: {pins})" if pins else "")
    line = (f"Pipeline `{record['pipeline']}`, {record['seeds']} seed(s), finished {record['finished']} "
            f"at commit {record['commit'] or 'unknown (not a git checkout)'} on {device}. "
            f"Made by `hamu-ray report {run_dir}{' --columns ' + ','.join(columns) if columns else ''}`.")
    # (the path as given: the README's is relative)
    if columns:
        return line + "\n\n" + column_table(report / "comparison.csv", columns) + "\n"
    parts = [line, table.read_text().strip()]
    spread = report / "spread.md"
    if spread.is_file() and record["seeds"] > 1:
        parts.append(spread.read_text().strip())
    return "\n\n".join(parts) + "\n"


def column_table(csv_path: Path, columns: list[str]) -> str:
    """The Markdown table of `columns` of a comparison.csv, each cell as the full table shows it
    (seeds.spread_cell: mean ± sd where the csv has the `<column>_sd`)."""
    from hamu_ray.pipeline import evaluate, seeds

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    known = [c for c in (rows[0] if rows else {}) if not c.endswith("_sd") and c != "seeds"]
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise UserError(f"--columns: {', '.join(unknown)} not in {csv_path}; it has {', '.join(known)}")
    parsed = [{k: value(k, v) for k, v in row.items()} for row in rows]
    shown = [{c: seeds.spread_cell(c, row) for c in columns} for row in parsed]
    return evaluate.to_markdown(shown, columns, seeds.formatted)


def value(column: str, text: str) -> float | str | None:
    """A comparison.csv cell as the table had it: None when empty, the text of a text column, else a number."""
    if text == "":
        return None
    from hamu_ray.pipeline.evaluate import TEXT_COLUMNS

    return text if column in TEXT_COLUMNS else float(text)
