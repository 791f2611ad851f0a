"""DeepSpeed ZeRO 0-3 on 2 plain gloo processes (no Ray) against the single-process step.

Both ranks compute both gradients on their own half of every batch; only the [K, 3] statistics
are all-reduced. After 5 steps the parameters must match the one-process run on the whole batch.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.nn.functional as F

from hamu_ray.engine.grads import TorchGrads
from hamu_ray.rules import get_rule
from hamu_ray.engine.step import unlearning_step

pytestmark = pytest.mark.integration

LR, STEPS, WORLD = 0.1, 5, 2
CASES = {
    "hamu-q": ("hamu-q", {"constraint": 0.02, "radius": 0.1}),
    "hamu-q-full": ("hamu-q", {"constraint": 0.02, "radius": 0.2, "full_grad": True}),
    "surgery": ("surgery", {"epsilon": 0.0}),
    "gdiff": ("gdiff", {}),
}
STAGES = (0, 1, 2, 3)
BF16_STAGES = (2, 3)
# optimizer offload: ZeRO-1/2 read the fp32 gradient partition in CPU memory (ZeRO-3's offload:
# tests/tasks/test_causal_lm_zero.py)
OFFLOAD_STAGES = (1, 2)
# objectives with a frozen reference model (partitioned under ZeRO-3) and one-backprop surgery
METHOD_CASES = {
    "npo-hamu": {"name": "npo", "rule": "hamu-q", "hparams": {"constraint": 0.02, "radius": 0.1},
                 "objective": {"beta": 0.5}},
    "scrub": {"name": "scrub", "objective": {"temperature": 2.0}},
    "implicit": {"name": "surgery-implicit", "hparams": {"dual_lr": 0.3, "epsilon": 0.05}},
}
METHOD_STAGES = (0, 3)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # odd sizes, so ZeRO partitions split tensors across ranks and some ranks get no fragment
    return torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5))


def make_batches():
    """STEPS (retain, forget) batches of 8 and 4 rows: rank r takes rows r::WORLD."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        xr, yr = torch.randn(8, 12, generator=gen), torch.randint(5, (8,), generator=gen)
        xf, yf = torch.randn(4, 12, generator=gen), torch.randint(5, (4,), generator=gen)
        out.append(((xr, yr), (xf, yf)))
    return out


def run_reference(rule_name, hparams):
    model = make_model()
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    for (xr, yr), (xf, yf) in make_batches():
        unlearning_step(grads, get_rule(rule_name, **hparams), lr=LR,
                        retain_loss=lambda: F.cross_entropy(model(xr), yr),
                        forget_loss=lambda: F.cross_entropy(model(xf), yf))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_method(case: str, grads, logits_of, reference, rank=0, world=1, reduce=None, reduce_mean=None):
    """METHOD_CASES[case] for STEPS steps through the worker's own step function."""
    from hamu_ray import objectives
    from hamu_ray.engine.config import MethodSection
    from hamu_ray.rules.surgery import ImplicitSurgeryParams
    from hamu_ray.engine.step import ImplicitSurgery, implicit_surgery_step

    from hamu_ray.tasks.classifier import label_scores

    method = MethodSection(**METHOD_CASES[case])
    retain_loss, forget_loss = objectives.loss_fns(
        method.spec, method.objective, lambda b: label_scores(logits_of(b["x"]), b["y"]),
        lambda b: label_scores(reference(b["x"]), b["y"]))
    state = ImplicitSurgery(ImplicitSurgeryParams(**method.hparams)) if method.spec.implicit else None
    for (xr, yr), (xf, yf) in make_batches():
        retain = {"x": xr[rank::world], "y": yr[rank::world]}
        forget = {"x": xf[rank::world], "y": yf[rank::world]}
        if state is not None:
            implicit_surgery_step(grads, state, lr=LR, retain_loss=lambda: retain_loss(retain),
                                  forget_loss=lambda: forget_loss(forget), reduce_mean=reduce_mean)
        else:
            unlearning_step(grads, get_rule(method.rule_name, **method.hparams), lr=LR,
                            retain_loss=lambda: retain_loss(retain),
                            forget_loss=lambda: forget_loss(forget), reduce_stats=reduce)
    return state.weight if state else None


def run_method_reference(case: str):
    model, frozen = make_model(), make_model().requires_grad_(False)
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    weight = run_method(case, grads, model, frozen)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, weight


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine.grads import DeepSpeedGrads
    from hamu_ray.engine.step import MeanAcrossRanks, SumAcrossRanks

    eng.import_deepspeed().init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    sent = []  # spy (not a mock): every all_reduce goes through; hamu-ray's own are recorded
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("hamu_ray"):
            sent.append((tensor.numel(), tensor.dtype))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    results = {}
    for stage in STAGES:
        for case, (rule_name, hparams) in CASES.items():
            model = make_model()
            engine = eng.initialize(model, eng.deepspeed_config(stage=stage, lr=LR, micro_batch_size=4))
            grads = DeepSpeedGrads(engine)
            sent.clear()
            reduced = []
            for (xr, yr), (xf, yf) in make_batches():
                xr, yr, xf, yf = xr[rank::WORLD], yr[rank::WORLD], xf[rank::WORLD], yf[rank::WORLD]
                out = unlearning_step(grads, get_rule(rule_name, **hparams), lr=LR,
                                      retain_loss=lambda: F.cross_entropy(engine(xr), yr),
                                      forget_loss=lambda: F.cross_entropy(engine(xf), yf),
                                      reduce_stats=SumAcrossRanks(device=engine.device))
                reduced.append(out.reduced_values)
            results[(stage, case)] = {"state": eng.full_state_dict(engine), "sent": list(sent),
                                      "reduced": reduced, "mode": grads.mode}
    rule_name, hparams = CASES["hamu-q"]
    for stage in OFFLOAD_STAGES:
        engine = eng.initialize(make_model(), eng.deepspeed_config(stage=stage, lr=LR, micro_batch_size=4,
                                                                   offload="optimizer"))
        grads = DeepSpeedGrads(engine)
        for (xr, yr), (xf, yf) in make_batches():
            xr, yr, xf, yf = xr[rank::WORLD], yr[rank::WORLD], xf[rank::WORLD], yf[rank::WORLD]
            unlearning_step(grads, get_rule(rule_name, **hparams), lr=LR,
                            retain_loss=lambda: F.cross_entropy(engine(xr), yr),
                            forget_loss=lambda: F.cross_entropy(engine(xf), yf),
                            reduce_stats=SumAcrossRanks(device=engine.device))
        results[(stage, "offload")] = {"state": eng.full_state_dict(engine), "offloaded": grads.offloads_fragments}
    # bf16: the gradient buffers are bf16, so only bf16 accuracy is expected
    for stage in BF16_STAGES:
        model = make_model()
        engine = eng.initialize(model, eng.deepspeed_config(stage=stage, lr=LR, micro_batch_size=4, bf16=True))
        grads = DeepSpeedGrads(engine)
        for (xr, yr), (xf, yf) in make_batches():
            xr, xf = xr[rank::WORLD].bfloat16(), xf[rank::WORLD].bfloat16()
            yr, yf = yr[rank::WORLD], yf[rank::WORLD]
            unlearning_step(grads, get_rule("hamu-q", constraint=0.02, radius=0.1), lr=LR,
                            retain_loss=lambda: F.cross_entropy(engine(xr).float(), yr),
                            forget_loss=lambda: F.cross_entropy(engine(xf).float(), yf),
                            reduce_stats=SumAcrossRanks(device=engine.device))
        results[(stage, "bf16")] = {"state": eng.full_state_dict(engine), "mode": grads.mode}
    for stage in METHOD_STAGES:
        for case in METHOD_CASES:
            engine = eng.initialize(make_model(), eng.deepspeed_config(stage=stage, lr=LR, micro_batch_size=4))
            reference = eng.frozen_copy(make_model(), eng.deepspeed_config(stage=stage, lr=LR, micro_batch_size=4),
                                        engine.device)
            weight = run_method(case, DeepSpeedGrads(engine), engine, reference, rank, WORLD,
                                SumAcrossRanks(device=engine.device), MeanAcrossRanks())
            results[(stage, case)] = {"state": eng.full_state_dict(engine), "weight": weight}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero") / "results.pt"
    torch.multiprocessing.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD,
                                          join=True, start_method="spawn")
    return torch.load(out)


NUM_BLOCKS = len(list(make_model().parameters()))
BF16_SHARE_OF_UPDATE = 0.05


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", CASES)
def test_zero_stage_matches_the_single_process_step(distributed_results, stage, case):
    result = distributed_results[(stage, case)]
    reference = run_reference(*CASES[case])
    for name, expected in reference.items():
        torch.testing.assert_close(result["state"][name], expected, rtol=0, atol=1e-5, msg=name)
    # the only statistics collective: one K×3 float64 all_reduce per step, counted, not assumed
    if result["mode"] == "replicated":  # ZeRO-0: every rank holds the full averaged gradient
        assert result["sent"] == [] and result["reduced"] == [0] * STEPS
    else:
        assert result["sent"] == [(NUM_BLOCKS * 3, torch.float64)] * STEPS
        assert result["reduced"] == [NUM_BLOCKS * 3] * STEPS


@pytest.mark.parametrize("stage", OFFLOAD_STAGES)
def test_optimizer_offload_at_zero_1_and_2_matches_the_single_process_step(distributed_results, stage):
    """Steps after the first too: DeepSpeed's offload path would add the previous step's g_f
    to the new one (it takes the second backward of a step for gradient accumulation)."""
    result = distributed_results[(stage, "offload")]
    assert result["offloaded"]
    for name, expected in run_reference(*CASES["hamu-q"]).items():
        torch.testing.assert_close(result["state"][name], expected, rtol=0, atol=1e-5, msg=name)


def test_every_stage_used_its_own_gradient_layout(distributed_results):
    modes = {stage: distributed_results[(stage, "gdiff")]["mode"] for stage in STAGES}
    assert modes == {0: "replicated", 1: "fragments", 2: "fragments", 3: "zero3"}


@pytest.mark.parametrize("stage", BF16_STAGES)
def test_bf16_tracks_the_fp32_reference_to_bf16_accuracy(distributed_results, stage):
    """The bf16 run's deviation from the fp32 run is small against the update itself (an absolute
    tolerance on the weights would hide most of a small update)."""
    reference = run_reference(*CASES["hamu-q"])
    initial = make_model().state_dict()
    for name, expected in reference.items():
        update = (expected - initial[name]).norm()
        deviation = (distributed_results[(stage, "bf16")]["state"][name] - expected).norm()
        assert update > 0 and deviation <= BF16_SHARE_OF_UPDATE * update, (name, float(deviation / update))


@pytest.mark.parametrize("stage", METHOD_STAGES)
@pytest.mark.parametrize("case", METHOD_CASES)
def test_objectives_and_implicit_surgery_match_the_single_process_run(distributed_results, stage, case):
    """Reference-model objectives (the frozen original partitioned under ZeRO-3) and the dual
    weight of implicit surgery (retain losses averaged over ranks) reproduce one process."""
    reference, weight = run_method_reference(case)
    result = distributed_results[(stage, case)]
    for name, expected in reference.items():
        torch.testing.assert_close(result["state"][name], expected, rtol=0, atol=1e-5, msg=name)
    if weight is not None:
        assert result["weight"] == pytest.approx(weight, abs=1e-6) and weight != 1.0


def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports_after():
    """A worker's DeepSpeed import skips the autotuner's MLflow import (seconds of every start);
    MLflow is still there for whoever imports it next, and a process that has it keeps it."""
    import subprocess

    script = ("import sys\n"
              "from hamu_ray.engine.deepspeed_engine import import_deepspeed\n"
              "deepspeed = import_deepspeed()\n"
              "assert deepspeed.initialize and 'mlflow' not in sys.modules, sorted(sys.modules)\n"
              "import mlflow\n"
              "assert mlflow.MlflowClient and import_deepspeed() is deepspeed\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-2000:]
