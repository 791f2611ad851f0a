"""The model registry: built-in classifiers for small images, loaded from safetensors.

One table, `MODELS`, maps `model.kind` to a builder; the LM work adds its kinds here. The input
weights file is only ever read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from hamu_ray.engine.config import ModelSection
from hamu_ray.errors import MissingInputError


def mlp(cfg: ModelSection) -> torch.nn.Module:
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


def cnn(cfg: ModelSection) -> torch.nn.Module:
    side = int(round(cfg.sizes[0] ** 0.5))
    return SmallResNet(side, cfg.channels, cfg.sizes[-1])


MODELS: dict[str, Callable[[ModelSection], torch.nn.Module]] = {"mlp": mlp, "cnn": cnn}


def build_model(cfg: ModelSection) -> torch.nn.Module:
    model = MODELS[cfg.kind](cfg)
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    return model


def load_weights(model: torch.nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise MissingInputError(f"model.weights: no such file {path}")
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"model.weights {path} does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
