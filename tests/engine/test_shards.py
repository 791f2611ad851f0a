"""A worker's slice of a set, read from the files as the steps need it (engine.shards): equal
disjoint slices, a new order every pass, windows of bounded size, and a resumed stream that equals
the uninterrupted one from its position on, reached from the row counts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hamu_ray.engine import shards

ROWS = 203  # not a multiple of the world, the batch or the window


def write_ids(root, files=3, row_group_size=17, rows=ROWS):
    """Row ids 0..rows-1 over `files` parquet files (a directory, as Spark writes a set) of
    small row groups."""
    root.mkdir(exist_ok=True)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for part, (low, high) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = list(range(low, high))
        pq.write_table(pa.table({"id": ids, "x": [[float(i)] for i in ids]}), root / f"part-{part}.parquet",
                       row_group_size=row_group_size)
    return str(root)


def ids_of(batch) -> list[int]:
    return [int(i) for i in batch["id"]]


class Spy:
    """A task's preparation that records the size of every window it is given."""

    def __init__(self):
        self.sizes = []

    def __call__(self, rows: pa.Table) -> pa.Table:
        self.sizes.append(rows.num_rows)
        return rows


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(shards, "WINDOW_ROWS", 40)  # several windows per slice, as on a large set
    monkeypatch.setattr(shards, "ROW_SHUFFLE_ROWS", 0)  # pieces permuted, not rows


def pass_ids(shard, seed, batch=5, skip=0) -> list[int]:
    return sum((ids_of(b) for b in shard.batches(batch, seed, skip)), [])


@pytest.mark.parametrize("seed", [None, 3])
def test_ranks_get_equal_disjoint_slices_that_cover_the_set(tmp_path, small_windows, seed):
    path = write_ids(tmp_path / "ids.parquet")
    world = 3
    slices = [shards.rank_shard("retain", path, ["id"], rank, world, seed, lambda rows: rows) for rank in range(world)]
    rows = [sum((ids_of(b) for b in s.batches(1, None)), []) for s in slices]
    assert [len(r) for r in rows] == [ROWS // world] * world == [s.rows for s in slices]
    assert len(set().union(*map(set, rows))) == world * (ROWS // world)  # disjoint
    if seed is None:  # contiguous file-order slices
        assert sum(rows, []) == list(range(world * (ROWS // world)))
    else:  # the pieces permuted: rank 0 does not start at row 0
        assert sum(rows, []) != list(range(world * (ROWS // world)))


def test_every_pass_reads_every_row_once_in_a_new_order_in_bounded_windows(tmp_path, small_windows):
    path = write_ids(tmp_path / "ids.parquet")
    spy = Spy()
    shard = shards.rank_shard("retain", path, ["id", "x"], 0, 1, 5, spy)
    first, second = pass_ids(shard, 11, batch=1), pass_ids(shard, 12, batch=1)
    assert sorted(first) == sorted(second) == list(range(ROWS))
    assert first != second and first != list(range(ROWS))
    assert pass_ids(shard, 11, batch=1) == first  # a seed, an order
    assert max(spy.sizes) == shards.WINDOW_ROWS and sum(spy.sizes) == 3 * ROWS  # prepared as read
    unshuffled = shards.rank_shard("retain", path, ["id"], 0, 1, None, lambda rows: rows)
    assert pass_ids(unshuffled, None, batch=1) == list(range(ROWS))  # file order


def test_batches_keep_the_batch_size_and_drop_only_the_last_partial_one(tmp_path, small_windows):
    shard = shards.rank_shard("retain", write_ids(tmp_path / "ids.parquet"), ["id"], 0, 1, None, lambda rows: rows)
    sizes = [len(b["id"]) for b in shard.batches(7, 4)]
    assert sizes == [7] * (ROWS // 7)  # batches span windows
    assert sum(len(b["id"]) for b in shard.batches(7, 4, drop_last=False)) == ROWS


@pytest.mark.parametrize("layout", [dict(files=1, row_group_size=1000), dict(files=3, row_group_size=17),
                                    dict(files=4, row_group_size=3)])
def test_a_pass_started_k_batches_in_equals_the_whole_pass_from_k(tmp_path, small_windows, layout):
    """What a resumed run reads: the same batches, whatever the layout of the files."""
    spy = Spy()
    shard = shards.rank_shard("retain", write_ids(tmp_path / "ids.parquet", **layout), ["id"], 1, 2, 9, spy)
    whole = [ids_of(b) for b in shard.batches(6, 21)]
    for k in (0, 1, 6, 7, 13, len(whole) - 1, len(whole)):
        spy.sizes.clear()
        assert [ids_of(b) for b in shard.batches(6, 21, skip_batches=k)] == whole[k:], k
        # reached from the row counts: what was read is at most the windows from k on
        assert sum(spy.sizes) <= shard.rows - (k * 6 // shards.WINDOW_ROWS) * shards.WINDOW_ROWS


def test_paired_batches_resumed_at_any_step_continue_the_uninterrupted_pairs(tmp_path, small_windows):
    retain = shards.rank_shard("retain", write_ids(tmp_path / "retain.parquet"), ["id"], 0, 2, 2, lambda rows: rows)
    forget = shards.rank_shard("retain", write_ids(tmp_path / "forget.parquet", rows=30, files=1), ["id"], 0, 2, 2, lambda rows: rows)

    def pairs(anchor, start=0):
        return [(ids_of(r), ids_of(f)) for r, f in shards.paired_batches(
            retain, forget, retain_batch_size=4, forget_batch_size=2, anchor=anchor, epochs=2,
            make_batch=lambda b: b, shuffle_seed=1, rank=0, start=start)]

    for anchor, anchor_rows, batch in (("retain", ROWS // 2, 4), ("forget", 15, 2)):
        whole = pairs(anchor)
        assert len(whole) == 2 * (anchor_rows // batch)
        for start in (1, 7, len(whole) // 2 + 1, len(whole)):
            assert pairs(anchor, start) == whole[start:], (anchor, start)
    cycled = [f for _, f in pairs("retain")]
    assert len(cycled) > 15 // 2 * 2  # the forget set cycles through several passes
    passes = [sum(cycled[i:i + 7], []) for i in (0, 7)]  # a pass: 7 batches of 2 of the 15 rows
    assert all(len(set(p)) == 14 for p in passes) and passes[0] != passes[1]
    assert set(passes[0]) | set(passes[1]) <= set(pass_ids(forget, None, batch=1))  # rank 0's rows


def test_a_json_lines_set_reads_like_its_parquet_twin(tmp_path, small_windows):
    write_ids(tmp_path / "ids.parquet", files=1, row_group_size=50)
    with open(tmp_path / "ids.jsonl", "w") as f:
        for i in range(ROWS):
            f.write(json.dumps({"id": i, "x": [float(i)]}) + "\n")
    parquet = shards.rank_shard("retain", str(tmp_path / "ids.parquet"), ["id"], 1, 2, None, lambda rows: rows)
    lines = shards.rank_shard("retain", str(tmp_path / "ids.jsonl"), ["id"], 1, 2, None, lambda rows: rows)
    in_order = list(range(ROWS // 2, 2 * (ROWS // 2)))
    assert pass_ids(lines, None, batch=1) == pass_ids(parquet, None, batch=1) == in_order
    whole = sum((ids_of(b) for b in lines.batches(5, 8, drop_last=False)), [])
    assert sorted(whole) == in_order and whole != in_order


def test_a_small_set_is_shuffled_row_by_row_before_the_ranks_cut_it(tmp_path):
    """A sorted file (ids in order) under a seed: each rank's slice is its share of the seeded
    permutation of all rows (by hand), so both ends of the file reach every rank."""
    path = write_ids(tmp_path / "ids.parquet")
    world, seed = 2, 4
    by_hand = np.random.default_rng(seed).permutation(ROWS)
    for rank in range(world):
        shard = shards.rank_shard("retain", path, ["id"], rank, world, seed, lambda rows: rows)
        mine = pass_ids(shard, None, batch=1)
        assert mine == by_hand[rank * (ROWS // world):(rank + 1) * (ROWS // world)].tolist()
        assert min(mine) < ROWS // 4 and max(mine) > 3 * ROWS // 4
        whole = [ids_of(b) for b in shard.batches(6, 17)]
        assert [ids_of(b) for b in shard.batches(6, 17, skip_batches=5)] == whole[5:]
