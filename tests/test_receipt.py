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


STEP_LOG = [  # three HAMU steps as the engine logs them (the values chosen to check by hand)
    {"step": 1, "stop": "none", "loss/retain": 0.5, "loss/forget": 2.0, "hardness/cosine_mean": 0.25,
     "stop/margin": 0.4, "guarantee/constraint": 0.1, "guarantee/forget_gain": 0.1},
    {"step": 2, "stop": "none", "loss/retain": 0.55, "loss/forget": 2.5, "hardness/cosine_mean": -0.05,
     "stop/margin": 0.2, "guarantee/constraint": 0.1, "guarantee/forget_gain": 0.09},
    {"step": 3, "stop": "criterion", "loss/retain": 0.6, "loss/forget": 2.7, "hardness/cosine_mean": 0.4,
     "stop/margin": -0.1, "guarantee/constraint": 0.1, "guarantee/forget_gain": 0.0},
]


def test_the_hardness_trace_losses_and_verdict_summarise_the_step_log():
    trace = receipt.hardness_trace(STEP_LOG)
    assert trace["steps"] == 3 and trace["conflicting_steps"] == 2  # cos 0.25 and 0.4 > 0
    assert trace["cosine_mean"] == pytest.approx({"first": 0.25, "last": 0.4, "min": -0.05, "max": 0.4,
                                                  "mean": 0.2})
    assert trace["stop_margin"] == pytest.approx({"first": 0.4, "last": -0.1, "min": -0.1, "max": 0.4,
                                                  "mean": 0.5 / 3})
    assert receipt.losses(STEP_LOG) == {"retain": {"first": 0.5, "last": 0.6}, "forget": {"first": 2.0, "last": 2.7}}
    assert receipt.hardness_trace([{"step": 1, "stop": "none", "loss/retain": 1.0}]) is None  # e.g. gdiff

    # the stopped step takes no step: of the two taken, the first met B, the second fell short
    facts = {"method": "hamu-q", "steps": 2, "stop": "criterion", "guarantee": receipt.guarantee_record(STEP_LOG),
             "hardness": trace, "losses": receipt.losses(STEP_LOG)}
    assert facts["guarantee"] == {"steps": 2, "held": 1, "hold_rate": 0.5}
    text = receipt.engine_verdict(facts)
    assert text.startswith("hamu-q took 2 steps and stopped because the stopping criterion")
    assert "held on 1 of 2 steps" in text and "conflicted on 2 of 3 steps (mean block cos θ +0.200)" in text
    assert "forget batch loss went from 2 to 2.7" in text


def test_the_evaluation_extends_the_verdict_and_is_signed_anew(monkeypatch):
    monkeypatch.setenv(receipt.KEY_ENV, "k")
    base = receipt.sign({"receipt": receipt.VERSION, "method": "gdiff", "steps": 5, "stop": "none",
                         "guarantee": {"steps": 0, "held": 0, "hold_rate": None}, "hardness": None, "losses": {}})
    done = receipt.with_evaluation(base, {"against": "oracle", "model": {"forget_quality": 0.3}}, "Judged.")
    assert done["evaluation"]["model"] == {"forget_quality": 0.3}
    assert done["verdict"] == "gdiff took 5 steps and stopped because it ran its whole step budget. " \
                              "The method gives no per-step guarantee. Judged."
    assert done["signature"] != base["signature"]
    assert [ok for what, ok, _ in receipt.verify(done) if what == "signature"] == [True]


def test_the_evaluation_verdict_reads_forget_quality_at_the_ks_threshold():
    from hamu_ray.pipeline.registry import evaluation_verdict

    def judged(quality, oracle=True):
        model = {"forget_acc": 0.02, "test_acc_retained": 0.95, "forget_quality": quality}
        reference = {"forget_acc": 0.0, "test_acc_retained": 0.96, "forget_quality": 1.0}
        return evaluation_verdict(False, {"model": model, "original": {**reference, "forget_acc": 0.99},
                                          "oracle": reference if oracle else None})

    assert judged(0.2).startswith("Its accuracy on the forget set is 0.02 (original 0.99, oracle 0); "
                                  "its test accuracy on the retained classes is 0.95 (original 0.96).")
    assert "cannot be told apart from the oracle (KS test, p ≥ 0.05)" in judged(0.05)
    assert "can still be told apart from the oracle (KS test, p < 0.05)" in judged(0.049)
    assert "Without an oracle" in judged(None, oracle=False) and "oracle 0" not in judged(None, oracle=False)
