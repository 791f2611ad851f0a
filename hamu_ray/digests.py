"""Keyed row digests: how a forget row is named in everything that leaves a run (receipt leaves
and proofs, per-example reports, hardness reports), without its content.

A plain sha256 of a row names it to anyone who can guess the row: enumerating templated
questions (the country QA's, say) maps every digest back to its question. So every row digest
that leaves a run is an HMAC-SHA256 under a secret *digest key*:
  - `$HAMU_RECEIPT_KEY` when it is set (the key that also signs receipts); the digest secret is
    then HMAC-SHA256($HAMU_RECEIPT_KEY, "hamu-ray row digests"), so a row's digest can never pass
    for a receipt's signature;
  - otherwise the output's own key file, `KEY_FILE` in the output directory (a pipeline's: one
    key for all its stages and reports), 32 random bytes written owner-only (0600) at first use
    and read back on every later run, so cached stages and rerun reports name rows alike.
Whoever holds the key (the owner of the output) can recompute and check the digests (`hamu-ray
receipt verify/prove` read it); without it a digest says nothing about the row. Keep the key
file to yourself when you share a model: copy the model files and the receipt, not the whole
output directory.

The row encoding (ROW_RULE, json_plan): the row as JSON, an object of every column of the file
(values as pyarrow reads them), keys sorted, separators (',', ':'), UTF-8, non-ASCII kept;
timestamps, times and durations as integer nanoseconds (since the epoch, since midnight, long),
dates as integer days since the epoch, whatever unit or time zone the file stores; decimals as
their decimal string, binary values as lowercase hex, half floats as floats, dictionary columns as
their values, extension columns (uuid, …) as their storage; lists, maps (as [key, value] pairs)
and structs element by element.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from hamu_ray.errors import UserError

KEY_ENV = "HAMU_RECEIPT_KEY"
KEY_FILE = "digest.key"
ROW_RULE = ("HMAC-SHA256 under the digest key of the row as JSON: every column, keys sorted, separators "
            "(',', ':'), UTF-8; timestamps, times and durations as integer nanoseconds, dates as days, "
            "decimals as strings, binary as hex (hamu_ray/digests.py)")
ENV_DERIVATION = b"hamu-ray row digests"  # the digest secret under $HAMU_RECEIPT_KEY (domain separation)
KEY_ID_MESSAGE = b"hamu-ray digest key id"


class DigestKeyError(UserError, ValueError):
    """A digest key that is missing, unreadable or not the one a receipt was made with."""


@dataclass(frozen=True)
class DigestKey:
    secret: bytes = field(repr=False)
    file: Path | None  # the key file; None: derived from $HAMU_RECEIPT_KEY

    def digest(self, data: bytes) -> str:
        return hmac.new(self.secret, data, "sha256").hexdigest()

    @property
    def id(self) -> str:
        """Names the key without revealing it: receipts record it, so a wrong key is told apart
        from a changed forget set."""
        return self.digest(KEY_ID_MESSAGE)[:16]

    @property
    def source(self) -> str:
        return f"${KEY_ENV}" if self.file is None else str(self.file)


def env_key() -> DigestKey | None:
    key = os.environ.get(KEY_ENV)
    if not key:
        return None
    return DigestKey(hmac.new(key.encode(), ENV_DERIVATION, "sha256").digest(), None)


def output_key(directory: str | os.PathLike) -> DigestKey:
    """The digest key of an output: $HAMU_RECEIPT_KEY's when set, else `directory`/KEY_FILE,
    made on first use (concurrent first uses agree: the file is linked into place only if absent)."""
    return env_key() or _key_file(Path(directory) / KEY_FILE)


def _key_file(path: Path) -> DigestKey:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owner-only from the start
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            os.link(tmp, path)  # fails if another process made it first: theirs is kept
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return read_key(path)


def read_key(path: str | os.PathLike) -> DigestKey:
    path = Path(path)
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise DigestKeyError(f"digest key {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise DigestKeyError(f"digest key {path}: not a hamu-ray digest key (64 hex digits)")
    return DigestKey(secret, path)


# ---- rows --------------------------------------------------------------------------------------

def row_digests(path: str, key: DigestKey) -> list[str]:
    """One keyed digest per row of a parquet or JSON-lines file, in file order (ROW_RULE)."""
    return [key.digest(row) for row in canonical_rows(path)]


def canonical_rows(path: str) -> list[bytes]:
    """Every row of the file encoded by ROW_RULE (before keying)."""
    table = _dataset(path).to_table()
    values = {}
    for name, column in zip(table.column_names, table.columns):
        cast_to, convert = column_plan(path, name, column.type)
        cast = column.cast(cast_to).to_pylist()
        values[name] = cast if convert is None else [None if v is None else convert(v) for v in cast]
    return [json.dumps({name: column[i] for name, column in values.items()}, sort_keys=True,
                       separators=(",", ":"), ensure_ascii=False, default=_hex).encode()
            for i in range(table.num_rows)]


def check_encodable(path: str) -> None:
    """Every column of the file has a canonical encoding (its schema only: before any training,
    so a finished run never fails on its receipt)."""
    for field in _dataset(path).schema:
        column_plan(path, field.name, field.type)


def _dataset(path: str):
    import pyarrow.dataset as pads

    from hamu_ray.engine.data import file_format

    return pads.dataset(path, format=file_format("forget", path))


def column_plan(path: str, name: str, column_type):
    from hamu_ray.engine.data import DataError

    try:
        return json_plan(column_type)
    except NotImplementedError as exc:
        raise DataError(f"forget set {path}: column {name} of type {column_type} has no canonical encoding for "
                        f"row digests ({exc}); store it as a string, number or list column") from None


NANOSECONDS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
MS_PER_DAY = 86_400_000


def json_plan(t):
    """(the Arrow type a column of type `t` is cast to, a function from a cast value to its JSON
    value or None when it is one already). Temporal values become their integer count, scaled
    to nanoseconds (dates: days) so the stored unit does not matter (parquet stores seconds as
    milliseconds); decimals their string, half floats doubles, dictionaries their values,
    extension types their storage; lists, maps and structs recursively. Binary stays (written
    as hex). NotImplementedError for the types it does not cover."""
    import pyarrow as pa

    T = pa.types
    if T.is_union(t) or T.is_run_end_encoded(t):  # neither parquet nor JSON lines holds these
        raise NotImplementedError(f"{t} is not covered")
    if T.is_list_view(t) or T.is_large_list_view(t):  # pyarrow 25 casts them wrongly (drops values)
        raise NotImplementedError("list views are not covered")
    if isinstance(t, pa.BaseExtensionType):
        return json_plan(t.storage_type)
    if T.is_dictionary(t):
        return json_plan(t.value_type)
    if T.is_date32(t):
        return pa.int32(), None
    if T.is_date64(t):
        return pa.int64(), lambda ms: ms // MS_PER_DAY
    if T.is_timestamp(t) or T.is_duration(t) or T.is_time(t):
        factor = NANOSECONDS[t.unit]
        return (pa.int32() if T.is_time32(t) else pa.int64()), lambda count: count * factor
    if T.is_decimal(t):
        return pa.string(), None
    if T.is_float16(t):
        return pa.float64(), None
    if T.is_struct(t):
        plans = {f.name: json_plan(f.type) for f in t}
        return (pa.struct([f.with_type(plans[f.name][0]) for f in t]),
                _fields_converter({name: convert for name, (_, convert) in plans.items() if convert}))
    if T.is_map(t):
        (key_type, key), (item_type, item) = json_plan(t.key_type), json_plan(t.item_type)
        return pa.map_(key_type, item_type), _pairs_converter(key, item)
    if T.is_list(t) or T.is_large_list(t) or T.is_fixed_size_list(t):
        item_type, item = json_plan(t.value_type)
        if T.is_fixed_size_list(t):
            cast_to = pa.list_(item_type, t.list_size)
        else:
            cast_to = (pa.large_list if T.is_large_list(t) else pa.list_)(item_type)
        return cast_to, _items_converter(item)
    return t, None


def _fields_converter(fields: dict):
    if not fields:
        return None

    def convert(value: dict) -> dict:
        return {k: v if v is None or k not in fields else fields[k](v) for k, v in value.items()}
    return convert


def _pairs_converter(key, item):
    if key is None and item is None:
        return None
    key, item = key or _unchanged, item or _unchanged

    def convert(pairs: list) -> list:
        return [(key(k), None if v is None else item(v)) for k, v in pairs]
    return convert


def _items_converter(item):
    if item is None:
        return None

    def convert(items: list) -> list:
        return [None if v is None else item(v) for v in items]
    return convert


def _unchanged(value):
    return value


def _hex(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    raise TypeError(f"{type(value).__name__} has no JSON form")
