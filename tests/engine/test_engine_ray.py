"""The whole engine on a real local Ray: TorchTrainer workers read their parquet slices and run DeepSpeed.

Full-batch steps (batch = each worker's whole shard) make the result independent of how the
rows are ordered and split, so it must equal the single-process step on all rows exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hamu_ray.engine import data
from hamu_ray.engine.config import parse_config
from hamu_ray.engine.driver import run_unlearning
from hamu_ray.engine.grads import TorchGrads
from hamu_ray.rules import NonFiniteStatsError, get_rule
from hamu_ray.engine.step import TrustRegion, unlearning_step

pytestmark = pytest.mark.integration

SIZES, LR, STEPS = [12, 9, 5], 0.1, 5
# with an adaptive radius: its scale goes 1, ½, ¼, ⅛ on these steps (the workers measure, the
# references below measure the same way), so the worker's trust region and its resume are checked
RULE = ("hamu-q", {"constraint": 0.02, "radius": 0.1, "trust_tolerance": 1e-4})
NUM_BLOCKS = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def make_inputs(root):
    """An initial model and small retain/forget parquet sets (also used by tests/test_gpu.py)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "init.safetensors")
    gen = torch.Generator().manual_seed(1)
    rows = {}
    for name, n in (("retain", 8), ("forget", 4)):
        x, y = torch.randn(n, 12, generator=gen), torch.randint(5, (n,), generator=gen)
        pq.write_table(pa.table({"x": [r.tolist() for r in x], "y": y.tolist()}), root / f"{name}.parquet")
        rows[name] = (x, y)
    return root, rows


def config(root, out, *, workers=2, **train):
    return parse_config({
        "data": {"forget": str(root / "forget.parquet"), "retain": str(root / "retain.parquet"),
                 "retain_batch_size": 8 // workers, "forget_batch_size": 4 // workers,
                 "shuffle_seed": None},
        "model": {"sizes": SIZES, "weights": str(root / "init.safetensors")},
        "method": {"name": RULE[0], "hparams": RULE[1]},
        "train": {"lr": LR, "epochs": STEPS, "zero_stage": 3, **train},
        "cluster": {"num_workers": workers, "max_failures": 1},
        "output_dir": str(out),
    })


def reference(root, rows):
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5))
    model.load_state_dict(load_file(root / "init.safetensors"))
    take_step = reference_step(model)
    for _ in range(STEPS):
        take_step(*rows["retain"], *rows["forget"])
    return model.state_dict()


def reference_step(model):
    """The single-process step of RULE on `model`, measured, with its trust region."""
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    region = TrustRegion(get_rule(RULE[0], **RULE[1]), RULE[1]["trust_tolerance"])

    def take_step(xr, yr, xf, yf):
        out = unlearning_step(grads, region.rule(), lr=LR, measure=True,
                              retain_loss=lambda: F.cross_entropy(model(xr), yr),
                              forget_loss=lambda: F.cross_entropy(model(xf), yf))
        region.update(out)
        return out
    return take_step


def reference_log(root, rows) -> list[dict]:
    """The realised changes the single-process reference measured, step by step."""
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5))
    model.load_state_dict(load_file(root / "init.safetensors"))
    take_step = reference_step(model)
    outs = [take_step(*rows["retain"], *rows["forget"]) for _ in range(STEPS)]
    return [{"realised/forget_gain": o.realised_forget_gain, "realised/retain_change": o.realised_retain_change}
            for o in outs]


def assert_same_weights(result_dir, expected):
    got = load_file(result_dir / "model.safetensors")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, inputs, tmp_path_factory):
    root, _ = inputs
    digest = hashlib.sha256((root / "init.safetensors").read_bytes()).hexdigest()
    result = run_unlearning(config(root, tmp_path_factory.mktemp("runs") / "two", checkpoint_every=2))
    assert hashlib.sha256((root / "init.safetensors").read_bytes()).hexdigest() == digest
    return result


def test_two_zero3_workers_match_the_single_process_step(two_worker_run, inputs):
    root, rows = inputs
    assert two_worker_run.steps == STEPS and two_worker_run.stop == "none"
    assert two_worker_run.resumed_from_step == 0
    assert_same_weights(two_worker_run.output_dir, reference(root, rows))
    log = [json.loads(line) for line in (two_worker_run.output_dir / "step_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, STEPS + 1))
    assert all(row["comm/stats_values"] == NUM_BLOCKS * 3 for row in log)
    assert all(row["guarantee/forget_gain"] >= row["guarantee/B"] * (1 - 1e-6) for row in log)
    assert [row["trust/scale"] for row in log] == [1, 0.5, 0.25, 0.125, 0.125]
    assert [row["guarantee/B"] for row in log] == pytest.approx([0.02 * s for s in (1, 0.5, 0.25, 0.125, 0.125)])
    measured = reference_log(root, rows)
    for name in ("realised/forget_gain", "realised/retain_change"):
        assert [row[name] for row in log] == pytest.approx([r[name] for r in measured], abs=1e-6)
    summary = json.loads((two_worker_run.output_dir / "summary.json").read_text())
    for name, rows in (("forget", 4), ("retain", 8)):  # digests by the workers, the rule by hand (one block)
        content = hashlib.sha256((root / f"{name}.parquet").read_bytes()).hexdigest()
        assert summary["sets"][name]["num_rows"] == rows
        assert summary["sets"][name]["sha256"] == hashlib.sha256(content.encode()).hexdigest()[:16]
    used = summary["usage"]  # each worker's memory and the steps' time: 12 rows a step (8 + 4, all ranks)
    assert len(used["peak_rss_gb"]) == len(used["rss_before_model_gb"]) == 2
    assert all(0 < before <= peak for before, peak in zip(used["rss_before_model_gb"], used["peak_rss_gb"]))
    assert used["tokens_per_step"] == 12 and used["median_step_s"] > 0
    assert used["tokens_per_s"] == pytest.approx(12 / used["median_step_s"], rel=1e-2)
    assert used["rank0_peak_rss_gb_after_export"] >= used["peak_rss_gb"][0]


def test_the_job_writes_a_receipt_that_verifies_and_catches_a_changed_model(two_worker_run, inputs, tmp_path):
    from hamu_ray import receipt

    root, _ = inputs
    content = receipt.load(str(two_worker_run.output_dir / "receipt.json"))
    rows = pq.read_table(root / "forget.parquet").to_pylist()  # the commitment, recomputed by hand
    key_file = two_worker_run.output_dir / "digest.key"  # the job's own digest key, owner-only
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = bytes.fromhex(key_file.read_text())
    digests = [hmac.new(key, json.dumps(r, sort_keys=True, separators=(",", ":")).encode(), "sha256").hexdigest()
               for r in rows]
    leaves = [hashlib.sha256(b"\x00" + bytes.fromhex(d)).digest() for d in digests]
    pairs = [hashlib.sha256(b"\x01" + leaves[i] + leaves[i + 1]).digest() for i in (0, 2)]
    assert content["forget"]["merkle_root"] == hashlib.sha256(b"\x01" + pairs[0] + pairs[1]).hexdigest()
    assert content["forget"]["rows"] == 4 and content["retain"]["rows"] == 8
    retain_bytes = hashlib.sha256((root / "retain.parquet").read_bytes()).hexdigest()
    assert content["retain"]["sha256_16"] == hashlib.sha256(retain_bytes.encode()).hexdigest()[:16]
    assert content["retain"]["digest_rule"] == data.DIGEST_RULE
    assert content["model_in"]["sha256"] == hashlib.sha256((root / "init.safetensors").read_bytes()).hexdigest()
    assert list(content["model_out"]["files"]) == ["model.safetensors"]
    guarantee = content["guarantee"]
    assert {k: guarantee[k] for k in ("quantity", "B", "steps", "held", "hold_rate")} == {
        "quantity": "forget gain", "B": RULE[1]["constraint"], "steps": STEPS, "held": STEPS, "hold_rate": 1.0}
    assert guarantee["B_span"] == pytest.approx([0.02 / 8, 0.02]) and guarantee["realised"]["steps"] == STEPS
    assert (content["method"], content["steps"], content["stop"]) == (RULE[0], STEPS, "none")
    keyed = receipt.forget_key(content, two_worker_run.output_dir)
    assert all(ok for _, ok, _ in receipt.verify(content, two_worker_run.output_dir, str(root / "forget.parquet"), keyed))
    copy = tmp_path / "copy"
    copy.mkdir()
    weights = bytearray((two_worker_run.output_dir / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(weights))
    (check,) = receipt.verify(content, copy)
    assert check[:2] == ("model.safetensors", False) and check[2].startswith("sha256 ")


def test_the_receipt_records_what_decides_the_numbers_under_its_signature(two_worker_run, monkeypatch):
    """The determinism record, made on the rank-0 worker: this machine and this venv's (the
    workers run both), the job's seeds, dtype, ZeRO stage and workers; an edit to it breaks
    the signature."""
    import platform
    from importlib.metadata import version

    from hamu_ray import receipt

    content = receipt.load(str(two_worker_run.output_dir / "receipt.json"))
    record = content["determinism"]
    assert record["seeds"] == {"train": 0, "data_shuffle": None}  # train.seed's default; file order
    assert record["libraries"] == {"python": platform.python_version(),
                                   **{name: version(name) for name in ("torch", "deepspeed", "ray", "transformers",
                                                                       "peft", "numpy")}}
    assert record["device"] == {"kind": "cpu", "count": 2, "name": platform.machine(),
                                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernel_pins": {}}
    threads = record["threads"]
    assert set(threads) == {"intra_op", "inter_op"} and all(type(n) is int and n >= 1 for n in threads.values())
    assert record["deterministic_algorithms"] is False
    assert (record["dtype"], record["zero_stage"], record["workers"]) == ("float32", 3, 2)
    assert "cudnn" not in record
    assert content["verdict"].endswith(
        f" Its numbers come from 2 cpu worker(s) ({platform.machine()}, {record['device']['cpu_capability']} "
        f"kernels (the machine's own), {threads['intra_op']} intra-op / {threads['inter_op']} inter-op thread(s)) in float32 at ZeRO "
        f"stage 3, torch {torch.__version__}, seed 0, data shuffle seed None, deterministic algorithms off.")

    monkeypatch.setenv(receipt.KEY_ENV, "a key")
    signed = receipt.sign(dict(content))
    assert [ok for what, ok, _ in receipt.verify(signed) if what == "signature"] == [True]
    edited = json.loads(json.dumps(signed))
    edited["determinism"]["threads"]["intra_op"] += 1
    assert receipt.verify(edited) == [("signature", False, "does not match this receipt and key")]


def test_a_nan_loss_fails_clearly_and_writes_no_model(ray_cluster, inputs, tmp_path):
    root, rows = inputs
    bad = tmp_path / "bad"
    bad.mkdir()
    x, y = rows["retain"]
    x = x.clone()
    x[0, 0] = float("nan")
    pq.write_table(pa.table({"x": [r.tolist() for r in x], "y": y.tolist()}), bad / "retain.parquet")
    cfg = config(root, tmp_path / "nan-out")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"retain": str(bad / "retain.parquet")}),
                                 "cluster": cfg.cluster.model_copy(update={"max_failures": 0})})
    with pytest.raises(NonFiniteStatsError, match="NaN/Inf in block"):
        run_unlearning(cfg)
    assert not (tmp_path / "nan-out").exists()
    assert not any(p.name.startswith(".nan-out") for p in tmp_path.iterdir())


# ---- data order: the same rows, in the same order, on every run and after every restart ----

def xy_batch(rows: dict) -> dict:
    return {"x": torch.as_tensor(np.stack(rows["x"]), dtype=torch.float32),
            "y": torch.as_tensor(rows["y"], dtype=torch.long)}


def mini_batch_reference(root, cfg, world=2):
    """The single-process step on exactly the batches the engine's sharding and pairing give each
    rank (rebuilt here on the driver), the ranks' batches of a step joined into one."""
    from hamu_ray.engine import shards

    def shard(role, rank):
        return shards.rank_shard(role, getattr(cfg.data, role), ["x", "y"], rank, world, cfg.data.shuffle_seed,
                                 lambda rows: rows)

    streams = [shards.paired_batches(shard("retain", rank), shard("forget", rank),
                                     retain_batch_size=cfg.data.retain_batch_size,
                                     forget_batch_size=cfg.data.forget_batch_size, anchor="retain",
                                     epochs=cfg.train.epochs, make_batch=xy_batch,
                                     shuffle_seed=cfg.data.shuffle_seed, rank=rank)
               for rank in range(world)]
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5))
    model.load_state_dict(load_file(root / "init.safetensors"))
    take_step, steps = reference_step(model), 0
    for pairs in zip(*streams):
        take_step(*(torch.cat([p[i][k] for p in pairs]) for i in (0, 1) for k in ("x", "y")))
        steps += 1
    return model.state_dict(), steps


def train_worker_pids(since: float = 0.0) -> list[int]:
    """The Ray Train worker processes on this host (their process title names the actor) started
    after `since` (a time.time(): an earlier run's workers may still be on their way out)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline", "create_time"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))
            and p.info["create_time"] >= since]


def registered_step(storage) -> int:
    """The step of the latest checkpoint Ray Train registered in a run's storage, 0 if none (a
    report is collected asynchronously: a checkpoint directory alone may never be registered)."""
    from hamu_ray.engine.driver import latest_checkpoint

    return (latest_checkpoint(storage) or {}).get("metrics", {}).get("step", 0)


def run_killing_a_worker(cfg, after_step: int = 2):
    """`run_unlearning(cfg)` with one Ray Train worker SIGKILLed (by its pid) once a checkpoint at
    `after_step` or later is registered; the result of the restarted run."""
    import signal
    import threading
    import time

    out = Path(cfg.output_dir)
    outcome, staging, started = {}, out.parent / f".{out.name}.partial", time.time()
    runner = threading.Thread(target=lambda: outcome.update(result=run_unlearning(cfg)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 300
    while registered_step(staging / "ray") < after_step:
        assert runner.is_alive() and time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.05)
    victims = train_worker_pids(since=started)
    assert len(victims) == cfg.cluster.num_workers
    os.kill(victims[-1], signal.SIGKILL)
    runner.join(timeout=300)
    return outcome["result"]


def test_a_run_does_not_resume_on_a_set_whose_content_changed(tmp_path):
    """The driver matches an interrupted run by the sets' fingerprints (sizes, footers); a set
    edited in place under the same footer is caught by the content digests the workers compare
    with the checkpoint's, before any weight is loaded."""
    from ray.train import Checkpoint

    from hamu_ray.engine import worker

    (tmp_path / worker.DS_TAG).mkdir()
    (tmp_path / worker.STATE_FILE).write_text(json.dumps(
        {"step": 4, "log": [], "sets": {"forget": "a" * 16, "retain": "b" * 16}}))
    section = types.SimpleNamespace(forget="f.parquet", retain="r.parquet")
    with pytest.raises(data.DataError, match=r"^retain set r.parquet: its content changed since the checkpoint "
                                             r"at step 4 \(sha256 b{16} then, c{16} now\)"):
        worker.restore(None, Checkpoint.from_directory(str(tmp_path)), {"forget": "a" * 16, "retain": "c" * 16}, section)


def test_a_worker_killed_with_sigkill_resumes_to_the_uninterrupted_result(ray_cluster, inputs, tmp_path):
    """One worker process is SIGKILLed (by its pid) once a checkpoint is registered; Ray
    Train restarts the group from the latest checkpoint and the result equals the single-process
    run on exactly the batches an uninterrupted run sees."""
    root, _ = inputs
    # 6 steps, a checkpoint after each (~2 s apiece here): the run outlasts the kill
    cfg = config(root, tmp_path / "killed", epochs=3, checkpoint_every=1)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"retain_batch_size": 2, "forget_batch_size": 1, "shuffle_seed": 3})})
    resumed = run_killing_a_worker(cfg)
    expected, steps = mini_batch_reference(root, cfg)
    assert steps == resumed.steps == 6 and resumed.resumed_from_step >= 2
    assert_same_weights(resumed.output_dir, expected)
    assert not list(tmp_path.glob(".killed.*"))  # the staging directory is gone


def test_ctrl_c_and_a_failed_publish_lose_nothing_and_the_same_command_finishes_the_run(
        ray_cluster, inputs, tmp_path, monkeypatch, caplog):
    """`hamu-ray unlearn` gets SIGINT once a checkpoint is registered: its staging directory
    stays, and it says how to go on. The same job continues from that checkpoint and its
    publishing fails (the receipt writer raises): the trained model stays. Run once more, only
    the publishing is done, and the model is the one an uninterrupted run makes."""
    import errno
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from hamu_ray import receipt
    from hamu_ray.engine.driver import latest_checkpoint

    root, _ = inputs
    cfg = config(root, tmp_path / "out", epochs=3, checkpoint_every=1)  # 6 steps, a checkpoint after each
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"retain_batch_size": 2, "forget_batch_size": 1, "shuffle_seed": 3})})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    staging, printed = tmp_path / ".out.partial", tmp_path / "driver.log"
    with open(printed, "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "hamu_ray.cli", "unlearn", str(tmp_path / "job.yaml")],
                                  stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    try:
        while registered_step(staging / "ray") < 1:
            assert driver.poll() is None and time.monotonic() < deadline, printed.read_text()[-3000:]
            time.sleep(0.05)
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert f"is kept in {staging}: run the same command again to continue" in printed.read_text(), \
        printed.read_text()[-3000:]
    interrupted_at = registered_step(staging / "ray")
    assert 1 <= interrupted_at < 6 and not (tmp_path / "out").exists()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(receipt, "build", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run_unlearning(cfg)
    assert latest_checkpoint(staging / "ray")["metrics"]["final"] and not (tmp_path / "out").exists()
    assert "the trained model (only its publishing is left) is kept in" in caplog.text
    monkeypatch.undo()

    result = run_unlearning(cfg)
    expected, steps = mini_batch_reference(root, cfg)
    assert result.steps == steps == 6 and result.resumed_from_step >= interrupted_at
    assert_same_weights(result.output_dir, expected)
    assert json.loads((result.output_dir / "receipt.json").read_text())["steps"] == 6
    assert not list(tmp_path.glob(".out.*"))  # no staging directory, no owner record
