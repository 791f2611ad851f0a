"""The classifier task: built-in models for small images (rows of floats and an integer label),
loaded from safetensors; a batch's log-likelihood is each label's log-probability (count 1).

`MODELS` maps `model.kind` to a builder. The input weights file is only ever read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from hamu_ray.errors import MissingInputError, ModelFileError
from hamu_ray.files import check_safetensors
from hamu_ray.objectives import Scores
from hamu_ray.schema import Section


EXPORT_WEIGHTS = "model.safetensors"  # the classifier's export: every parameter and buffer, fp32


class ClassifierModel(Section):
    kind: Literal["mlp", "cnn"] = "mlp"  # MODELS
    sizes: list[int] = Field(min_length=2)  # mlp: [inputs, hidden..., classes]; cnn: [inputs, classes]
    channels: list[int] = Field(default_factory=lambda: [16, 32])  # cnn: one residual block each
    weights: str | None = None  # safetensors of the model to unlearn; read, never written

    @model_validator(mode="after")
    def _shape(self) -> "ClassifierModel":
        if self.kind == "cnn":
            side = round(self.sizes[0] ** 0.5)
            if side * side != self.sizes[0] or len(self.sizes) != 2 or not self.channels:
                raise ValueError("a cnn takes square images: sizes [side², classes] and channels "
                                 f"[c1, ...]; got sizes {self.sizes}, channels {self.channels}")
        return self



def mlp(cfg: ClassifierModel) -> torch.nn.Module:
    """Linear layers of `sizes` = [inputs, hidden..., classes] with ReLU between them."""
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(cfg.sizes[:-1], cfg.sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(cfg.sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


class ResidualBlock(torch.nn.Module):
    """Two 3×3 convolutions with a skip; GroupNorm, not BatchNorm, so that the retain and the
    forget forward passes of one step do not disturb each other through running statistics."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.norm1 = torch.nn.GroupNorm(1, channels_out)
        self.conv2 = torch.nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.norm2 = torch.nn.GroupNorm(1, channels_out)
        self.skip = (torch.nn.Identity() if stride == 1 and channels_in == channels_out else
                     torch.nn.Conv2d(channels_in, channels_out, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(h)) + self.skip(x))


class SmallResNet(torch.nn.Module):
    """A ResNet-style CNN for flattened square grey images (rows of `side²` floats)."""

    def __init__(self, side: int, channels: list[int], num_classes: int):
        super().__init__()
        self.side = side
        self.stem = torch.nn.Conv2d(1, channels[0], 3, 1, 1)
        self.blocks = torch.nn.Sequential(*[
            ResidualBlock(c_in, c_out, stride=1 if i == 0 else 2)
            for i, (c_in, c_out) in enumerate(zip(channels[:1] + channels[:-1], channels))])
        self.head = torch.nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.stem(x.view(-1, 1, self.side, self.side))))
        return self.head(h.mean(dim=(2, 3)))


def cnn(cfg: ClassifierModel) -> torch.nn.Module:
    side = int(round(cfg.sizes[0] ** 0.5))
    return SmallResNet(side, cfg.channels, cfg.sizes[-1])


MODELS: dict[str, Callable[[ClassifierModel], torch.nn.Module]] = {"mlp": mlp, "cnn": cnn}


def build_model(cfg: ClassifierModel) -> torch.nn.Module:
    model = MODELS[cfg.kind](cfg)
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    return model


def check_weights(model_cfg: ClassifierModel, path: str, setting: str) -> None:
    """A weights file for this model, before anything loads it: present, whole
    (files.check_safetensors) and of the model's tensor names and shapes — read from the header
    against the model built on the meta device (nothing allocated, no data read)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise MissingInputError(f"{setting}: no such file {path}")
    check_safetensors(path, setting)
    with torch.device("meta"):
        model = build_model(model_cfg.model_copy(update={"weights": None}))
    with safe_open(path, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != expected:
        wrong = sorted(k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k))
        raise ModelFileError(f"{setting} {path} does not fit the model: "
                             + ", ".join(f"{k} {shapes.get(k, 'missing')} vs {expected.get(k, 'not in the model')}"
                                         for k in wrong[:4]))


def load_weights(model: torch.nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise MissingInputError(f"model.weights: no such file {path}")
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"model.weights {path} does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")


def per_example_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


def label_scores(logits: torch.Tensor, labels: torch.Tensor) -> Scores:
    """Each example's one target is its label: log p(y|x), count 1, the logits as one position."""
    logits = logits.float()
    logprob = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]
    ones = torch.ones_like(logprob)
    return Scores(logprob, ones, logits[:, None, :], ones[:, None].bool())


class ClassifierTask:
    """Rows: `data.input_column` (a list of floats) and `data.label_column` (an integer class)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32

    def columns(self, role: str | None = None) -> list[str]:
        return [self.cfg.data.input_column, self.cfg.data.label_column]

    def prepare(self, rows, role: str):
        return rows  # used as they are

    def check_prepared(self, prepared, role: str, path: str) -> dict[str, int]:
        return {}

    def prepared_lines(self, prepared: dict[str, dict[str, int]]) -> list[str]:
        return []

    def check_model(self) -> None:
        if self.cfg.model.weights is not None:
            check_weights(self.cfg.model, self.cfg.model.weights, "model.weights")

    def import_model_code(self) -> None:
        pass  # torch.nn only, imported already

    def build(self, ds_config: dict) -> torch.nn.Module:
        return build_model(self.cfg.model)

    def make_batch(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        x, y = rows[self.cfg.data.input_column], rows[self.cfg.data.label_column]
        return {"x": torch.as_tensor(np.stack(x) if x.dtype == object else x, dtype=torch.float32),
                "y": torch.as_tensor(np.asarray(y), dtype=torch.long)}

    def scores(self, model, batch: dict[str, torch.Tensor]) -> Scores:
        return label_scores(model(batch["x"].to(self.dtype)), batch["y"])

    def reference(self, engine, ds_config: dict):
        from hamu_ray.engine import deepspeed_engine as eng

        forward = eng.frozen_copy(self.build(ds_config), ds_config, engine.device)

        @torch.no_grad()
        def reference(batch: dict) -> Scores:
            return self.scores(forward, batch)
        return reference

    def export(self, engine, directory: Path | None) -> None:
        from hamu_ray.engine import deepspeed_engine as eng

        state = eng.full_state_dict(engine)
        if directory is not None:
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(directory) / EXPORT_WEIGHTS))
