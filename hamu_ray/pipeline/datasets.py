"""Real offline datasets turned into the pipeline's parquet sets: forget, retain, train and test.

The forget set is the sensitive data: nothing here logs or prints its rows, only counts.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hamu_ray import files

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
SOURCES = ("fashion-mnist", "digits")

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_MAGIC = {0x0801: 1, 0x0803: 3}  # unsigned-byte labels (1 dim) and images (3 dims)
DIGITS_TEST_SIZE = 0.2
SET_NAMES = ("forget", "retain", "train", "test")


class DatasetError(ValueError):
    """A dataset cannot be read or split as asked; the message names the source, file or field."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 [n, d], pixels scaled to [0, 1], images flattened
    y: np.ndarray  # int64 [n]

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DatasetError(f"split: x {self.x.shape} and y {self.y.shape} must be [n, d] and [n]")

    def __len__(self) -> int:
        return len(self.y)

    def take(self, indices: np.ndarray) -> Split:
        return Split(self.x[indices], self.y[indices])


# ---- sources ---------------------------------------------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """A gzip'd IDX file (the MNIST format) as a uint8 array of its declared shape."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # missing, unreadable, or not gzip
        raise DatasetError(f"IDX file {path}: cannot read it: {exc}") from exc
    if len(raw) < 4:
        raise DatasetError(f"IDX file {path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in IDX_MAGIC:
        raise DatasetError(f"IDX file {path}: bad magic 0x{magic:08x}; expected "
                           + " or ".join(f"0x{m:08x}" for m in IDX_MAGIC))
    ndim = IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"IDX file {path}: header truncated ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DatasetError(f"IDX file {path}: shape {shape} needs {expected} data bytes, "
                           f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_source(name: str, *, root: str | None = None, seed: int = 0) -> tuple[Split, Split]:
    """The (train, test) splits of a named offline source."""
    if name == "fashion-mnist":
        return _load_fashion_mnist(Path(root or FASHION_MNIST_DIR))
    if name == "digits":
        return _load_digits(seed)
    raise DatasetError(f"data.source {name!r}: unknown; use one of {', '.join(SOURCES)}")


def _load_fashion_mnist(root: Path) -> tuple[Split, Split]:
    missing = [f for names in FASHION_MNIST_FILES.values() for f in names if not (root / f).is_file()]
    if missing:
        raise DatasetError(
            f"fashion-mnist: {root} lacks {', '.join(missing)}; install the Debian package "
            f"{FASHION_MNIST_PACKAGE} (`apt-get install {FASHION_MNIST_PACKAGE}`) or set data.root")
    images, labels = FASHION_MNIST_FILES["train"]
    train = _idx_split(root / images, root / labels)
    images, labels = FASHION_MNIST_FILES["test"]
    return train, _idx_split(root / images, root / labels)


def _idx_split(images_path: Path, labels_path: Path) -> Split:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"fashion-mnist: {images_path} must hold images and {labels_path} labels")
    if len(images) != len(labels):
        raise DatasetError(f"fashion-mnist: {images_path} has {len(images)} images "
                           f"but {labels_path} has {len(labels)} labels")
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
    return Split(x, labels.astype(np.int64))


def _load_digits(seed: int) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)
    x = pixels.astype(np.float32) / np.float32(16)  # digits pixels are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, labels.astype(np.int64), test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=seed)
    return Split(x_train, y_train), Split(x_test, y_test)


def subsample(split: Split, n: int | None, seed: int) -> Split:
    """A seeded stratified subset of n rows, kept in their original order (n None or >= len: all)."""
    if n is None or n >= len(split):
        return split
    if n < 1:
        raise DatasetError(f"data.max_train_rows must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(split.y, return_counts=True)
    chosen = [rng.choice(np.flatnonzero(split.y == c), quota, replace=False)
              for c, quota in zip(classes, _proportional_quotas(counts, n))]
    return split.take(np.sort(np.concatenate(chosen)))


def _proportional_quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Split n across classes in proportion to counts (largest remainder: each within 1 of exact)."""
    exact = counts * (n / counts.sum())
    quotas = np.floor(exact).astype(np.int64)
    # Stable sort: ties go to the lower class, so the result is deterministic.
    extra = np.argsort(-(exact - quotas), kind="stable")[: n - quotas.sum()]
    quotas[extra] += 1
    return quotas


# ---- forget requests -------------------------------------------------------------------------

def class_forget_indices(y: np.ndarray, forget_class: int, rho: float,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HAMU's hardness construction: (forget_idx, retain_idx), sorted int64 indices into y.

    With n examples of the class, the forget set is round((1 - rho) n) of them plus the rest of n
    drawn from other classes. The class examples left out stay in retain: retain still teaches the
    class, and that similarity is what makes the request hard. rho = 0 forgets the whole class.
    """
    y = np.asarray(y)
    if not 0.0 <= rho <= 1.0:  # also rejects NaN
        raise DatasetError(f"forget.rho must be in [0, 1], got {rho}")
    in_class = np.flatnonzero(y == forget_class)
    others = np.flatnonzero(y != forget_class)
    n = len(in_class)
    if n == 0:
        raise DatasetError(f"forget.class {forget_class} has no examples; "
                           f"the classes are {np.unique(y).tolist()}")
    if len(others) == 0:
        raise DatasetError(f"forget.class {forget_class} is the only class: the retain set would be empty")
    kept = round((1.0 - rho) * n)
    if n - kept > len(others):
        raise DatasetError(f"forget.rho {rho}: needs {n - kept} examples of other classes "
                           f"than forget.class {forget_class}, only {len(others)} exist")
    rng = np.random.default_rng(seed)
    forget = np.concatenate([rng.choice(in_class, kept, replace=False),
                             rng.choice(others, n - kept, replace=False)])
    return _complement(forget, len(y))


def random_forget_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(forget_idx, retain_idx): round(fraction n) random rows of n, sorted int64 indices."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"forget.fraction must be in (0, 1), got {fraction}")
    k = round(fraction * n)
    if not 1 <= k <= n - 1:
        raise DatasetError(f"forget.fraction {fraction} of {n} rows forgets {k}: "
                           "at least 1 row must be forgotten and 1 retained")
    forget = np.random.default_rng(seed).choice(n, k, replace=False)
    return _complement(forget, n)


def _complement(forget: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(n, dtype=bool)
    mask[forget] = True
    return np.flatnonzero(mask).astype(np.int64), np.flatnonzero(~mask).astype(np.int64)


# ---- parquet sets ----------------------------------------------------------------------------

def write_sets(directory: str | os.PathLike, train: Split, test: Split,
               forget_idx: np.ndarray, retain_idx: np.ndarray) -> dict[str, str]:
    """forget / retain / train (= forget ∪ retain) / test parquet files in an existing directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"output directory {directory} does not exist")
    forget_idx, retain_idx = _check_indices(forget_idx, retain_idx, len(train))
    splits = {"forget": train.take(forget_idx), "retain": train.take(retain_idx),
              "train": train.take(np.union1d(forget_idx, retain_idx)), "test": test}
    paths = {}
    for name in SET_NAMES:
        paths[name] = str(directory / f"{name}.parquet")
        _write_atomically(_to_table(splits[name]), paths[name])
    return paths


def _check_indices(forget_idx, retain_idx, n: int) -> tuple[np.ndarray, np.ndarray]:
    forget_idx, retain_idx = np.asarray(forget_idx, np.int64), np.asarray(retain_idx, np.int64)
    for name, idx in (("forget", forget_idx), ("retain", retain_idx)):
        if idx.ndim != 1 or len(idx) == 0:
            raise DatasetError(f"{name} indices must be a non-empty 1-D array")
        if idx.min() < 0 or idx.max() >= n:
            raise DatasetError(f"{name} indices out of range for a training split of {n} rows")
    if np.intersect1d(forget_idx, retain_idx).size:
        raise DatasetError("forget and retain indices overlap")
    return forget_idx, retain_idx


def _to_table(split: Split) -> pa.Table:
    return pa.table({"x": _list_column(split.x), "y": pa.array(split.y, pa.int64())})


def _list_column(x: np.ndarray) -> pa.ChunkedArray:
    """Rows of x as list<float32>, built from the flat buffer; chunked so int32 offsets never overflow."""
    n, d = x.shape
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    rows_per_chunk = max(1, (2**31 - 1) // max(d, 1))
    chunks = []
    for start in range(0, n, rows_per_chunk):
        rows = min(rows_per_chunk, n - start)
        offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * d)
        values = pa.array(flat[start * d: (start + rows) * d])
        chunks.append(pa.ListArray.from_arrays(offsets, values))
    return pa.chunked_array(chunks, type=pa.list_(pa.float32()))


def _write_atomically(table: pa.Table, path: str) -> None:
    """Write beside the target then rename: a crash never leaves a half-written set.
    Owner-only: the sets hold the sensitive forget rows."""
    with files.atomic_path(path, mode=0o600) as tmp:
        pq.write_table(table, tmp)


def read_split(path: str | os.PathLike, x: str = "x", y: str = "y") -> Split:
    """A parquet set written by write_sets (or any list<float> input column `x` and integer label
    column `y`) as a Split."""
    try:
        table = pq.read_table(path, columns=[x, y])
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"set {path}: cannot read it: {exc}") from exc
    x_col, y_col = table.column(x).combine_chunks(), table.column(y)
    if x_col.null_count or y_col.null_count:
        raise DatasetError(f"set {path}: {x} or {y} has missing values")
    lengths = pc.list_value_length(x_col).to_numpy()
    if len(lengths) and (lengths != lengths[0]).any():
        raise DatasetError(f"set {path}: rows of {x} differ in length")
    d = int(lengths[0]) if len(lengths) else 0
    values = x_col.flatten()
    if values.null_count:
        raise DatasetError(f"set {path}: {x} has missing values")
    values = values.cast(pa.float32()).to_numpy(zero_copy_only=False, writable=True)
    return Split(values.reshape(len(table), d), y_col.to_numpy().astype(np.int64))
