"""The GPU path, against CPU results (fp32, 1e-4). Skipped without CUDA; on a GPU machine run
`make test-gpu` (README, "GPU checks").

  1. the single-process step (every rule family and implicit surgery) on CUDA vs the CPU, and
     one device-to-host copy per step;
  2. a 1-worker Ray job on CUDA/NCCL under ZeRO-3, and under ZeRO-2 with optimizer offload
     (gradient fragments in CPU memory), vs the single-process CPU step;
  3. DeepSpeed on one CUDA rank (NCCL, no Ray) with optimizer offload, fp32 and bf16, vs the same;
  4. the digits pipeline with one CUDA worker vs the same pipeline on the CPU;
  5. the evaluation phase (an evaluation-only job of the tiny Llama) on CUDA vs one CPU process.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from hamu_ray.engine.grads import TorchGrads
from hamu_ray.rules import get_rule
from hamu_ray.rules.surgery import ImplicitSurgeryParams
from hamu_ray.engine.step import ImplicitSurgery, implicit_surgery_step, unlearning_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {"rtol": 1e-4, "atol": 1e-4}
RULES = [("hamu-q", {"constraint": 0.01, "radius": 0.1}),
         ("hamu-q", {"constraint": 0.01, "radius": 0.1, "constraint_split": "optimal"}),
         ("hamu-u", {"constraint": 0.001, "radius": "lr"}),
         ("surgery", {"epsilon": 0.01}), ("gru", {}), ("gdiff", {})]


def digits_problem(device):
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    forget = y == 3
    sets = (X[~forget][:256], y[~forget][:256]), (X[forget][:64], y[forget][:64])
    return model.to(device), [(x.to(device), t.to(device)) for x, t in sets]


def run_rule(device, name, hparams, steps=10, lr=0.1):
    model, ((xr, yr), (xf, yf)) = digits_problem(device)
    grads, rule = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=lr)), get_rule(name, **hparams)
    for _ in range(steps):
        unlearning_step(grads, rule, lr=lr, retain_loss=lambda: F.cross_entropy(model(xr), yr),
                        forget_loss=lambda: F.cross_entropy(model(xf), yf))
    return model


@pytest.mark.parametrize("name,hparams", RULES)
def test_the_step_on_cuda_matches_the_cpu(name, hparams):
    on_gpu, on_cpu = run_rule("cuda", name, hparams), run_rule("cpu", name, hparams)
    for g, c in zip(on_gpu.parameters(), on_cpu.parameters()):
        torch.testing.assert_close(g.detach().cpu(), c.detach(), **TOL)


@pytest.mark.parametrize("fast", [True, False])
def test_implicit_surgery_on_cuda_matches_the_cpu(fast):
    def run(device):
        model, ((xr, yr), (xf, yf)) = digits_problem(device)
        grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=0.1))
        state = ImplicitSurgery(ImplicitSurgeryParams(fast=fast))
        outs = [implicit_surgery_step(grads, state, lr=0.1, retain_loss=lambda: F.cross_entropy(model(xr), yr),
                                      forget_loss=lambda: F.cross_entropy(model(xf), yf)) for _ in range(10)]
        return model, outs
    (gpu_model, gpu_outs), (cpu_model, cpu_outs) = run("cuda"), run("cpu")
    assert [o.next_weight for o in gpu_outs] == pytest.approx([o.next_weight for o in cpu_outs], rel=1e-4)
    for g, c in zip(gpu_model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(g.detach().cpu(), c.detach(), **TOL)


def test_one_host_sync_per_step():
    model, ((xr, yr), (xf, yf)) = digits_problem("cuda")
    grads, rule = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=0.1)), get_rule("hamu-q", constraint=0.01, radius=0.1)
    step = lambda: unlearning_step(grads, rule, lr=0.1, retain_loss=lambda: F.cross_entropy(model(xr), yr),  # noqa: E731
                                   forget_loss=lambda: F.cross_entropy(model(xf), yf))
    step()  # warm-up: lazy CUDA initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


# ---- Ray: one CUDA worker (NCCL) under ZeRO-3 against the single-process CPU step ----------

@pytest.mark.integration
@pytest.mark.parametrize("train", [{"zero_stage": 3}, {"zero_stage": 2, "offload": "optimizer"}],
                         ids=["zero3", "zero2-offload"])
def test_a_one_worker_cuda_job_matches_the_cpu_step(tmp_path, monkeypatch, train):
    from tests.engine.test_engine_ray import config, make_inputs, reference
    from hamu_ray.engine.driver import run_unlearning

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # the driver's embedded Ray passes it to workers
    root, rows = make_inputs(tmp_path)
    cfg = config(root, tmp_path / "gpu", workers=1, **train)
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"use_gpu": True})})
    result = run_unlearning(cfg)
    expected = reference(root, rows)
    got = load_file(result.output_dir / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=name)


@pytest.mark.integration
def test_the_evaluation_phase_on_cuda_matches_one_cpu_process(tmp_path, monkeypatch, tiny_lm):
    """An evaluation-only job on one CUDA worker (ZeRO-3, NCCL) scores the tiny Llama as one CPU
    process does (lm_evaluate.score_model): numbers to 1e-4, greedy answers' ROUGE alike but
    for near-ties of an untrained model's argmax."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hamu_ray.engine.config import parse_config
    from hamu_ray.engine.driver import run_evaluation
    from hamu_ray.pipeline import lm_evaluate
    from tests.lm_fixtures import qa_rows

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    rows = qa_rows()
    sets = {"forget": tmp_path / "forget.parquet", "retain": tmp_path / "retain.parquet"}
    pq.write_table(pa.Table.from_pylist(rows[:8]), sets["forget"])
    pq.write_table(pa.Table.from_pylist(rows[8:24]), sets["retain"])
    sets = {name: str(path) for name, path in sets.items()}
    cfg = parse_config({"data": {**sets, "retain_batch_size": 4, "forget_batch_size": 4},
                        "model": {"kind": "causal_lm", "path": str(tiny_lm)}, "method": {"name": "ga"},
                        "train": {"lr": 0.1, "zero_stage": 3}, "cluster": {"num_workers": 1, "use_gpu": True},
                        "evaluation": {"sets": sets, "max_new_tokens": 6}, "output_dir": str(tmp_path / "unused")})
    got = run_evaluation(cfg).scores
    expected = lm_evaluate.score_model(str(tiny_lm), sets, {}, max_new_tokens=6)
    for name, scores in expected.items():
        for score, values in scores.items():
            if score == "rouge":
                assert np.mean(got[name][score] == values) >= 0.9, name
            else:
                np.testing.assert_allclose(got[name][score], values, **TOL, err_msg=f"{name} {score}")


# ---- DeepSpeed on one CUDA rank with optimizer offload, fp32 and bf16 ------------------------

OFFLOAD_RUNS = {"zero2-fp32": (2, False), "zero2-bf16": (2, True), "zero3-bf16": (3, True)}


def _offload_rank(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", DS_ACCELERATOR="cuda")
    torch.cuda.set_device(0)
    import deepspeed
    import torch.distributed as dist

    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine.grads import DeepSpeedGrads
    from hamu_ray.engine.step import SumAcrossRanks
    from tests.engine.test_grads_deepspeed import CASES, LR, make_batches, make_model

    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    rule_name, hparams = CASES["hamu-q"]
    results = {}
    for name, (stage, bf16) in OFFLOAD_RUNS.items():
        engine = eng.initialize(make_model(), eng.deepspeed_config(stage=stage, lr=LR, micro_batch_size=8,
                                                                   bf16=bf16, offload="optimizer"))
        grads, dtype = DeepSpeedGrads(engine), torch.bfloat16 if bf16 else torch.float32
        for (xr, yr), (xf, yf) in make_batches():
            xr, xf = xr.to(engine.device, dtype), xf.to(engine.device, dtype)
            yr, yf = yr.to(engine.device), yf.to(engine.device)
            unlearning_step(grads, get_rule(rule_name, **hparams), lr=LR,
                            retain_loss=lambda: F.cross_entropy(engine(xr).float(), yr),
                            forget_loss=lambda: F.cross_entropy(engine(xf).float(), yf),
                            reduce_stats=SumAcrossRanks(device=engine.device))
        results[name] = {"state": eng.full_state_dict(engine), "offloaded": grads.offloads_fragments}
    torch.save(results, out_path)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def offload_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("offload") / "results.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_offload_rank, args=(port, str(out)), nprocs=1, join=True,
                                          start_method="spawn")
    return torch.load(out)


@pytest.mark.integration
@pytest.mark.parametrize("run", OFFLOAD_RUNS)
def test_optimizer_offload_on_cuda_matches_the_cpu_step(offload_results, run):
    """fp32: equal to 1e-4. bf16 (bf16 gradient buffers): within 5 % of the fp32 update, as on the CPU."""
    from tests.engine.test_grads_deepspeed import BF16_SHARE_OF_UPDATE, CASES, make_model, run_reference

    result, (stage, bf16) = offload_results[run], OFFLOAD_RUNS[run]
    assert result["offloaded"] == (stage < 3)  # ZeRO-1/2's fragments in CPU memory
    initial = make_model().state_dict()
    for name, expected in run_reference(*CASES["hamu-q"]).items():
        got = result["state"][name]
        if not bf16:
            torch.testing.assert_close(got, expected, **TOL, msg=name)
            continue
        update, deviation = (expected - initial[name]).norm(), (got - expected).norm()
        assert update > 0 and deviation <= BF16_SHARE_OF_UPDATE * update, (name, float(deviation / update))


# ---- the digits pipeline, one worker, CPU and CUDA ------------------------------------------

def stage_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.parent.name.rsplit("-", 1)[0]: load_file(path)
            for path in (out / "stages").glob("*/model.safetensors")}


@pytest.mark.integration
def test_the_digits_pipeline_on_cuda_matches_the_cpu(tmp_path, monkeypatch):
    from tests.pipeline.test_pipeline import digits_config
    from hamu_ray.pipeline.stages import run_pipeline

    def run(out: Path, accelerator: str, use_gpu: bool):
        monkeypatch.setenv("DS_ACCELERATOR", accelerator)

        def one_worker(raw):
            raw["cluster"] = {"num_workers": 1, "use_gpu": use_gpu}
        return run_pipeline(digits_config(out, one_worker))
    cpu, gpu = run(tmp_path / "cpu", "cpu", False), run(tmp_path / "gpu", "cuda", True)
    cpu_weights, gpu_weights = stage_weights(tmp_path / "cpu"), stage_weights(tmp_path / "gpu")
    assert set(cpu_weights) == set(gpu_weights) and len(cpu_weights) >= 4
    for stage, weights in cpu_weights.items():
        for name, value in weights.items():
            torch.testing.assert_close(gpu_weights[stage][name], value, **TOL, msg=f"{stage}: {name}")
    assert [row["model"] for row in gpu.rows] == [row["model"] for row in cpu.rows]
