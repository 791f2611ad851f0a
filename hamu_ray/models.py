"""Built-in models, loaded from safetensors; the input weights file is only ever read."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from hamu_ray.config import ModelSection


def build_model(cfg: ModelSection) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(cfg.sizes[:-1], cfg.sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(cfg.sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    return model


def load_weights(model: torch.nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.weights: no such file {path}")
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"model.weights {path} does not fit model.sizes: missing {missing}, "
                         f"unexpected {unexpected}")
