"""A worker's rows of a set, read from the set's files as the steps need them.

Every rank cuts the same list of pieces (a parquet file's row groups, from its footer; a JSON-lines
file whole) into world_size equal contiguous slices of rows and reads only its own, a window of
WINDOW_ROWS rows at a time: memory holds one window per set, whatever the set's size, and nothing
goes through the object store. The order is a function of the files, the seed and the position
only (never of which read finished first), so a resumed run starts at the same row it stopped at
by skipping pieces from their row counts, without reading what came before.

With a shuffle seed a set is permuted once before it is cut (row by row up to ROW_SHUFFLE_ROWS
rows, piece by piece beyond), and every pass ("epoch") of a rank over its slice permutes the
slice's pieces and each window's rows anew.
The forget set is the sensitive data: nothing here logs rows.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from hamu_ray.engine.data import Piece, file_format, read_piece, set_pieces

# Rows read, prepared (the causal LM's tokenisation) and shuffled together per epoch: a full
# permutation of a slice up to this size, a windowed one beyond.
WINDOW_ROWS = 8192
# A set of at most this many rows is shuffled row by row before it is cut into the ranks' slices
# (every rank reads it whole once, keeps its rows): files are often sorted (by entity, by
# source), and a rank's slice should not be one end of them. Larger sets: piece by piece.
ROW_SHUFFLE_ROWS = 65_536


def rank_pieces(pieces: list[Piece], rank: int, world: int, seed: int | None) -> list[Piece]:
    """Rank r's slice: rows [r·n, (r+1)·n) of the pieces (permuted by `seed` unless None), with
    n = total // world: every rank has as many rows, the last total % world rows are left out."""
    if seed is not None:
        pieces = [pieces[i] for i in np.random.default_rng(seed).permutation(len(pieces))]
    per_rank = sum(p.rows for p in pieces) // world
    low, high, offset, mine = rank * per_rank, (rank + 1) * per_rank, 0, []
    for p in pieces:
        start, stop = max(low, offset), min(high, offset + p.rows)
        if start < stop:
            mine.append(replace(p, start=p.start + start - offset, stop=p.start + stop - offset))
        offset += p.rows
    return mine


def skip_rows(pieces: list[Piece], rows: int) -> list[Piece]:
    """The pieces left after the first `rows` rows (whole pieces dropped from their counts)."""
    for i, p in enumerate(pieces):
        if rows < p.rows:
            return [replace(p, start=p.start + rows), *pieces[i + 1:]]
        rows -= p.rows
    return []


class Shard:
    """One rank's slice of one set (`name`: its role, for errors): raw rows read lazily, prepared
    by `prepare` (a pyarrow table in, one out: the task's preparation and checks) window by
    window. A slice of one window, or one taken row by row (`taken`: its rows' positions in
    the pieces), is read and prepared once and kept."""

    def __init__(self, name: str, path: str, columns: list[str], pieces: list[Piece],
                 prepare: Callable[[pa.Table], pa.Table], taken: np.ndarray | None = None):
        self.name, self.path, self.columns, self.pieces, self.prepare = name, path, columns, pieces, prepare
        self.taken = taken
        self.rows = sum(p.rows for p in pieces) if taken is None else len(taken)
        self._whole: pa.Table | None = None

    def windows(self, seed: int | None, skip: int = 0) -> Iterator[pa.Table]:
        """One pass: prepared windows, in the pass's order (None: file order, unshuffled),
        starting `skip` rows in."""
        if self.rows <= WINDOW_ROWS or self.taken is not None:
            if self._whole is None:
                rows = pa.Table.from_batches(list(self._stream(self.pieces)))
                self._whole = self.prepare(rows if self.taken is None else rows.take(self.taken))
            yield _permuted(self._whole, seed, 0).slice(skip)
            return
        pieces = self.pieces
        if seed is not None:
            pieces = [pieces[i] for i in np.random.default_rng(seed).permutation(len(pieces))]
        first = skip // WINDOW_ROWS  # whole windows skipped: read from the next window's start
        raw = rechunked(self._stream(skip_rows(pieces, first * WINDOW_ROWS)), WINDOW_ROWS)
        for index, rows in enumerate(raw, start=first):
            window = _permuted(self.prepare(rows), seed, index)
            yield window.slice(skip - first * WINDOW_ROWS) if index == first else window

    def batches(self, batch_size: int, seed: int | None, skip_batches: int = 0,
                drop_last: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """One pass in batches of `batch_size` rows (numpy columns), after `skip_batches`."""
        pending: list[pa.Table] = []
        held = 0
        for window in self.windows(seed, skip_batches * batch_size):
            pending.append(window)
            held += window.num_rows
            while held >= batch_size:
                table = pa.concat_tables(pending)
                yield numpy_columns(table.slice(0, batch_size))
                pending, held = [table.slice(batch_size)], held - batch_size
        if held and not drop_last:
            yield numpy_columns(pa.concat_tables(pending))

    def _stream(self, pieces: list[Piece]) -> Iterator[pa.RecordBatch]:
        for piece in pieces:
            yield from read_piece(self.name, self.path, piece, self.columns, WINDOW_ROWS)


def rechunked(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """The batches' rows as tables of `rows` rows each (the last: what is left)."""
    pending, held = [], 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        while held >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def _permuted(table: pa.Table, seed: int | None, index: int) -> pa.Table:
    if seed is None:
        return table
    return table.take(np.random.default_rng([seed, index]).permutation(table.num_rows))


def numpy_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """A batch as the tasks' make_batch takes it: one numpy array per column (list cells: an
    object array of arrays)."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def whole_set(name: str, path: str, columns: list[str], prepare: Callable[[pa.Table], pa.Table]) -> Shard:
    """A small set given whole to every rank, in file order (a monitor sample, the pre-flight's rows)."""
    return Shard(name, path, columns, set_pieces(path, file_format(name, path)), prepare)


def rank_shard(name: str, path: str, columns: list[str], rank: int, world: int, seed: int | None,
               prepare: Callable[[pa.Table], pa.Table]) -> Shard:
    """Rank r's slice of a set: with a seed and at most ROW_SHUFFLE_ROWS rows, the r-th of
    world equal slices of the seeded permutation of its rows; otherwise rank_pieces's."""
    pieces = set_pieces(path, file_format(name, path))
    total = sum(p.rows for p in pieces)
    if seed is not None and total <= ROW_SHUFFLE_ROWS:
        per_rank = total // world
        order = np.random.default_rng(seed).permutation(total)
        return Shard(name, path, columns, pieces, prepare, taken=order[rank * per_rank:(rank + 1) * per_rank])
    return Shard(name, path, columns, rank_pieces(pieces, rank, world, seed), prepare)


def epoch_seed(shuffle_seed: int | None, role: str, epoch: int, rank: int) -> int | None:
    """The shuffle seed of one worker's pass over one set: a new order every epoch."""
    if shuffle_seed is None:
        return None
    key = f"{shuffle_seed}/{role}/{epoch}/{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def paired_batches(retain: Shard, forget: Shard | None, *, retain_batch_size: int, forget_batch_size: int,
                   anchor: str, epochs: int, make_batch: Callable[[dict], dict],
                   shuffle_seed: int | None = None, rank: int = 0, start: int = 0) -> Iterator[tuple[dict, dict]]:
    """(retain_batch, forget_batch) pairs from pair `start` on: the anchor set's epochs define
    the run, the other set cycles. `make_batch` (the task's) turns numpy columns into tensors.
    Without a forget shard (plain training) the pairs are (retain_batch, None). Pair k is a
    function of (seed, k, rank) only: a run resumed at pair k sees what an uninterrupted run saw,
    and reaches it from the row counts, without reading the pairs before it."""
    def passes(shard: Shard, role: str, batch_size: int, first: int) -> Iterator[dict]:
        per_pass = shard.rows // batch_size
        epoch, skip = divmod(first, per_pass)
        for e in itertools.count(epoch):
            seed = epoch_seed(shuffle_seed, role, e, rank)
            yield from (make_batch(b) for b in shard.batches(batch_size, seed, skip if e == epoch else 0))

    anchor_shard = retain if anchor == "retain" or forget is None else forget
    anchor_role = "retain" if anchor_shard is retain else "forget"
    sizes = {"retain": retain_batch_size, "forget": forget_batch_size}
    total = epochs * (anchor_shard.rows // sizes[anchor_role])
    anchored = itertools.islice(passes(anchor_shard, anchor_role, sizes[anchor_role], start), max(0, total - start))
    if forget is None:
        yield from ((batch, None) for batch in anchored)
        return
    cycled_role = "forget" if anchor_role == "retain" else "retain"
    cycle = passes(forget if cycled_role == "forget" else retain, cycled_role, sizes[cycled_role], start)
    for batch in anchored:
        other = next(cycle)
        yield (batch, other) if anchor_role == "retain" else (other, batch)
