"""Device placement on a CPU-only machine.

PyTorch's "meta" device is a second device that refuses to compute with CPU tensors, so a batch
or a reference model left on the CPU next to a model elsewhere fails here the way it would next
to a CUDA model. What meta cannot do is produce values, so the step itself (which copies its
statistics to the host) is checked on a real GPU by tests/test_gpu.py; here: the pieces the
worker composes — batch transfer, the reference model, the losses — and the rules (tests/rules/
test_device.py).
"""

from __future__ import annotations

import pytest
import torch

from hamu_ray import objectives
from hamu_ray.engine import data
from hamu_ray.engine import deepspeed_engine as eng
from hamu_ray.tasks import classifier as models
from hamu_ray.tasks.classifier import ClassifierModel as ModelSection

MODEL = ModelSection(sizes=[4, 3, 2])
DS_CONFIG = eng.deepspeed_config(stage=0, lr=0.1, micro_batch_size=2)


def scorer(model):
    return lambda batch: models.label_scores(model(batch["x"]), batch["y"])


def meta_model() -> torch.nn.Module:
    return models.build_model(MODEL).to("meta")


@pytest.mark.parametrize("method", ["npo", "scrub", "kl", "gdiff"])
def test_losses_run_on_the_engines_device_once_batches_and_reference_follow_it(method):
    model = meta_model()
    spec = objectives.METHODS[method]
    reference = eng.frozen_copy(models.build_model(MODEL), DS_CONFIG, "meta")
    retain_loss, forget_loss = objectives.loss_fns(spec, {}, scorer(model), scorer(reference))
    batch = {"x": torch.randn(2, 4), "y": torch.tensor([0, 1])}

    moved = data.to_device(batch, torch.device("meta"))
    assert {t.device.type for t in moved.values()} == {"meta"}
    assert retain_loss(moved).device.type == "meta" and forget_loss(moved).device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):  # the check is real: CPU rows fail
        retain_loss(batch)


def test_a_reference_left_on_the_cpu_is_caught():
    model = meta_model()
    reference = eng.frozen_copy(models.build_model(MODEL), DS_CONFIG, "cpu")
    _, forget_loss = objectives.loss_fns(objectives.METHODS["npo"], {}, scorer(model), scorer(reference))
    with pytest.raises((RuntimeError, NotImplementedError)):
        forget_loss(data.to_device({"x": torch.randn(2, 4), "y": torch.tensor([0, 1])}, "meta"))


def test_no_batch_is_no_transfer():
    assert data.to_device(None, "meta") is None


def offloaded_fragment(p: torch.nn.Parameter, fragment: torch.Tensor) -> None:
    """Link `p` to `fragment` the way DeepSpeed's ZeRO-1/2 optimizer does with optimizer offload:
    its own tensor_fragment, reading the offloaded gradient dictionary (here on meta)."""
    from deepspeed.utils.tensor_fragment import fragment_address, tensor_fragment

    address = fragment_address(numel=fragment.numel(), start=0)
    p._hp_mapping = tensor_fragment(lp_fragment=fragment, lp_fragment_address=address, hp_fragment=fragment,
                                    hp_fragment_address=address, gradient_dict={},
                                    offload_gradient_dict={0: [fragment]}, use_offload=True, param_group_index=0)
    p._index_in_param_group = 0


def test_ranks_without_a_fragment_place_their_empty_blocks_beside_the_offloaded_ones():
    """On a GPU, offloaded fragments are in CPU memory while the parameters are on the GPU: an
    empty block on the parameter's device made the statistics stack two devices (a crash at step
    1). Here meta plays the fragments' device, the CPU the parameters'."""
    from hamu_ray.engine.grads import local_fragments
    from hamu_ray.rules import BlockStats

    params = [torch.nn.Parameter(torch.zeros(3, 2)) for _ in range(3)]
    offloaded_fragment(params[1], torch.zeros(4, device="meta"))
    pieces = local_fragments(params, "cpu")
    assert [(g.device.type, g.numel()) for g in pieces] == [("meta", 0), ("meta", 4), ("meta", 0)]
    assert BlockStats.from_grads(pieces, pieces).rr.device.type == "meta"
    assert {g.device.type for g in local_fragments(params[:1], "cpu")} == {"cpu"}  # none held: `device`
