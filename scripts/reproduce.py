"""Does a pipeline reproduce? Run it twice into fresh directories and compare the tables.

    python scripts/reproduce.py [--pin-kernels] pipelines/digits.yaml [KEY=VALUE ...]

Prints every cell that differs between the two runs' report/comparison.csv (wall-clock columns
aside) and exits 1 if any does: same config, same machine, same seeds must give the same table,
bit for bit. The runs go to fresh temporary directories, removed afterwards. --pin-kernels runs
both with the portable kernel pins (hamu_ray.kernels.PORTABLE_KERNELS):
the table a machine with AVX2 gives under them is the one to compare across machines.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hamu_ray.kernels import PORTABLE_KERNELS

TIMES = {"wall_s", "wall_s_sd"}  # how long a stage took is not a result


def run_into(pipeline: str, overrides: list[str], out: Path, env: dict[str, str]) -> list[dict]:
    subprocess.run([sys.executable, "-m", "hamu_ray.cli", "run", pipeline, *overrides, f"output_dir={out}"],
                   check=True, env=env)
    with open(out / "report" / "comparison.csv", newline="") as f:
        return list(csv.DictReader(f))


def differences(first: list[dict], second: list[dict]) -> list[str]:
    if [r["model"] for r in first] != [r["model"] for r in second]:
        return [f"rows differ: {[r['model'] for r in first]} vs {[r['model'] for r in second]}"]
    return [f"{a['model']}.{column}: {a[column]} vs {b.get(column)}"
            for a, b in zip(first, second) for column in a
            if column not in TIMES and a[column] != b.get(column)]


def main(argv: list[str]) -> int:
    pin = "--pin-kernels" in argv
    argv = [a for a in argv if a != "--pin-kernels"]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    pipeline, overrides = argv[0], argv[1:]
    env = {**os.environ, **(PORTABLE_KERNELS if pin else {})}
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        first, second = (run_into(pipeline, overrides, Path(tmp) / name, env) for name in ("first", "second"))
    found = differences(first, second)
    kernels = " under " + " ".join(f"{k}={v}" for k, v in PORTABLE_KERNELS.items()) if pin else ""
    print("\n".join(found) or f"{pipeline}: the two runs' tables are identical{kernels} "
          f"({len(first)} rows, every column but {sorted(TIMES)})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
