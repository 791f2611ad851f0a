"""The user's own sets and models (`data.source: files`, `model.path` / `model.weights`): opened
and checked before Ray starts, the same way for a language model and a classifier. Rows are
named by number in every message, never by content (forget rows are sensitive)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hamu_ray import files
from hamu_ray.engine import data


def set_columns(cfg) -> list[str]:
    d = cfg.data
    return [d.text.question_column, d.text.answer_column] if cfg.is_lm else [d.input_column, d.label_column]


def user_sets(cfg) -> dict[str, data.SetInfo]:
    """Every file of the data section, opened (format, columns, rows, fingerprint)."""
    d = cfg.data
    names = ("forget", "retain", "holdout") if cfg.is_lm else ("forget", "retain", "test")
    return {name: data.inspect_set(name, getattr(d, name), set_columns(cfg))
            for name in names if getattr(d, name) is not None}


def content_digests(cfg) -> dict[str, str]:
    """Part of the prepared sets' cache key: an edited file at the same path must not reuse them."""
    return {name: data.content_digest(info) for name, info in user_sets(cfg).items()}


def read_table(info: data.SetInfo) -> pa.Table:
    import pyarrow.dataset as pads

    return pads.dataset(info.path, format=info.format).to_table()


def check_disjoint(cfg, sets: dict[str, data.SetInfo]) -> None:
    """No forget row in the retain set (the engine's check, on the user's files, before Ray)."""
    data.check_disjoint(sets["forget"], sets["retain"], set_columns(cfg))


# ---- a classifier's files ------------------------------------------------------------------------

def write_classifier_sets(cfg, directory: Path) -> dict[str, str]:
    """forget / retain / test as the pipeline's x (list<float32>) and y (int64) parquet files,
    from the user's columns; forget rows found in retain are refused."""
    d, paths, sets = cfg.data, {}, user_sets(cfg)
    check_disjoint(cfg, sets)
    for name, info in sets.items():
        paths[name] = str(directory / f"{name}.parquet")
        with files.atomic_path(paths[name], mode=0o600) as tmp:
            pq.write_table(classifier_table(read_table(info), info, d.input_column, d.label_column), tmp)
    return paths


def classifier_table(table: pa.Table, info: data.SetInfo, input_column: str, label_column: str) -> pa.Table:
    x, y = table.column(input_column), table.column(label_column)
    where = f"{info.name} set {info.path}"
    if not (pa.types.is_list(x.type) or pa.types.is_large_list(x.type)) or not pa.types.is_integer(y.type):
        raise data.DataError(f"{where}: column {input_column} must hold a list of numbers per row and "
                             f"{label_column} an integer class; they are {x.type} and {y.type}")
    if pc.min(y).as_py() < 0:
        raise data.DataError(f"{where}: column {label_column} has negative classes")
    return pa.table({"x": x.cast(pa.list_(pa.float32())), "y": y.cast(pa.int64())})


# ---- given models ----------------------------------------------------------------------------

@dataclass(frozen=True)
class GivenModel:
    """A model the pipeline did not train (a Hugging Face directory, or a classifier's weights
    file): evaluated like a stage's export."""
    name: str
    path: Path
    cached: bool = True
    summary: dict = field(default_factory=lambda: {"steps": None, "stop": "given", "wall_s": None})

    @property
    def model_dir(self) -> Path:
        return self.path

    @property
    def weights(self) -> Path:
        return self.path

    def export(self, cfg) -> Path:
        return self.path

    def step_log(self) -> list[dict]:
        return []


def given_models(cfg) -> dict[str, GivenModel]:
    """The user's original (and oracle, when given) as stages that were not run here."""
    original = cfg.model.path if cfg.is_lm else cfg.model.weights
    models = {"original": original, "oracle": cfg.model.oracle}
    return {role: GivenModel(role, Path(path)) for role, path in models.items() if path is not None}


def check_classifier_weights(cfg) -> None:
    """The given weights fit the configured shape (before Ray starts)."""
    from hamu_ray.errors import ModelFileError
    from hamu_ray.tasks.classifier import check_weights

    for setting in ("weights", "oracle"):
        path = getattr(cfg.model, setting)
        if path is None:
            continue
        try:
            check_weights(cfg.model, path, f"model.{setting}")
        except ModelFileError as exc:  # not this model's weights
            raise data.DataError(f"model.{setting} {path}: not weights of this model "
                                 f"({cfg.model.kind}, sizes {getattr(cfg.model, 'sizes', None)}): {exc}") from exc
