"""Keyed row digests (hamu_ray.digests): the key an output gets, the canonical encoding of every
Arrow type a forget file can hold, and the country QA demo's rows, which a dictionary of its
templates no longer maps back to their questions."""

from __future__ import annotations

import decimal
import hashlib
import hmac
import json
import stat
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hamu_ray import digests

# (column, the values as written, the JSON values the row rule encodes them as): timestamps, times
# and durations in nanoseconds whatever the stored unit (parquet keeps seconds as milliseconds),
# dates in days
TYPED_COLUMNS = [
    ("timestamp[s]", pa.array([1_700_000_000], pa.timestamp("s")), [1_700_000_000 * 10**9]),
    ("timestamp[ns]", pa.array([1_000_000_001], pa.timestamp("ns")), [1_000_000_001]),
    ("timestamp with zone", pa.array([1], pa.timestamp("us", tz="Europe/Paris")), [1_000]),
    ("timestamp beyond ns range", pa.array([10**12], pa.timestamp("s")), [10**21]),
    ("date32", pa.array([19_000], pa.date32()), [19_000]),
    ("date64", pa.array([86_400_000], pa.date64()), [1]),
    ("time32", pa.array([1], pa.time32("s")), [10**9]),
    ("time64", pa.array([1], pa.time64("ns")), [1]),
    ("duration", pa.array([5], pa.duration("ms")), [5 * 10**6]),
    ("decimal128", pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2)), ["1.50"]),
    ("decimal256", pa.array([decimal.Decimal("-1.50")], pa.decimal256(40, 2)), ["-1.50"]),
    ("binary", pa.array([b"\x00\xff"], pa.binary()), ["00ff"]),
    ("large_binary", pa.array([b"\x01"], pa.large_binary()), ["01"]),
    ("fixed_size_binary", pa.array([b"ab"], pa.binary(2)), ["6162"]),
    ("float16", pa.array([np.float16(1.5)], pa.float16()), [1.5]),
    ("dictionary", pa.array(["a"]).dictionary_encode(), ["a"]),
    ("uuid", pa.ExtensionArray.from_storage(pa.uuid(), pa.array([uuid.UUID(int=1).bytes], pa.binary(16))),
     ["00000000000000000000000000000001"]),
    ("list of timestamps", pa.array([[1, None]], pa.list_(pa.timestamp("ms"))), [[10**6, None]]),
    ("large list of dates", pa.array([[2]], pa.large_list(pa.date32())), [[2]]),
    ("fixed-size list", pa.array([[1, 2]], pa.list_(pa.duration("s"), 2)), [[10**9, 2 * 10**9]]),
    ("struct", pa.array([{"at": 3, "price": decimal.Decimal("2.5"), "n": 1}],
                        pa.struct([("at", pa.timestamp("s")), ("price", pa.decimal128(3, 1)), ("n", pa.int8())])),
     [{"at": 3 * 10**9, "n": 1, "price": "2.5"}]),
    ("map", pa.array([[("k", b"v")]], pa.map_(pa.string(), pa.binary())), [[["k", "76"]]]),
    ("map of times", pa.array([[(1, 2)]], pa.map_(pa.time32("ms"), pa.timestamp("us"))), [[[10**6, 2_000]]]),
    ("string_view", pa.array(["é"], pa.string_view()), ["é"]),
    ("uint64", pa.array([2**64 - 1], pa.uint64()), [2**64 - 1]),
    ("null", pa.array([None], pa.null()), [None]),
]


@pytest.mark.parametrize("name,column,encoded", TYPED_COLUMNS, ids=[c[0] for c in TYPED_COLUMNS])
def test_every_arrow_type_has_one_canonical_encoding(tmp_path, name, column, encoded):
    path = tmp_path / "forget.parquet"
    # and a null row (pyarrow 25 writes a null fixed-size list to parquet but cannot read it back)
    null_row = not pa.types.is_fixed_size_list(column.type)
    values = pa.concat_arrays([column, pa.nulls(1, column.type)]) if null_row else column
    pq.write_table(pa.table({"id": list(range(len(values))), "value": values}), path)
    rows = digests.canonical_rows(str(path))
    expected = [{"id": 0, "value": encoded[0]}] + [{"id": 1, "value": None}] * null_row
    assert rows == [json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
                    for r in expected]
    key = digests.DigestKey(b"k" * 32, None)
    assert digests.row_digests(str(path), key) == [hmac.new(b"k" * 32, r, "sha256").hexdigest() for r in rows]


def test_a_type_without_an_encoding_is_refused_before_any_training(tmp_path):
    from hamu_ray.engine.config import parse_config
    from hamu_ray.engine.data import DataError
    from hamu_ray.engine.driver import check_inputs

    sets = pa.table({"x": [[0.1, 0.2]] * 4, "y": [0, 1, 0, 1],
                     "when": pa.array([1] * 4, pa.timestamp("ns")), "price": pa.array([decimal.Decimal(1)] * 4)})
    pq.write_table(sets.set_column(0, "x", pa.array([[0.3, 0.4]] * 4)), tmp_path / "retain.parquet")  # disjoint
    pq.write_table(sets, tmp_path / "forget.parquet")
    job = {"data": {"forget": str(tmp_path / "forget.parquet"), "retain": str(tmp_path / "retain.parquet"),
                    "retain_batch_size": 2, "forget_batch_size": 2},
           "model": {"sizes": [2, 2]}, "method": {"name": "hamu-q", "hparams": {"constraint": 0.01}},
           "train": {"lr": 0.1}, "output_dir": str(tmp_path / "out")}
    assert set(check_inputs(parse_config(job))) == {"forget", "retain"}  # timestamps, decimals: fine
    notes = pa.array([[1]] * 4, pa.list_view(pa.int64()))
    pq.write_table(sets.append_column("notes", notes), tmp_path / "forget.parquet")
    with pytest.raises(DataError, match=r"forget set .*forget.parquet: column notes of type list_view<.*> has no "
                                        r"canonical encoding for row digests"):
        check_inputs(parse_config(job))


def test_json_lines_with_dates_digest_like_parquet(tmp_path):
    """pyarrow reads a date-like string in JSON lines as a timestamp: it is encoded as one."""
    (tmp_path / "f.jsonl").write_text('{"q": "Où?", "when": "2020-01-01 00:00:00"}\n')
    pq.write_table(pa.table({"q": ["Où?"], "when": pa.array([1_577_836_800], pa.timestamp("s"))}),
                   tmp_path / "f.parquet")
    assert digests.canonical_rows(str(tmp_path / "f.jsonl")) == [b'{"q":"O\xc3\xb9?","when":1577836800000000000}']
    assert digests.canonical_rows(str(tmp_path / "f.parquet")) == digests.canonical_rows(str(tmp_path / "f.jsonl"))


def test_an_output_gets_one_owner_only_key_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.delenv(digests.KEY_ENV, raising=False)
    key = digests.output_key(tmp_path / "out")
    path = tmp_path / "out" / digests.KEY_FILE
    assert key.file == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text())) == 32 and "secret" not in repr(key)
    assert digests.output_key(tmp_path / "out") == key  # a rerun names rows alike
    assert digests.output_key(tmp_path / "other").id != key.id
    assert list((tmp_path / "out").iterdir()) == [path]  # no temporary file left

    monkeypatch.setenv(digests.KEY_ENV, "shared")
    from_env = digests.output_key(tmp_path / "third")
    assert from_env.file is None and from_env == digests.output_key(tmp_path / "fourth")
    assert not (tmp_path / "third").exists()  # nothing written: the key is the environment's
    assert from_env.secret != b"shared" and from_env.secret == hmac.new(b"shared", digests.ENV_DERIVATION,
                                                                         "sha256").digest()
    path.write_text("not a key\n")
    with pytest.raises(digests.DigestKeyError, match=f"digest key {path}: not a hamu-ray digest key"):
        digests.read_key(path)


# ---- the country QA demo: its templates no longer name its rows ---------------------------------

def template_dictionary() -> set[str]:
    """Every unkeyed digest an outsider can compute from the templates: each country × template
    pair as the old per-example rule hashed it (sha256 of [question, answer]), and every row of
    the demo's sets (seed 0, its shares) as the old receipt rule hashed it."""
    from hamu_ray.pipeline import country_qa

    found = set()
    for country in country_qa.countries():
        for key, template in country_qa.TEMPLATES.items():
            value = country_qa.VALUES[key](country)
            if value is not None:
                pair = [template.question.format(name=country["name"]),
                        template.answer.format(value=value, name=country["name"])]
                found.add(hashlib.sha256(json.dumps(pair).encode()).hexdigest())
    for rows in country_qa.build(forget_share=0.1, holdout_share=0.1, seed=0).values():
        found |= {hashlib.sha256(json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                                 .encode()).hexdigest() for r in rows}
    return found


def test_a_template_dictionary_matches_none_of_the_demos_digests(tmp_path, monkeypatch, capsys):
    """The demo's forget rows as the per-example report, the hardness report and a receipt's
    proofs name them: none is in the dictionary, which names every one of them unkeyed."""
    from hamu_ray import cli, hardness, receipt
    from hamu_ray.engine import data
    from hamu_ray.pipeline import country_qa, lm_pipeline

    monkeypatch.delenv(digests.KEY_ENV, raising=False)
    out = tmp_path / "run"
    sets = country_qa.build(forget_share=0.1, holdout_share=0.1, seed=0)
    forget = str(country_qa.write({"forget": sets["forget"]}, tmp_path)["forget"])
    n = len(sets["forget"])
    dictionary = template_dictionary()
    unkeyed = [hashlib.sha256(row).hexdigest() for row in digests.canonical_rows(forget)]
    assert set(unkeyed) <= dictionary  # the dictionary names every row by the unkeyed rule
    pairs = [hashlib.sha256(json.dumps([r["question"], r["answer"]]).encode()).hexdigest() for r in sets["forget"]]
    assert set(pairs) <= dictionary

    scores = {"model": {"forget": {"logprob": np.full(n, -1.0), "count": np.ones(n), "rouge": np.zeros(n),
                                   "min_k": np.zeros(n)}}}
    lm_pipeline.write_per_example(scores, {"forget": forget}, digests.output_key(out), tmp_path / "per_example.parquet")
    reported = pq.read_table(tmp_path / "per_example.parquet").column("row_digest").to_pylist()
    scored = hardness.scored_rows(data.inspect_set("forget", forget, []), [0.5] * n, out)["by_conflict"]
    receipt_path = out / "receipt.json"
    key = digests.output_key(out)
    keyed = digests.row_digests(forget, key)
    receipt_path.write_text(json.dumps({"receipt": receipt.VERSION, "forget": {
        "path": forget, "merkle_root": receipt.merkle_root(keyed), "digest_key": receipt.key_record(key, out)}}))
    proofs = []
    for row in (0, n // 2, n - 1):
        assert cli.main(["receipt", "prove", str(receipt_path), "--row", str(row)]) == 0
        proofs.append(json.loads(capsys.readouterr().out))

    named = set(reported) | {r["digest"] for r in scored} | {p["row_digest"] for p in proofs}
    assert set(reported) == {r["digest"] for r in scored} == set(keyed) and len(keyed) == n
    leaves = {hashlib.sha256(b"\x00" + bytes.fromhex(d)).hexdigest() for d in dictionary}
    siblings = {step["hash"] for p in proofs for step in p["proof"]}
    assert not named & dictionary and not siblings & (dictionary | leaves)
