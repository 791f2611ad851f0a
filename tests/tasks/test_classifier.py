"""The model registry: both built-in kinds build from a config, run a HAMU step, and round-trip
through safetensors (the path every stage uses to hand a model to the next)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hamu_ray.tasks.classifier import ClassifierModel as ModelSection
from hamu_ray.engine.grads import TorchGrads
from hamu_ray.tasks.classifier import MODELS, build_model
from hamu_ray.rules import get_rule
from hamu_ray.engine.step import unlearning_step

CONFIGS = {"mlp": ModelSection(kind="mlp", sizes=[64, 32, 10]),
           "cnn": ModelSection(kind="cnn", sizes=[64, 10], channels=[4, 8])}


@pytest.mark.parametrize("kind", MODELS)
def test_each_kind_builds_steps_and_round_trips(kind, tmp_path):
    torch.manual_seed(0)
    model = build_model(CONFIGS[kind])
    x, y = torch.rand(12, 64), torch.randint(10, (12,))
    assert model(x).shape == (12, 10)

    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=0.1))
    out = unlearning_step(grads, get_rule("hamu-q", constraint=0.01, radius=0.05), lr=0.1,
                          retain_loss=lambda: F.cross_entropy(model(x[:6]), y[:6]),
                          forget_loss=lambda: F.cross_entropy(model(x[6:]), y[6:]))
    assert out.stepped and out.result.diagnostics["forget_gain"] >= 0.01 - 1e-9

    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = build_model(CONFIGS[kind].model_copy(update={"weights": str(path)}))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_file(build_model(CONFIGS["mlp"]).state_dict(), str(path))
    with pytest.raises(ValueError, match="does not fit the model"):
        build_model(CONFIGS["cnn"].model_copy(update={"weights": str(path)}))


def test_unusable_weights_files_are_refused_on_the_driver_naming_the_file(tmp_path):
    from hamu_ray.engine.config import parse_config
    from hamu_ray.errors import ModelFileError
    from hamu_ray.tasks.classifier import ClassifierTask

    good = tmp_path / "good.safetensors"
    save_file(build_model(CONFIGS["mlp"]).state_dict(), str(good))
    blob = good.read_bytes()
    cases = {"truncated.safetensors": (blob[:-10], "truncated: "),
             "garbage.safetensors": (b"not a safetensors file at all", "not a safetensors file"),
             "other.safetensors": (None, r"does not fit the model: 0.bias \(16,\) vs \(32,\), 0.weight")}
    save_file(build_model(ModelSection(kind="mlp", sizes=[64, 16, 10])).state_dict(), str(tmp_path / "other.safetensors"))

    def task(weights):
        return ClassifierTask(parse_config({
            "data": {"forget": "f.parquet", "retain": "r.parquet"}, "method": {"name": "gdiff"},
            "model": {"kind": "mlp", "sizes": [64, 32, 10], "weights": str(weights)},
            "train": {"lr": 0.1}, "output_dir": str(tmp_path / "out")}))

    task(good).check_model()
    for name, (content, needle) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelFileError, match=f"model.weights {tmp_path / name}.*{needle}"):
            task(tmp_path / name).check_model()


def test_a_cnn_needs_square_images():
    with pytest.raises(ValueError, match="square images"):
        ModelSection(kind="cnn", sizes=[60, 10])
