"""Does a pipeline reproduce? Run it twice into fresh directories and compare the tables.

    python scripts/reproduce.py pipelines/digits.yaml [KEY=VALUE ...]

Prints every cell that differs between the two runs' report/comparison.csv (wall-clock columns
aside) and exits 1 if any does: same config, same machine, same seeds must give the same table,
bit for bit. The runs go to fresh temporary directories, removed afterwards.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

TIMES = {"wall_s", "wall_s_sd"}  # how long a stage took is not a result


def run_into(pipeline: str, overrides: list[str], out: Path) -> list[dict]:
    subprocess.run([sys.executable, "-m", "hamu_ray.cli", "run", pipeline, *overrides, f"output_dir={out}"],
                   check=True)
    with open(out / "report" / "comparison.csv", newline="") as f:
        return list(csv.DictReader(f))


def differences(first: list[dict], second: list[dict]) -> list[str]:
    if [r["model"] for r in first] != [r["model"] for r in second]:
        return [f"rows differ: {[r['model'] for r in first]} vs {[r['model'] for r in second]}"]
    return [f"{a['model']}.{column}: {a[column]} vs {b.get(column)}"
            for a, b in zip(first, second) for column in a
            if column not in TIMES and a[column] != b.get(column)]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    pipeline, overrides = argv[0], argv[1:]
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        first, second = (run_into(pipeline, overrides, Path(tmp) / name) for name in ("first", "second"))
    found = differences(first, second)
    print("\n".join(found) or f"{pipeline}: the two runs' tables are identical "
          f"({len(first)} rows, every column but {sorted(TIMES)})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
