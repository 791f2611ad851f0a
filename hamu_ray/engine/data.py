"""Forget / retain / eval sets: opened on the driver from their metadata before any worker
starts (format, columns, rows, a fingerprint); read, hashed and checked for shared rows by the
workers (engine.shards reads their rows, `share_check` here is what each rank checks).

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
# A set's content digest is built from blocks of its files this long, hashed in parallel by the
# job's workers (each rank its share) and combined in order.
DIGEST_BLOCK_BYTES = 64 << 20
DIGEST_RULE = ("sha256 over the sha256 of every 64 MiB block of the set's files (sorted by name, "
               "blocks in file order), first 16 hex digits")


class DataError(UserError, ValueError):
    """A set cannot be used; the message names the set and the file."""


@dataclass(frozen=True)
class SetInfo:
    name: str
    path: str
    format: str
    num_rows: int
    # sizes and parquet footers (a JSON-lines set: its bytes): tells an edited set from the one
    # a run started with, without reading its rows; the content digest (DIGEST_RULE) is the workers'
    fingerprint: str


def file_format(name: str, path: str) -> str:
    suffix = "." + path.rstrip("/").rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in FORMATS:
        raise DataError(f"{name} set {path}: unknown format; use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def inspect_set(name: str, path: str, columns: list[str]) -> SetInfo:
    """Open the set from its metadata: format, schema, row count and fingerprint (a parquet
    file's from its footer; a JSON-lines file is parsed whole). Pages are decoded, their checksums
    verified and the content hashed by whoever reads the rows: the workers (`share_check`, their
    shards), or `content_digest` / `check_disjoint` on one process."""
    fmt = file_format(name, path)
    fs, fs_path = None, path
    try:
        fs, fs_path = filesystem(path)
        dataset = pads.dataset(fs_path, format=fmt, filesystem=fs)
        schema, num_rows = dataset.schema, dataset.count_rows()
        fingerprint = _fingerprint(fs, fmt, sorted(dataset.files))
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
    return SetInfo(name, path, fmt, num_rows, fingerprint)


def open_dataset(path: str, fmt: str) -> tuple[pafs.FileSystem, pads.Dataset]:
    """A set's files (a local path or any pyarrow URI) as one pyarrow dataset."""
    fs, fs_path = filesystem(path)
    return fs, pads.dataset(fs_path, format=fmt, filesystem=fs)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path within it."""
    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one parquet row group (row_group None: of a JSON-lines file)."""
    file: str
    row_group: int | None
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def set_pieces(path: str, fmt: str) -> list[Piece]:
    """The set's pieces in file order, from the parquet footers (a JSON-lines file is counted by
    reading it: such sets are meant to be small; stream large ones as parquet)."""
    import pyarrow.parquet as pq

    fs, dataset = open_dataset(path, fmt)
    pieces = []
    for f in sorted(dataset.files):
        if fmt == "parquet":
            with fs.open_input_file(f) as handle:
                meta = pq.ParquetFile(handle).metadata
            pieces += [Piece(f, g, 0, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        else:
            pieces.append(Piece(f, None, 0, pads.dataset(f, format="json", filesystem=fs).count_rows()))
    return [p for p in pieces if p.rows]


def read_piece(name: str, path: str, piece: Piece, columns: list[str],
               batch_size: int = 8192) -> Iterator[pa.RecordBatch]:
    """A piece's rows in batches: a parquet row group decoded up to the piece's end (rows before
    its start are decoded and dropped), its pages' checksums verified where the file has them
    (every set this tool writes does; without them a flipped byte cannot be seen), or a
    JSON-lines file's rows sliced. A damaged page or file is a DataError naming both."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(path)
    try:
        if piece.row_group is None:
            table = pads.dataset(piece.file, format="json", filesystem=fs).to_table(columns=columns)
            yield from table.slice(piece.start, piece.rows).to_batches()
            return
        seen = 0
        with fs.open_input_file(piece.file) as handle:
            reader = pq.ParquetFile(handle, page_checksum_verification=True)
            for batch in reader.iter_batches(batch_size=batch_size, row_groups=[piece.row_group], columns=columns):
                low, high = max(piece.start - seen, 0), min(piece.stop - seen, batch.num_rows)
                if low < high:
                    yield batch.slice(low, high - low)
                seen += batch.num_rows
                if seen >= piece.stop:
                    return
    except (OSError, pa.ArrowException) as exc:  # a page's checksum, a truncated file
        raise DataError(f"{name} set {path}: damaged ({piece.file}): {exc}") from exc


def numbered_pieces(path: str, fmt: str) -> list[tuple[int, Piece]]:
    """(its first row's number in file order, piece) for every piece of the set."""
    numbered, first = [], 0
    for piece in set_pieces(path, fmt):
        numbered.append((first, piece))
        first += piece.rows
    return numbered


def row_keys(name: str, path: str, columns: list[str], pieces: list[tuple[int, Piece]]) -> Iterator[tuple[int, bytes]]:
    """(row number, key) for the rows of `pieces` (numbered_pieces'), a 16-byte key equal for
    rows with equal values in `columns`: lists of numbers (a classifier's inputs) compared as
    float32, as the model reads them; any other value as its Python value."""
    for first, piece in pieces:
        row = first
        for batch in read_piece(name, path, piece, columns):
            cells = [_cell_bytes(batch.column(c)) for c in columns]
            for values in zip(*cells):
                key = hashlib.blake2b(digest_size=16)
                for cell in values:
                    key.update(len(cell).to_bytes(8, "little") + cell)
                yield row, key.digest()
                row += 1


def forget_keys(forget: SetInfo, columns: list[str]) -> dict[bytes, list[int]]:
    """Every forget row's key → its row numbers (the forget set is the small one: held whole)."""
    keys: dict[bytes, list[int]] = {}
    for row, key in row_keys(forget.name, forget.path, columns, numbered_pieces(forget.path, forget.format)):
        keys.setdefault(key, []).append(row)
    return keys


def shared_rows(forgotten: dict[bytes, list[int]], retain: SetInfo, columns: list[str],
                pieces: list[tuple[int, Piece]]) -> dict[int, int]:
    """forget row → the first retain row among `pieces` equal to it (the retain rows streamed)."""
    shared: dict[int, int] = {}
    for row, key in row_keys(retain.name, retain.path, columns, pieces):
        for forget_row in forgotten.get(key, ()):
            shared.setdefault(forget_row, row)
    return shared


def disjoint_error(forget: SetInfo, retain: SetInfo, columns: list[str], shared: dict[int, int]) -> DataError | None:
    """A forget row that is also a retain row (the same values in the columns the task trains
    on) would be learnt and unlearnt at once: refused, named by its row numbers (from 0, in file
    order) and never by its content."""
    if not shared:
        return None
    pairs = sorted(shared.items())
    named = ", ".join(f"forget row {f} = retain row {r}" for f, r in pairs[:3])
    more = f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""
    return DataError(f"forget set {forget.path}: {len(pairs)} row(s) also in the retain set {retain.path} "
                     f"(the same {' and '.join(columns)}): {named}{more}; remove them from one")


def check_disjoint(forget: SetInfo, retain: SetInfo, columns: list[str]) -> None:
    """The disjointness check in one process, over every retain row (a pipeline's, on sets it
    reads whole anyway); a job's workers share it out (`share_check`)."""
    shared = shared_rows(forget_keys(forget, columns), retain, columns, numbered_pieces(retain.path, retain.format))
    if error := disjoint_error(forget, retain, columns, shared):
        raise error


@dataclass(frozen=True)
class Block:
    """Bytes [offset, offset + length) of one of a set's files: a unit of the content digest."""
    file: str
    offset: int
    length: int


def digest_blocks(path: str, fmt: str) -> list[Block]:
    """The set's files cut into DIGEST_BLOCK_BYTES blocks, in order (from the files' sizes)."""
    fs, dataset = open_dataset(path, fmt)
    blocks = []
    for f in sorted(dataset.files):
        size = fs.get_file_info(f).size
        blocks += [Block(f, offset, min(DIGEST_BLOCK_BYTES, size - offset))
                   for offset in range(0, size, DIGEST_BLOCK_BYTES)]
    return blocks


def block_sha256(path: str, block: Block) -> str:
    fs, _ = filesystem(path)
    h = hashlib.sha256()
    with fs.open_input_file(block.file) as handle:
        handle.seek(block.offset)
        left = block.length
        while left:
            chunk = handle.read(min(left, 1 << 20))
            if not chunk:
                raise DataError(f"set {path}: {block.file} is shorter than when it was opened")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def combined_digest(block_digests: list[str]) -> str:
    """DIGEST_RULE: the blocks' sha256 (hex), in order, hashed together."""
    return hashlib.sha256("".join(block_digests).encode()).hexdigest()[:16]


def content_digest(info: SetInfo) -> str:
    """The set's content digest in one process (what the workers compute, each their share)."""
    return combined_digest([block_sha256(info.path, b) for b in digest_blocks(info.path, info.format)])


def share_check(sets: dict[str, SetInfo], columns: list[str], rank: int, world: int) -> dict:
    """Rank `rank`'s share of checking a job's sets where they are read: every world-th block of
    each set hashed, and (given forget and retain) every world-th retain piece's rows looked up
    among all forget rows' keys. A DataError (a damaged file) is returned, not raised, so that
    every rank reaches the gather; `merged_checks` takes every rank's share."""
    try:
        hashed = {name: {i: block_sha256(info.path, block)
                         for i, block in enumerate(digest_blocks(info.path, info.format)) if i % world == rank}
                  for name, info in sets.items()}
        shared = {}
        if "forget" in sets and "retain" in sets:
            retain = sets["retain"]
            pieces = numbered_pieces(retain.path, retain.format)[rank::world]
            shared = shared_rows(forget_keys(sets["forget"], columns), retain, columns, pieces)
        return {"hashed": hashed, "shared": shared, "error": None}
    except DataError as exc:
        return {"hashed": {}, "shared": {}, "error": str(exc)}


def merged_checks(sets: dict[str, SetInfo], columns: list[str], shares: list[dict]) -> dict[str, str]:
    """Every rank's share_check → each set's content digest, or the first rank's error (the
    same on every rank, so every rank raises it)."""
    for share in shares:
        if share["error"]:
            raise DataError(share["error"])
    shared: dict[int, int] = {}
    for share in shares:
        for forget_row, retain_row in share["shared"].items():
            shared[forget_row] = min(retain_row, shared.get(forget_row, retain_row))
    if shared and (error := disjoint_error(sets["forget"], sets["retain"], columns, shared)):
        raise error
    digests = {}
    for name in sets:
        blocks = {int(i): h for share in shares for i, h in share["hashed"][name].items()}
        digests[name] = combined_digest([blocks[i] for i in range(len(blocks))])
    return digests


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


def _fingerprint(fs: pafs.FileSystem, fmt: str, files: list[str]) -> str:
    """Each file's size and parquet footer (schema, row groups, column chunks' offsets, sizes and
    statistics); a JSON-lines file's bytes (it has no footer, and is read whole to count it)."""
    h = hashlib.sha256()
    for f in files:
        with fs.open_input_file(f) as handle:
            size = handle.size()
            h.update(f"{size}\n".encode())
            if fmt == "parquet":
                footer = int.from_bytes(handle.read_at(4, size - 8), "little")
                h.update(handle.read_at(footer, size - 8 - footer))
            else:
                while chunk := handle.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()[:16]


def to_device(batch: dict | None, device: torch.device) -> dict | None:
    """A batch on the engine's device (the worker builds batches on the CPU)."""
    if batch is None:
        return None
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
