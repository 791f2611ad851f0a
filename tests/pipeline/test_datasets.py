"""The prepare stage's datasets: real sources read offline, forget requests built, sets round-tripped."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hamu_ray.pipeline.datasets import (FASHION_MNIST_DIR, SOURCES, DatasetError, Split, class_forget_indices,
                               load_source, random_forget_indices, read_idx, read_split, subsample,
                               write_sets)

LABELS = np.repeat(np.arange(10), 50)  # 10 classes x 50, shuffled below so indices mean something
LABELS = LABELS[np.random.default_rng(123).permutation(len(LABELS))]


def write_idx(path: Path, magic: int, data: np.ndarray) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in data.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + data.astype(np.uint8).tobytes())
    return path


def tiny_fashion_mnist(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (6, 28, 28)),
              "train-labels-idx1-ubyte.gz": np.array([0, 1, 2, 0, 1, 2]),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": np.array([2, 1, 0])}
    for name, data in arrays.items():
        write_idx(root / name, 0x0803 if data.ndim == 3 else 0x0801, data)
    return arrays


def check_partition(forget: np.ndarray, retain: np.ndarray, n: int) -> None:
    for idx in (forget, retain):
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, no repeats
    assert np.intersect1d(forget, retain).size == 0
    np.testing.assert_array_equal(np.union1d(forget, retain), np.arange(n))


# ---- forget requests -------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [0.0, 0.3, 0.5, 1.0])
def test_class_forget_hardness_construction(rho):
    c, n = 3, 50
    forget, retain = class_forget_indices(LABELS, c, rho, seed=7)
    check_partition(forget, retain, len(LABELS))
    kept = round((1 - rho) * n)
    assert len(forget) == n
    assert (LABELS[forget] == c).sum() == kept
    assert (LABELS[forget] != c).sum() == n - kept
    assert (LABELS[retain] == c).sum() == n - kept  # the class examples left out still teach retain


def test_class_forget_rho_zero_is_the_whole_class():
    forget, _ = class_forget_indices(LABELS, 3, 0.0, seed=7)
    np.testing.assert_array_equal(forget, np.flatnonzero(LABELS == 3))


def test_class_forget_is_seeded():
    first = class_forget_indices(LABELS, 3, 0.5, seed=1)
    np.testing.assert_array_equal(first[0], class_forget_indices(LABELS, 3, 0.5, seed=1)[0])
    assert not np.array_equal(first[0], class_forget_indices(LABELS, 3, 0.5, seed=2)[0])


@pytest.mark.parametrize("forget_class, rho, field", [
    (3, -0.1, "forget.rho"), (3, 1.5, "forget.rho"), (3, float("nan"), "forget.rho"),
    (10, 0.5, "forget.class"), (-1, 0.0, "forget.class"),
])
def test_class_forget_rejects_bad_requests(forget_class, rho, field):
    with pytest.raises(DatasetError, match=field):
        class_forget_indices(LABELS, forget_class, rho, seed=0)


def test_class_forget_needs_enough_other_examples():
    y = np.array([0] * 10 + [1] * 3)
    with pytest.raises(DatasetError, match=r"forget.rho.*needs 10 .*only 3"):
        class_forget_indices(y, 0, 1.0, seed=0)
    with pytest.raises(DatasetError, match="forget.class 0 is the only class"):
        class_forget_indices(np.zeros(5, np.int64), 0, 0.0, seed=0)


def test_random_forget_counts_disjoint_and_seeded():
    forget, retain = random_forget_indices(500, 0.1, seed=4)
    check_partition(forget, retain, 500)
    assert len(forget) == 50
    np.testing.assert_array_equal(forget, random_forget_indices(500, 0.1, seed=4)[0])
    assert not np.array_equal(forget, random_forget_indices(500, 0.1, seed=5)[0])


@pytest.mark.parametrize("n, fraction", [(100, 0.0), (100, 1.0), (100, -0.2), (100, 0.001), (100, 0.999),
                                         (1, 0.5)])
def test_random_forget_rejects_bad_fraction(n, fraction):
    with pytest.raises(DatasetError, match="forget.fraction"):
        random_forget_indices(n, fraction, seed=0)


# ---- sources ---------------------------------------------------------------------------------

def test_digits_shapes_scale_and_stratification():
    train, test = load_source("digits", seed=0)
    assert len(train) + len(test) == 1797 and len(test) == 360
    for split in (train, test):
        assert split.x.dtype == np.float32 and split.x.shape[1] == 64 and split.y.dtype == np.int64
        assert split.x.min() >= 0 and split.x.max() == 1
        np.testing.assert_array_equal(np.unique(split.y), np.arange(10))
    per_class = np.bincount(train.y) + np.bincount(test.y)
    assert np.all(np.abs(np.bincount(test.y) - 0.2 * per_class) <= 1)  # stratified: 20% of each class
    again, _ = load_source("digits", seed=0)
    np.testing.assert_array_equal(train.x, again.x)
    np.testing.assert_array_equal(train.y, again.y)
    assert not np.array_equal(train.y, load_source("digits", seed=1)[0].y)


def test_unknown_source_lists_the_sources():
    with pytest.raises(DatasetError, match=", ".join(SOURCES)):
        load_source("cifar-10")


def test_read_idx_images_and_labels(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "i.gz", 0x0803, images)), images)
    labels = np.array([9, 0, 4])
    out = read_idx(write_idx(tmp_path / "l.gz", 0x0801, labels))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)


def test_read_idx_names_the_file_on_bad_magic_or_size(tmp_path):
    bad = write_idx(tmp_path / "bad-magic.gz", 0x0802, np.zeros((2, 2)))
    with pytest.raises(DatasetError, match=r"bad-magic.gz: bad magic 0x00000802"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write((0x0801).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(DatasetError, match=r"short.gz: shape \(5,\) needs 5 data bytes, found 2"):
        read_idx(short)
    (tmp_path / "plain.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetError, match="plain.gz"):
        read_idx(tmp_path / "plain.gz")


def test_fashion_mnist_from_hand_built_files(tmp_path):
    arrays = tiny_fashion_mnist(tmp_path)
    train, test = load_source("fashion-mnist", root=str(tmp_path))
    assert train.x.shape == (6, 784) and test.x.shape == (3, 784)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    pixels = arrays["train-images-idx3-ubyte.gz"].reshape(6, 784)
    np.testing.assert_allclose(train.x, pixels / 255, rtol=1e-6)
    np.testing.assert_array_equal(test.y, [2, 1, 0])


def test_fashion_mnist_label_count_mismatch_names_both_files(tmp_path):
    tiny_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x0801, np.array([1, 2]))
    with pytest.raises(DatasetError, match=r"t10k-images.*3 images.*t10k-labels.*2 labels"):
        load_source("fashion-mnist", root=str(tmp_path))


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(DatasetError, match=r"apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist", root=str(tmp_path / "nowhere"))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason=f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_package():
    train, test = load_source("fashion-mnist")
    assert train.x.shape == (60000, 784) and test.x.shape == (10000, 784)
    assert train.x.dtype == np.float32 and 0 <= train.x.min() and train.x.max() <= 1
    np.testing.assert_array_equal(np.bincount(train.y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.y), [1000] * 10)


# ---- subsample -------------------------------------------------------------------------------

def test_subsample_keeps_proportions_order_and_seed():
    y = np.repeat(np.arange(4), [400, 300, 200, 100])
    y = y[np.random.default_rng(0).permutation(len(y))]
    split = Split(np.arange(len(y), dtype=np.float32)[:, None], y)  # x holds the row's original index
    sub = subsample(split, 333, seed=3)
    assert len(sub) == 333
    assert np.all(np.diff(sub.x[:, 0]) > 0)  # original order kept
    np.testing.assert_array_equal(sub.y, y[sub.x[:, 0].astype(int)])
    expected = 333 * np.bincount(y) / len(y)
    assert np.all(np.abs(np.bincount(sub.y, minlength=4) - expected) <= 1)
    np.testing.assert_array_equal(sub.x, subsample(split, 333, seed=3).x)
    assert not np.array_equal(sub.x, subsample(split, 333, seed=4).x)


def test_subsample_without_a_limit_is_unchanged():
    split = Split(np.zeros((5, 2), np.float32), np.arange(5))
    assert subsample(split, None, seed=0) is split and subsample(split, 5, seed=0) is split
    with pytest.raises(DatasetError, match="max_train_rows"):
        subsample(split, 0, seed=0)


# ---- parquet sets ----------------------------------------------------------------------------

def test_write_sets_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    train = Split(rng.random((40, 7), dtype=np.float32), np.repeat(np.arange(4), 10).astype(np.int64))
    test = Split(rng.random((9, 7), dtype=np.float32), rng.integers(0, 4, 9))
    forget, retain = class_forget_indices(train.y, 1, 0.5, seed=0)
    paths = write_sets(tmp_path, train, test, forget, retain)
    assert set(paths) == {"forget", "retain", "train", "test"}
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}.parquet" for name in paths)  # no temp files left
    expected = {"forget": (train.x[forget], train.y[forget]), "retain": (train.x[retain], train.y[retain]),
                "train": (train.x, train.y), "test": (test.x, test.y)}
    for name, (x, y) in expected.items():
        assert paths[name] == str(tmp_path / f"{name}.parquet")
        split = read_split(paths[name])
        assert split.x.dtype == np.float32 and split.y.dtype == np.int64
        np.testing.assert_array_equal(split.x, x)
        np.testing.assert_array_equal(split.y, y)
    schema = pq.read_schema(paths["forget"])
    assert schema.field("x").type == pa.list_(pa.float32()) and schema.field("y").type == pa.int64()


def test_write_sets_rejects_bad_indices_and_leaves_no_files(tmp_path):
    train = Split(np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError, match="overlap"):
        write_sets(tmp_path, train, train, np.array([0, 1]), np.array([1, 2, 3]))
    with pytest.raises(DatasetError, match="out of range"):
        write_sets(tmp_path, train, train, np.array([0, 4]), np.array([1, 2]))
    with pytest.raises(DatasetError, match="does not exist"):
        write_sets(tmp_path / "missing", train, train, np.array([0]), np.array([1]))
    assert os.listdir(tmp_path) == []


def test_read_split_accepts_float64_lists_and_names_a_bad_file(tmp_path):
    pq.write_table(pa.table({"x": [[0.5, 1.0], [0.0, 0.25]], "y": [1, 0]}), tmp_path / "f64.parquet")
    split = read_split(tmp_path / "f64.parquet")
    np.testing.assert_array_equal(split.x, np.array([[0.5, 1.0], [0.0, 0.25]], np.float32))
    pq.write_table(pa.table({"x": [[0.5], [0.0, 0.25]], "y": [1, 0]}), tmp_path / "ragged.parquet")
    with pytest.raises(DatasetError, match="ragged.parquet: rows of x differ"):
        read_split(tmp_path / "ragged.parquet")
    with pytest.raises(DatasetError, match="absent.parquet"):
        read_split(tmp_path / "absent.parquet")


def test_a_failed_write_leaves_no_temp_file(tmp_path):
    (tmp_path / "retain.parquet").mkdir()  # the rename onto it fails after the temp file is written
    train = Split(np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]))
    with pytest.raises(OSError):
        write_sets(tmp_path, train, train, np.array([0]), np.array([1, 2, 3]))
    assert sorted(os.listdir(tmp_path)) == ["forget.parquet", "retain.parquet"]
    assert (tmp_path / "retain.parquet").is_dir()


def test_sets_are_owner_only_and_leave_no_temp_files(tmp_path):
    train = Split(np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]))
    paths = write_sets(tmp_path, train, train, np.array([0]), np.array([1, 2, 3]))
    for path in paths.values():  # the sets hold the sensitive forget rows
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}.parquet" for name in paths)
