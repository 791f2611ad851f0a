"""A job's evaluation phase on disk: the per-example scores its workers computed (numbers only,
never a row's text), one file beside the export, `<set>/<score>` arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCORES_FILE = "evaluation.npz"


def set_label(name: str) -> str:
    return f"evaluation {name}"  # "evaluation forget set x.parquet: ..." in data's errors


def read_sets(section) -> dict[str, list[dict]]:
    """Every evaluation set's rows (engine.config.EvaluationSection: small, whole on each worker)."""
    from hamu_ray.engine import data

    return {name: data.open_dataset(path, data.file_format(set_label(name), path))[1].to_table().to_pylist()
            for name, path in section.sets.items()}


def write_scores(path: Path, scores: dict[str, dict[str, np.ndarray]]) -> None:
    np.savez(path, **{f"{name}/{score}": values for name, per_set in scores.items()
                      for score, values in per_set.items()})


def read_scores(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """set → score → per-example values, as written (numbers and booleans only: no pickles)."""
    scores: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as stored:
        for key in stored.files:
            name, score = key.split("/", 1)
            scores.setdefault(name, {})[score] = stored[key]
    return scores
