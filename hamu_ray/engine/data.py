"""Forget / retain / eval sets: checked on the driver, read and sharded by Ray Data, paired per step.

The forget set is the sensitive data: nothing here logs its rows, only counts and digests.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch

from hamu_ray.errors import UserError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json"}


class DataError(UserError, ValueError):
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
    fs, fs_path = None, path
    try:
        fs, fs_path = filesystem(path)
        dataset = pads.dataset(fs_path, format=fmt, filesystem=fs)
        schema, num_rows = dataset.schema, dataset.count_rows()
        digest = _digest(fs, sorted(dataset.files))
    except FileNotFoundError:
        raise DataError(f"{name} set {path}: no such file") from None
    except (OSError, pa.ArrowException, ValueError) as exc:
        bad_line = _first_bad_json_line(fs, fs_path) if fmt == "json" and fs is not None else None
        raise DataError(f"{name} set {path}: {bad_line or f'cannot read it: {exc}'}") from exc
    if fmt == "parquet":
        _check_pages(name, path, fs, sorted(dataset.files))
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{name} set {path}: missing column(s) {', '.join(missing)}; "
                        f"it has {', '.join(schema.names)}")
    if num_rows == 0:
        raise DataError(f"{name} set {path} is empty")
    return SetInfo(name, path, fmt, num_rows, digest)


def open_dataset(path: str, fmt: str) -> tuple[pafs.FileSystem, pads.Dataset]:
    """A set's files (a local path or any pyarrow URI) as one pyarrow dataset."""
    fs, fs_path = filesystem(path)
    return fs, pads.dataset(fs_path, format=fmt, filesystem=fs)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path within it."""
    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def check_disjoint(forget: SetInfo, retain: SetInfo, columns: list[str]) -> None:
    """A forget row that is also a retain row (the same values in the columns the task trains
    on) would be learnt and unlearnt at once: refused, named by its row numbers (from 0, in file
    order) and never by its content. The one check of `hamu-ray unlearn` and of a pipeline."""
    retained: dict[bytes, int] = {}
    for row, key in enumerate(row_keys(retain, columns)):
        retained.setdefault(key, row)
    shared = [(row, retained[key]) for row, key in enumerate(row_keys(forget, columns)) if key in retained]
    if shared:
        named = ", ".join(f"forget row {f} = retain row {r}" for f, r in shared[:3])
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        raise DataError(f"forget set {forget.path}: {len(shared)} row(s) also in the retain set {retain.path} "
                        f"(the same {' and '.join(columns)}): {named}{more}; remove them from one")


def row_keys(info: SetInfo, columns: list[str]) -> Iterator[bytes]:
    """A 16-byte key per row in file order, equal for rows with equal values in `columns`:
    lists of numbers (a classifier's inputs) compared as float32, as the model reads them;
    any other value as its Python value."""
    _, dataset = open_dataset(info.path, info.format)
    for batch in dataset.to_batches(columns=columns, batch_size=8192):
        cells = [_cell_bytes(batch.column(c)) for c in columns]
        for row in zip(*cells):
            key = hashlib.blake2b(digest_size=16)
            for cell in row:
                key.update(len(cell).to_bytes(8, "little") + cell)
            yield key.digest()


def _cell_bytes(column: pa.Array) -> list[bytes]:
    kind = column.type
    if ((pa.types.is_list(kind) or pa.types.is_large_list(kind))
            and (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type))):
        values = column.flatten().cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False)
        offsets = column.offsets.to_numpy()
        offsets = offsets - offsets[0]  # a sliced column's offsets start where its values do
        return [values[start:end].tobytes() for start, end in zip(offsets[:-1], offsets[1:])]
    return [repr(value).encode() for value in column.to_pylist()]


def _first_bad_json_line(fs: pafs.FileSystem, path: str) -> str | None:
    """Where a JSON-lines set first breaks, by 1-based line (pyarrow counts rows from 0 within
    a block and skips blank lines), in the parser's words: never a row's content. None: no line
    is at fault that this scan sees."""
    try:
        info = fs.get_file_info(path)
        files = ([f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if f.type == pafs.FileType.File] if info.type == pafs.FileType.Directory else [path])
        kinds: dict[str, tuple[str, int]] = {}  # column → its JSON kind and the line it was first seen
        for f in sorted(files):
            with fs.open_input_stream(f) as stream:
                for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), start=1):
                    if problem := _json_line_problem(line, number, kinds):
                        return f"{'line' if f == path else f'{f}, line'} {number}: {problem}"
    except (OSError, UnicodeDecodeError, pa.ArrowException):
        return None
    return None


JSON_KINDS = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}


def _json_line_problem(line: str, number: int, kinds: dict[str, tuple[str, int]]) -> str | None:
    """What is wrong with one line: not JSON, not an object, or a column whose kind changes
    (pyarrow's reader needs one kind per column; null goes with any)."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return f"not a JSON object (a {JSON_KINDS.get(type(row), 'null')})"
    for column, value in row.items():
        kind = JSON_KINDS.get(type(value))
        first = kinds.setdefault(column, (kind, number)) if kind else None
        if first and first[0] != kind:
            return f"{column} is a {kind}, but a {first[0]} on line {first[1]}"
    return None


def _check_pages(name: str, path: str, fs: pafs.FileSystem, files: list[str]) -> None:
    """Decode every page once on the driver, verifying the pages' CRC checksums where the file
    has them (every set this tool writes does): a damaged file is one error naming it here, not a
    failure inside every worker. Without checksums a flipped byte inside a page cannot be seen."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            with fs.open_input_file(f) as handle:
                for _ in pq.ParquetFile(handle, page_checksum_verification=True).iter_batches(batch_size=65536):
                    pass
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{name} set {path}: damaged ({f}): {exc}") from exc


def _digest(fs: pafs.FileSystem, files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        with fs.open_input_stream(f) as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


# Before the seeded shuffle the rows are cut, in file order, into one block per this many rows
# (1 to 64 blocks): the shuffled order then depends on the seed and the rows only, not on how
# many blocks the reader made.
ROWS_PER_SHUFFLE_BLOCK, MAX_SHUFFLE_BLOCKS = 20_000, 64
# Rows each worker shuffles locally per epoch (on top of the one global shuffle): a full
# permutation of shards up to this size, a windowed one beyond.
EPOCH_SHUFFLE_ROWS = 8192


def read_set(info: SetInfo, shuffle_seed: int | None, read_blocks: int | None = None):
    """A Ray Dataset of the set: in file order, or shuffled once by a seed (deterministically:
    the same seed gives the same order on any cluster). `read_blocks` fixes the reader's block
    count (tests); the result does not depend on it."""
    import ray.data

    reader = ray.data.read_parquet if info.format == "parquet" else ray.data.read_json
    ds = reader(info.path, override_num_blocks=read_blocks)
    # Blocks in order through every later step (the shuffle's input, a task's preparation such
    # as tokenisation and its materialisation), not in the order their tasks finish: datasets
    # derived from this one share its context.
    ds.context.execution_options.preserve_order = True
    if shuffle_seed is None:
        return ds
    blocks = min(MAX_SHUFFLE_BLOCKS, max(1, info.num_rows // ROWS_PER_SHUFFLE_BLOCK))
    return ds.repartition(blocks).random_shuffle(seed=shuffle_seed)


def worker_shards(datasets: dict, world_size: int) -> list[dict]:
    """Rank r's share of every set: the r-th of world_size equal contiguous slices of the
    set's (ordered) rows (a monitor sample: all of it). Ray Train's default streaming split
    hands out blocks as they finish, so a restarted worker group could see other rows; this
    split is the same on every run."""
    from ray.data import ExecutionOptions

    from hamu_ray.engine import monitor

    shards = [{} for _ in range(world_size)]
    for name, ds in datasets.items():
        if monitor.is_sample(name) or name.startswith("rows_"):  # small, read whole by every rank
            for shard in shards:
                shard[name] = ds.iterator()
            continue
        ds = ds.copy(ds)
        ds.context.execution_options = ExecutionOptions(preserve_order=True)
        for rank, part in enumerate(ds.split(world_size, equal=True)):
            shards[rank][name] = part.iterator()
    return shards


def ordered_data_config():
    """The Ray Train DataConfig that shards with `worker_shards`."""
    from ray.train import DataConfig

    class OrderedSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            return worker_shards(datasets, world_size)
    return OrderedSplit()


def epoch_seed(shuffle_seed: int | None, role: str, epoch: int, rank: int) -> int | None:
    """The local shuffle seed of one worker's pass over one set: a new order every epoch."""
    if shuffle_seed is None:
        return None
    key = f"{shuffle_seed}/{role}/{epoch}/{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def paired_batches(retain_shard, forget_shard, *, retain_batch_size: int, forget_batch_size: int,
                   anchor: str, epochs: int, make_batch: Callable[[dict], dict],
                   shuffle_seed: int | None = None, rank: int = 0) -> Iterator[tuple[dict, dict]]:
    """(retain_batch, forget_batch) pairs: the anchor set's epochs define the run, the other cycles.

    Shards are Ray Data iterators (`ray.train.get_dataset_shard`); `make_batch` (the task's)
    turns a numpy batch of rows into a dict of tensors.
    Without a forget shard (plain training) the pairs are (retain_batch, None). With a
    shuffle_seed every pass over a shard has its own order, a function of (seed, set, pass, rank)
    only: a resumed run that skips k pairs sees exactly what an uninterrupted run saw.
    """
    def passes(shard, role: str, batch_size: int, count) -> Iterator[dict]:
        for epoch in count:
            yield from _batches(shard, batch_size, make_batch, epoch_seed(shuffle_seed, role, epoch, rank))

    if forget_shard is None:
        yield from ((batch, None) for batch in passes(retain_shard, "retain", retain_batch_size, range(epochs)))
        return
    sizes = {"retain": retain_batch_size, "forget": forget_batch_size}
    shards = {"retain": retain_shard, "forget": forget_shard}
    cycled_role = "forget" if anchor == "retain" else "retain"
    cycle = passes(shards[cycled_role], cycled_role, sizes[cycled_role], itertools.count())
    for batch in passes(shards[anchor], anchor, sizes[anchor], range(epochs)):
        other = next(cycle)
        yield (batch, other) if anchor == "retain" else (other, batch)


def _batches(shard, batch_size: int, make_batch: Callable[[dict], dict], seed: int | None) -> Iterator[dict]:
    shuffle = {} if seed is None else {"local_shuffle_buffer_size": max(EPOCH_SHUFFLE_ROWS, batch_size),
                                       "local_shuffle_seed": seed}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True, **shuffle):
        yield make_batch(batch)


def column_sums(ds, columns: list[str]) -> dict[str, int]:
    """Sums of integer columns of a materialised Dataset: one small task per block, where the
    block is (Ray Data's `sum` starts hash-aggregation actors: seconds, even for a few rows)."""
    import ray

    count = ray.remote(num_cpus=0)(_block_sums)
    totals = ray.get([count.remote(block, columns) for block in ds.to_arrow_refs()])
    return {c: sum(t[c] for t in totals) for c in columns}


def _block_sums(block, columns: list[str]) -> dict[str, int]:
    import pyarrow.compute as pc

    return {c: int(pc.sum(block.column(c)).as_py() or 0) for c in columns}


def to_device(batch: dict | None, device: torch.device) -> dict | None:
    """A batch on the engine's device (the worker builds batches on the CPU)."""
    if batch is None:
        return None
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
