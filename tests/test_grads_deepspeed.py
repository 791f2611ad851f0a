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

from hamu_ray.grads import TorchGrads
from hamu_ray.rules import get_rule
from hamu_ray.step import unlearning_step

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


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch.distributed as dist

    from hamu_ray import engine as eng
    from hamu_ray.grads import DeepSpeedGrads
    from hamu_ray.step import SumAcrossRanks

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
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
                                      reduce_stats=SumAcrossRanks())
                reduced.append(out.reduced_values)
            results[(stage, case)] = {"state": eng.full_state_dict(engine), "sent": list(sent),
                                      "reduced": reduced, "mode": grads.mode}
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
                            reduce_stats=SumAcrossRanks())
        results[(stage, "bf16")] = {"state": eng.full_state_dict(engine), "mode": grads.mode}
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


def test_every_stage_used_its_own_gradient_layout(distributed_results):
    modes = {stage: distributed_results[(stage, "gdiff")]["mode"] for stage in STAGES}
    assert modes == {0: "replicated", 1: "fragments", 2: "fragments", 3: "zero3"}


@pytest.mark.parametrize("stage", BF16_STAGES)
def test_bf16_tracks_the_fp32_reference_to_bf16_accuracy(distributed_results, stage):
    reference = run_reference(*CASES["hamu-q"])
    for name, expected in reference.items():
        torch.testing.assert_close(distributed_results[(stage, "bf16")]["state"][name], expected,
                                   rtol=0, atol=2e-2, msg=name)
