"""The unlearning receipt's commitment, proofs, digests and signature, against independent
recomputations (the engine job that writes one is in tests/engine/test_engine_ray.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hamu_ray import cli, digests, receipt


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


def a_job(tmp_path):
    """An output directory with a model, logs, Ray storage and its digest key, its forget file and
    receipt (the forget path recorded as given)."""
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.safetensors").write_bytes(b"w" * 100)
    (out / "model" / "config.json").write_text("{}")
    (out / "ray").mkdir()
    (out / "ray" / "checkpoint").write_text("not the model")
    (out / "step_log.jsonl").write_text("{}\n")
    forget = tmp_path / "forget.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]), forget)
    key = digests.output_key(out)
    files = receipt.model_files(out)
    content = receipt.sign({"receipt": receipt.VERSION, "model_out": {"path": "model", "files": files,
                                                                      "sha256": receipt.model_digest(out / "model")},
                            "forget": {"path": str(forget), "digest_key": receipt.key_record(key, out),
                                       "merkle_root": receipt.merkle_root(digests.row_digests(str(forget), key))}})
    (out / "receipt.json").write_text(json.dumps(content))
    return out, forget


def test_verify_names_exactly_what_matches_and_what_does_not(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(receipt.KEY_ENV, raising=False)
    out, forget = a_job(tmp_path)
    args = ["receipt", "verify", str(out / "receipt.json"), "--model", str(out), "--forget", str(forget)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "ok       model/weights.safetensors: matches" in text and "ok       forget set" in text
    assert "ray/checkpoint" not in text and "step_log" not in text and "digest.key" not in text  # not model files

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
    key = bytes.fromhex((out / "digest.key").read_text())
    digest = hmac.new(key, json.dumps(row, sort_keys=True, separators=(",", ":")).encode(), "sha256").hexdigest()
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


def test_with_the_key_set_an_unsigned_receipt_is_a_mismatch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(receipt.KEY_ENV, "secret")
    out, forget = a_job(tmp_path)
    content = json.loads((out / "receipt.json").read_text())
    del content["signature"]  # the model, the forget set and their digests all still agree
    (out / "receipt.json").write_text(json.dumps(content))
    assert cli.main(["receipt", "verify", str(out / "receipt.json"), "--model", str(out)]) == 1
    text = capsys.readouterr().out
    assert "MISMATCH signature: missing, and $HAMU_RECEIPT_KEY is set" in text
    assert "ok       forget set: Merkle root matches" in text  # --forget: the recorded path


def test_model_and_forget_paths_say_what_was_expected(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(receipt.KEY_ENV, raising=False)
    out, forget = a_job(tmp_path)
    path = str(out / "receipt.json")
    for model, what in ((out / "model" / "weights.safetensors", "is a file"), (tmp_path / "gone", "does not exist")):
        assert cli.main(["receipt", "verify", path, "--model", str(model)]) == 2
        err = capsys.readouterr().err
        assert f"--model {model} {what}: give the job's output directory, the one its receipt was written to " \
               "(it holds the model, model)" in err and "MISMATCH" not in err
    assert cli.main(["receipt", "verify", path, "--forget", str(tmp_path / "nope.parquet")]) == 2
    assert f"--forget {tmp_path / 'nope.parquet'}: no such file" in capsys.readouterr().err

    # --forget defaults to the recorded path; when that file is gone it is skipped, not a mismatch
    assert cli.main(["receipt", "prove", path, "--row", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["row"] == 1
    forget.rename(tmp_path / "moved.parquet")
    assert cli.main(["receipt", "verify", path, "--model", str(out)]) == 0
    assert f"skipped  forget set: the file the receipt records, {forget}, is not here" in capsys.readouterr().out
    assert cli.main(["receipt", "prove", path, "--row", "1"]) == 2
    assert "pass --forget FILE" in capsys.readouterr().err


def test_the_forget_set_is_checked_with_the_receipts_own_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(receipt.KEY_ENV, raising=False)
    out, forget = a_job(tmp_path)
    path = str(out / "receipt.json")
    other = digests.output_key(tmp_path / "elsewhere")  # another output's key
    assert cli.main(["receipt", "verify", path, "--key", str(other.file)]) == 2
    err = capsys.readouterr().err
    assert f"digest key {other.file} is not the one this receipt's row digests were made with" in err
    moved = tmp_path / "kept.key"
    (out / digests.KEY_FILE).rename(moved)
    assert cli.main(["receipt", "verify", path]) == 2
    assert f"keyed by {out / digests.KEY_FILE}, which is not there; pass --key FILE" in capsys.readouterr().err
    assert cli.main(["receipt", "verify", path, "--key", str(moved)]) == 0
    assert "ok       forget set: Merkle root matches" in capsys.readouterr().out


def test_a_file_that_is_not_a_receipt_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"a": 1}')
    assert cli.main(["receipt", "verify", str(tmp_path / "r.json"), "--model", str(tmp_path)]) == 2
    assert f"receipt {tmp_path / 'r.json'}: not a {receipt.VERSION}" in capsys.readouterr().err


STEP_LOG = [  # three HAMU-Q steps as the engine logs them (the values chosen to check by hand)
    {"step": 1, "stop": "none", "loss/retain": 0.5, "loss/forget": 2.0, "hardness/cosine_mean": 0.25,
     "stop/margin": 0.4, "guarantee/B": 0.1, "guarantee/forget_gain": 0.1, "guarantee/retain_change": 0.02},
    {"step": 2, "stop": "none", "loss/retain": 0.55, "loss/forget": 2.5, "hardness/cosine_mean": -0.05,
     "stop/margin": 0.2, "guarantee/B": 0.1, "guarantee/forget_gain": 0.09, "guarantee/retain_change": 0.01},
    {"step": 3, "stop": "criterion", "loss/retain": 0.6, "loss/forget": 2.7, "hardness/cosine_mean": 0.4,
     "stop/margin": -0.1, "guarantee/B": 0.1, "guarantee/forget_gain": 0.0, "guarantee/retain_change": 0.0},
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

    # the stopped step takes no step: of the two taken, the first met B exactly, the second fell short
    facts = {"method": "hamu-q", "steps": 2, "stop": "criterion",
             "guarantee": receipt.guarantee_record(STEP_LOG, "hamu-q"), "hardness": trace,
             "losses": receipt.losses(STEP_LOG)}
    assert facts["guarantee"] == {"quantity": "forget gain", "B": 0.1, "steps": 2, "held": 1, "hold_rate": 0.5}
    text = receipt.engine_verdict(facts)
    assert text.startswith("hamu-q took 2 steps and stopped because the stopping criterion")
    assert "guarantee (forget gain ≥ B = 0.1) held on 1 of 2 steps taken" in text
    assert "conflicted on 2 of 3 steps (mean block cos θ +0.200)" in text
    assert "forget batch loss went from 2 to 2.7" in text


# ---- the guarantee on real steps: the single-process step on a small MLP and scikit-learn's digits

@pytest.fixture(scope="module")
def digits_problem():
    from tests.digits_fixtures import digits_mlp

    return digits_mlp(16, retain_rows=64, forget_rows=32)


def real_step_log(problem, rule_name: str, steps: int, *, lr: float = 0.1, forget_weight: float = 1.0,
                  **hparams) -> list[dict]:
    """`steps` unlearning steps of the rule, each logged as the engine's worker logs it."""
    import copy

    import torch.nn.functional as F

    from hamu_ray.engine.grads import TorchGrads
    from hamu_ray.engine.step import unlearning_step
    from hamu_ray.engine.worker import step_record
    from hamu_ray.rules import get_rule

    model, (xr, yr), (xf, yf) = copy.deepcopy(problem[0]), *problem[1:]
    grads, rule = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=lr)), get_rule(rule_name, **hparams)
    return [step_record(step, unlearning_step(
                grads, rule, lr=lr, retain_loss=lambda: F.cross_entropy(model(xr), yr),
                forget_loss=lambda: forget_weight * F.cross_entropy(model(xf), yf)), rule)
            for step in range(1, steps + 1)]


def test_hamu_u_is_held_to_its_retain_drop_not_to_a_forget_gain(digits_problem):
    # a forget loss weighted 0.01: its gains stay far below B, so only the right quantity holds
    log = real_step_log(digits_problem, "hamu-u", 3, forget_weight=0.01, constraint=0.05, radius=0.1)
    assert all(r["guarantee/B"] == 0.05 and r["stop"] == "none" for r in log)
    drops = [-r["guarantee/retain_change"] for r in log]
    assert drops == pytest.approx([0.05] * 3, rel=1e-9)  # met exactly (rectified), up to rounding
    assert max(r["guarantee/forget_gain"] for r in log) < 0.01
    record = receipt.guarantee_record(log, "hamu-u")
    assert record == {"quantity": "retain-loss drop", "B": 0.05, "steps": 3, "held": 3, "hold_rate": 1.0}
    text = receipt.engine_verdict({"method": "hamu-u", "steps": 3, "stop": "none", "guarantee": record})
    assert "Its first-order guarantee (retain-loss drop ≥ B = 0.05) held on 3 of 3 steps taken." in text

    short = [{**log[0], "guarantee/retain_change": -0.049}] + log[1:]  # a drop short of B
    assert receipt.guarantee_record(short, "hamu-u")["held"] == 2


def test_the_optimal_split_is_checked_against_the_requested_b(digits_problem):
    log = real_step_log(digits_problem, "hamu-q", 4, constraint=0.05, radius=0.5, constraint_split="optimal")
    assert [r["guarantee/B"] for r in log] == [0.05] * 4
    assert log[-1]["branch/optimal"] > 0 and log[-1]["guarantee/forget_gain"] == pytest.approx(0.05, rel=1e-9)
    assert receipt.guarantee_record(log, "hamu-q")["held"] == 4
    # the check can fail: a step whose gain fell short of the B asked for is counted broken
    short = log[:-1] + [{**log[-1], "guarantee/forget_gain": 0.045}]
    assert receipt.guarantee_record(short, "hamu-q") == {"quantity": "forget gain", "B": 0.05, "steps": 4,
                                                          "held": 3, "hold_rate": 0.75}


def test_the_hold_count_takes_every_step_taken_and_no_step_stopped(digits_problem):
    log = real_step_log(digits_problem, "hamu-q", 5, constraint=0.05, radius=0.5)
    log[-1]["stop"] = "forget_target"  # the monitor ended the run after its fifth step (worker.evaluated)
    assert receipt.guarantee_record(log, "hamu-q")["steps"] == 5
    stopped = real_step_log(digits_problem, "hamu-q", 1, constraint=1e3, radius=0.5)  # out of reach
    assert stopped[0]["stop"] == "infeasible"
    record = receipt.guarantee_record(log + stopped, "hamu-q")
    assert (record["steps"], record["held"]) == (5, 5)
    nothing = receipt.guarantee_record(stopped, "hamu-q")
    assert receipt.engine_verdict({"method": "hamu-q", "steps": 1, "stop": "infeasible", "guarantee": nothing}) \
        .endswith("It took no step, so its guarantee (forget gain ≥ B) was never tested.")
    assert receipt.guarantee_record(log, "gdiff")["quantity"] is None  # no guarantee to hold


def test_the_evaluation_extends_the_verdict_and_is_signed_anew(monkeypatch):
    monkeypatch.setenv(receipt.KEY_ENV, "k")
    base = receipt.sign({"receipt": receipt.VERSION, "method": "gdiff", "steps": 5, "stop": "none",
                         "guarantee": receipt.guarantee_record([], "gdiff"), "hardness": None, "losses": {}})
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
        original = {**reference, "forget_acc": 0.99, "forget_quality": 1e-6}  # the KS test tells it apart
        return evaluation_verdict(False, {"model": model, "original": original,
                                          "oracle": reference if oracle else None})

    assert judged(0.2).startswith("Its accuracy on the forget set is 0.02 (original 0.99, oracle 0); "
                                  "its test accuracy on the retained classes is 0.95 (original 0.96).")
    assert "cannot be told apart from the oracle (KS test, p ≥ 0.05)" in judged(0.05)
    assert "can still be told apart from the oracle (KS test, p < 0.05)" in judged(0.049)
    assert "Without an oracle" in judged(None, oracle=False) and "oracle 0" not in judged(None, oracle=False)


def test_a_model_has_one_digest_in_receipts_and_the_registry(tmp_path, monkeypatch):
    """The registry's model_sha256 is the digest a receipt gives the same model (model_in,
    model_out): which original an unlearned model came from is answerable by hash."""
    from hamu_ray.engine import data
    from hamu_ray.engine.config import parse_config
    from hamu_ray.pipeline.registry import version_tags
    from hamu_ray.pipeline.stages import StageOutput

    monkeypatch.delenv(receipt.KEY_ENV, raising=False)
    original = tmp_path / "stages" / "original-1"  # a pipeline's classifier original: one weights file
    original.mkdir(parents=True)
    (original / "model.safetensors").write_bytes(b"weights of the original")
    original_tags = version_tags(StageOutput("original", original, True, {}), "original", None)
    assert original_tags["model_sha256"] == hashlib.sha256(b"weights of the original").hexdigest()  # sha256sum's

    pq.write_table(pa.table({"x": [[0.1, 0.2]] * 4, "y": [0, 1, 0, 1]}), tmp_path / "forget.parquet")
    pq.write_table(pa.table({"x": [[0.3, 0.4]] * 4, "y": [1, 0, 1, 0]}), tmp_path / "retain.parquet")
    cfg = parse_config({"data": {"forget": str(tmp_path / "forget.parquet"), "retain": str(tmp_path / "retain.parquet"),
                                 "retain_batch_size": 2, "forget_batch_size": 2},
                        "model": {"sizes": [2, 2], "weights": str(original / "model.safetensors")},
                        "method": {"name": "hamu-q", "hparams": {"constraint": 0.01}}, "train": {"lr": 0.1},
                        "output_dir": str(tmp_path / "stages" / "unlearn-1")})
    unlearned = Path(cfg.output_dir)  # the job's output: its export, logs and receipt
    unlearned.mkdir()
    (unlearned / "model.safetensors").write_bytes(b"weights after unlearning")
    (unlearned / "step_log.jsonl").write_text("")
    sets = {name: data.inspect_set(name, str(tmp_path / f"{name}.parquet"), ["x", "y"]) for name in ("forget", "retain")}
    summary = {"steps": 0, "stop": "none",  # as a worker exports it (its determinism record: this process's)
               "determinism": receipt.determinism_record(cfg, "cpu", torch.float32, 1),
               "sets": {"retain": {"sha256": data.content_digest(sets["retain"])}}}
    content = receipt.build(cfg, sets, summary, unlearned, [], digests.output_key(tmp_path))
    (unlearned / "receipt.json").write_text(json.dumps(content))
    assert content["determinism"] == summary["determinism"]  # the worker's record, as it came
    assert " Its numbers come from 1 cpu worker(s) (" in content["verdict"]
    assert content["verdict"].endswith(" in float32 at ZeRO stage 0, torch " + torch.__version__ +
                                       ", seed 0, data shuffle seed 0, deterministic algorithms off.")
    assert content["retain"]["sha256_16"] == summary["sets"]["retain"]["sha256"]
    old_staging = {"steps": 0, "stop": "none", "sets": summary["sets"]}  # trained before receipt v3: nothing to record
    with pytest.raises(ValueError, match="before receipt format v3 and has no determinism record"):
        receipt.build(cfg, sets, old_staging, unlearned, [], digests.output_key(tmp_path))
    before_v4 = {"steps": 0, "stop": "none", "determinism": summary["determinism"]}  # no retain digest
    with pytest.raises(ValueError, match="before receipt format v4 and has no content digest of its retain set"):
        receipt.build(cfg, sets, before_v4, unlearned, [], digests.output_key(tmp_path))
    tags = version_tags(StageOutput("unlearn-hamu-q", unlearned, True, {}), "unlearned", None)
    assert content["model_in"]["sha256"] == tags["original_sha256"] == original_tags["model_sha256"]
    assert content["model_out"]["sha256"] == tags["model_sha256"] == hashlib.sha256(b"weights after unlearning").hexdigest()
    assert content["model_out"]["path"] == "model.safetensors" and content["model_rule"] == receipt.MODEL_RULE

    directory = tmp_path / "lm" / "model"  # a language model's Hugging Face directory: one digest too
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"w")
    expected = hashlib.sha256(json.dumps({"config.json": hashlib.sha256(b"{}").hexdigest(),
                                          "model.safetensors": hashlib.sha256(b"w").hexdigest()},
                                         sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    lm_tags = version_tags(StageOutput("original", directory.parent, True, {}), "original", None)
    assert receipt.model_digest(directory) == lm_tags["model_sha256"] == expected


RECORD = """
import json, types, torch
from hamu_ray import receipt
cfg = types.SimpleNamespace(train=types.SimpleNamespace(seed=0, zero_stage=0), data=types.SimpleNamespace(shuffle_seed=None))
record = receipt.determinism_record(cfg, "cpu", torch.float32, 1)
print(json.dumps({"device": record["device"], "verdict": receipt.determinism_verdict(record)}))
"""


def record_under(env: dict) -> dict:
    import os
    import subprocess
    import sys

    from hamu_ray.kernels import PORTABLE_KERNELS as PINS

    clean = {k: v for k, v in os.environ.items() if k not in PINS}
    done = subprocess.run([sys.executable, "-c", RECORD], env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_kernel_pins_choose_torchs_kernels_and_are_recorded_passed_to_workers_and_keyed(monkeypatch, tmp_path):
    """The opt-in for runs that reproduce across machines (kernels.KERNEL_ENV): set, a fresh
    process computes with AVX2 kernels whatever the machine has, and says so; unset, the
    record names the machine's own."""
    from hamu_ray.kernels import PORTABLE_KERNELS as PINS
    from hamu_ray.engine.driver import RUNTIME_ENV_DEFAULTS, worker_env_vars
    from hamu_ray.pipeline.stages import stage_key

    pinned, native = record_under(PINS), record_under({})
    assert pinned["device"]["cpu_capability"] == "AVX2" and pinned["device"]["kernel_pins"] == PINS
    assert "AVX2 kernels pinned by ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2, " in pinned["verdict"]
    assert native["device"]["kernel_pins"] == {}
    assert native["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"{native['device']['cpu_capability']} kernels (the machine's own), " in native["verdict"]

    for key in PINS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    job = {"model": {"kind": "mlp"}, "output_dir": str(tmp_path)}
    assert worker_env_vars() == RUNTIME_ENV_DEFAULTS
    unpinned_key = stage_key(job, tmp_path)
    for key, value in PINS.items():
        monkeypatch.setenv(key, value)
    assert worker_env_vars() == {**RUNTIME_ENV_DEFAULTS, **PINS}  # every Ray worker computes as the driver
    assert stage_key(job, tmp_path) != unpinned_key  # a stage made with other kernels is not reused
