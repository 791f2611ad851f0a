"""Forget / retain / eval sets: checked on the driver, read and sharded by Ray Data, paired per step.

The forget set is the sensitive data: nothing here logs its rows, only counts and digests.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json"}


class DataError(ValueError):
    """A set cannot be used; the message names the set and the file."""


@dataclass(frozen=True)
class SetInfo:
    name: str
    path: str
    format: str
    num_rows: int
    digest: str  # sha256 over the files' bytes: identifies the set without revealing it


def file_format(name: str, path: str) -> str:
    suffix = "." + path.rstrip("/").rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in FORMATS:
        raise DataError(f"{name} set {path}: unknown format; use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def inspect_set(name: str, path: str, columns: list[str]) -> SetInfo:
    """Open the set without reading its rows into memory: format, schema, row count, digest."""
    fmt = file_format(name, path)
    try:
        fs, fs_path = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        dataset = pads.dataset(fs_path, format=fmt, filesystem=fs)
        schema, num_rows = dataset.schema, dataset.count_rows()
        digest = _digest(fs, sorted(dataset.files))
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise DataError(f"{name} set {path}: cannot read it: {exc}") from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{name} set {path}: missing column(s) {', '.join(missing)}; "
                        f"it has {', '.join(schema.names)}")
    if num_rows == 0:
        raise DataError(f"{name} set {path} is empty")
    return SetInfo(name, path, fmt, num_rows, digest)


def _digest(fs: pafs.FileSystem, files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        with fs.open_input_stream(f) as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_set(info: SetInfo, shuffle_seed: int | None):
    """A Ray Dataset of the set, shuffled with a seed (or in file order)."""
    import ray.data

    reader = ray.data.read_parquet if info.format == "parquet" else ray.data.read_json
    ds = reader(info.path)
    return ds.random_shuffle(seed=shuffle_seed) if shuffle_seed is not None else ds


def paired_batches(retain_shard, forget_shard, *, retain_batch_size: int, forget_batch_size: int,
                   anchor: str, epochs: int, columns: tuple[str, str]) -> Iterator[tuple[dict, dict]]:
    """(retain_batch, forget_batch) pairs: the anchor set's epochs define the run, the other cycles.

    Shards are Ray Data iterators (`ray.train.get_dataset_shard`); batches are dicts of tensors.
    Without a forget shard (plain training) the pairs are (retain_batch, None).
    """
    if forget_shard is None:
        for _ in range(epochs):
            for batch in _batches(retain_shard, retain_batch_size, columns):
                yield batch, None
        return
    anchored, cycled = (retain_shard, forget_shard) if anchor == "retain" else (forget_shard, retain_shard)
    sizes = (retain_batch_size, forget_batch_size) if anchor == "retain" else (forget_batch_size, retain_batch_size)
    cycle = _cycle(cycled, sizes[1], columns)
    for _ in range(epochs):
        for batch in _batches(anchored, sizes[0], columns):
            other = next(cycle)
            yield (batch, other) if anchor == "retain" else (other, batch)


def _cycle(shard, batch_size: int, columns) -> Iterator[dict]:
    for _ in itertools.count():
        yield from _batches(shard, batch_size, columns)


def _batches(shard, batch_size: int, columns: tuple[str, str]) -> Iterator[dict]:
    x_col, y_col = columns
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
        yield {"x": torch.as_tensor(_stack(batch[x_col]), dtype=torch.float32),
               "y": torch.as_tensor(np.asarray(batch[y_col]), dtype=torch.long)}


def _stack(column: np.ndarray) -> np.ndarray:
    return np.stack(column) if column.dtype == object else column
