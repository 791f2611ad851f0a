"""The unlearning receipt's commitment, proofs, digests and signature, against independent
recomputations (the engine job that writes one is in tests/engine/test_engine_ray.py)."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hamu_ray import cli, receipt


def brute_root(digests: list[str]) -> str:
    """The tree rule written out recursively: split at the largest power of two below n."""
    def node(items: list[bytes]) -> bytes:
        if len(items) == 1:
            return items[0]
        split = 1
        while split * 2 < len(items):
            split *= 2
        return hashlib.sha256(b"\x01" + node(items[:split]) + node(items[split:])).digest()

    return node([hashlib.sha256(b"\x00" + bytes.fromhex(d)).digest() for d in digests]).hex()


def digests_of(n: int) -> list[str]:
    return [hashlib.sha256(f"row {i}".encode()).hexdigest() for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31])
def test_root_and_every_proof_follow_the_written_rule(n):
    digests = digests_of(n)
    root = receipt.merkle_root(digests)
    assert root == brute_root(digests)
    for i, d in enumerate(digests):
        proof = receipt.inclusion_proof(digests, i)
        assert receipt.proof_holds(d, proof, root)
        assert not receipt.proof_holds(digests_of(n + 1)[-1], proof, root)  # another row
        if proof:  # a changed sibling breaks it
            bad = [dict(step) for step in proof]
            bad[0]["hash"] = "00" * 32
            assert not receipt.proof_holds(d, bad, root)


def test_row_digests_are_canonical_json_of_every_column(tmp_path):
    rows = [{"question": "Où est Paris?", "answer": "France", "n": 1},
            {"question": "x", "answer": "y", "n": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "f.parquet")
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = [hashlib.sha256(json.dumps(r, sort_keys=True, separators=(",", ":"),
                                          ensure_ascii=False).encode()).hexdigest() for r in rows]
    assert receipt.row_digests(str(tmp_path / "f.parquet")) == expected
    assert receipt.row_digests(str(tmp_path / "f.jsonl")) == expected


def a_job(tmp_path):
    """An output directory with a model, logs and Ray storage, its forget file and receipt."""
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.safetensors").write_bytes(b"w" * 100)
    (out / "model" / "config.json").write_text("{}")
    (out / "ray").mkdir()
    (out / "ray" / "checkpoint").write_text("not the model")
    (out / "step_log.jsonl").write_text("{}\n")
    forget = tmp_path / "forget.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]), forget)
    files = receipt.model_files(out)
    content = receipt.sign({"receipt": receipt.VERSION, "model_out": {"files": files, "sha256": receipt.combined(files)},
                            "forget": {"merkle_root": receipt.merkle_root(receipt.row_digests(str(forget)))}})
    (out / "receipt.json").write_text(json.dumps(content))
    return out, forget


def test_verify_names_exactly_what_matches_and_what_does_not(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(receipt.KEY_ENV, raising=False)
    out, forget = a_job(tmp_path)
    args = ["receipt", "verify", str(out / "receipt.json"), "--model", str(out), "--forget", str(forget)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "ok       model/weights.safetensors: matches" in text and "ok       forget set" in text
    assert "ray/checkpoint" not in text and "step_log" not in text  # not model files

    (out / "model" / "weights.safetensors").write_bytes(b"w" * 99 + b"x")  # one byte
    (out / "model" / "extra.bin").write_bytes(b"")
    pq.write_table(pa.Table.from_pylist([{"question": f"q{i}", "answer": "changed" if i == 3 else f"a{i}"}
                                         for i in range(5)]), forget)
    assert cli.main(args) == 1
    text = capsys.readouterr().out
    assert "MISMATCH model/weights.safetensors: sha256" in text
    assert "MISMATCH model/extra.bin: not in the receipt" in text
    assert "ok       model/config.json: matches" in text
    assert "MISMATCH forget set: Merkle root" in text


def test_prove_gives_a_proof_the_receipts_root_accepts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(receipt.KEY_ENV, raising=False)
    out, forget = a_job(tmp_path)
    assert cli.main(["receipt", "prove", str(out / "receipt.json"), "--forget", str(forget), "--row", "3"]) == 0
    shown = json.loads(capsys.readouterr().out)
    root = json.loads((out / "receipt.json").read_text())["forget"]["merkle_root"]
    row = {"answer": "a3", "question": "q3"}
    digest = hashlib.sha256(json.dumps(row, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert shown["row_digest"] == digest and receipt.proof_holds(digest, shown["proof"], root)
    assert cli.main(["receipt", "prove", str(out / "receipt.json"), "--forget", str(forget), "--row", "5"]) == 2
    assert "row 5 is not in the set (it has 5 rows" in capsys.readouterr().err


def test_a_signed_receipt_fails_with_another_key_or_an_edit(tmp_path, monkeypatch):
    monkeypatch.setenv(receipt.KEY_ENV, "secret")
    out, _ = a_job(tmp_path)
    content = receipt.load(str(out / "receipt.json"))
    assert receipt.verify(content) == [("signature", True, "valid")]
    monkeypatch.setenv(receipt.KEY_ENV, "other")
    assert receipt.verify(content)[0][1] is False
    monkeypatch.setenv(receipt.KEY_ENV, "secret")
    content["forget"]["merkle_root"] = "00" * 32
    assert receipt.verify(content)[0][1] is False


def test_a_file_that_is_not_a_receipt_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"a": 1}')
    assert cli.main(["receipt", "verify", str(tmp_path / "r.json"), "--model", str(tmp_path)]) == 2
    assert f"receipt {tmp_path / 'r.json'}: not a {receipt.VERSION}" in capsys.readouterr().err
