"""Where gradients live: the only module that knows how each backend stores them.

A gradient access object exposes, for every block (a trainable parameter tensor), this
process's local piece of the reduced gradient as a writable tensor, plus backward / zero / step.
The unlearning step (hamu_ray.step) is written against this interface only.
"""

from __future__ import annotations

from typing import Protocol

import torch


class GradAccess(Protocol):
    def backward(self, loss: torch.Tensor) -> None: ...

    def local_grads(self) -> list[torch.Tensor]:
        """One writable tensor per block, in a fixed order identical on every rank."""
        ...

    def zero_grads(self) -> None: ...

    def step(self) -> None: ...


class TorchGrads:
    """A plain torch model and optimizer in one process: the local piece is the whole p.grad."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def local_grads(self) -> list[torch.Tensor]:
        for p in self.params:
            if p.grad is None:  # unused by this loss: its gradient is exactly zero
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def zero_grads(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def step(self) -> None:
        self.optimizer.step()
