"""The GPU path, against CPU results (fp32, 1e-4). Skipped without CUDA; on a GPU machine run
`make test-gpu` (README, "GPU checks").

  1. the single-process step (every rule family and implicit surgery) on CUDA vs the CPU, and
     one device-to-host copy per step;
  2. a 1-worker Ray job on CUDA/NCCL under ZeRO-3 vs the single-process CPU step;
  3. the digits pipeline with one CUDA worker vs the same pipeline on the CPU.
"""

from __future__ import annotations

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
def test_a_one_worker_cuda_job_matches_the_cpu_step(tmp_path, monkeypatch):
    from tests.engine.test_engine_ray import config, make_inputs, reference
    from hamu_ray.engine.driver import run_unlearning

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # the driver's embedded Ray passes it to workers
    root, rows = make_inputs(tmp_path)
    cfg = config(root, tmp_path / "gpu", workers=1)
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"use_gpu": True})})
    result = run_unlearning(cfg)
    expected = reference(root, rows)
    got = load_file(result.output_dir / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=name)


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
