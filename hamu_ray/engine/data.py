"""Forget / retain / eval sets, checked on the driver before any worker starts (engine.shards
reads them in the workers).

The forget set is the sensitive data: nothing here logs its rows, only counts and digests.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Iterator

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
    """Open the set without reading its rows into memory: format, schema, row count (a parquet
    file's from its footer), digest (its bytes, streamed). Pages are decoded, and their checksums
    verified, by whoever reads rows: `row_keys` here, the workers' shards."""
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
    forgotten: dict[bytes, list[int]] = {}  # the forget set's keys (the small set) in memory
    for row, key in enumerate(row_keys(forget, columns)):
        forgotten.setdefault(key, []).append(row)
    shared: dict[int, int] = {}  # forget row → the first retain row equal to it
    for row, key in enumerate(row_keys(retain, columns)):  # streamed
        for forget_row in forgotten.get(key, ()):
            shared.setdefault(forget_row, row)
    shared = sorted(shared.items())
    if shared:
        named = ", ".join(f"forget row {f} = retain row {r}" for f, r in shared[:3])
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        raise DataError(f"forget set {forget.path}: {len(shared)} row(s) also in the retain set {retain.path} "
                        f"(the same {' and '.join(columns)}): {named}{more}; remove them from one")


def row_keys(info: SetInfo, columns: list[str]) -> Iterator[bytes]:
    """A 16-byte key per row in file order, equal for rows with equal values in `columns`:
    lists of numbers (a classifier's inputs) compared as float32, as the model reads them;
    any other value as its Python value. A damaged parquet page is a DataError naming the file."""
    for batch in verified_batches(info, columns):
        cells = [_cell_bytes(batch.column(c)) for c in columns]
        for row in zip(*cells):
            key = hashlib.blake2b(digest_size=16)
            for cell in row:
                key.update(len(cell).to_bytes(8, "little") + cell)
            yield key.digest()


def verified_batches(info: SetInfo, columns: list[str], batch_size: int = 8192) -> Iterator[pa.RecordBatch]:
    """The set's rows in file order, in batches; parquet pages' checksums verified where the file
    has them (every set this tool writes does; without them a flipped byte cannot be seen)."""
    import pyarrow.parquet as pq

    fs, dataset = open_dataset(info.path, info.format)
    if info.format != "parquet":
        yield from dataset.to_batches(columns=columns, batch_size=batch_size)
        return
    for f in sorted(dataset.files):
        try:
            with fs.open_input_file(f) as handle:
                reader = pq.ParquetFile(handle, page_checksum_verification=True)
                for group in range(reader.num_row_groups):  # one at a time: pyarrow buffers what it is asked
                    yield from reader.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{info.name} set {info.path}: damaged ({f}): {exc}") from exc


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


def _digest(fs: pafs.FileSystem, files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        with fs.open_input_stream(f) as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def to_device(batch: dict | None, device: torch.device) -> dict | None:
    """A batch on the engine's device (the worker builds batches on the CPU)."""
    if batch is None:
        return None
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
