"""Where gradients live: the only module that knows how each backend stores them.

A gradient access object exposes, for every block (a trainable parameter tensor), this process's
local piece of the reduced gradient, lets the step write a new value back, and runs backward,
zero and step. The unlearning step (hamu_ray.engine.step) is written against this interface only.

  backend                 local piece of block b                         stats need a reduction
  TorchGrads              p.grad (one process)                           no
  DeepSpeed ZeRO-0        p.grad, already all-reduced on every rank      no (identical on all ranks)
  DeepSpeed ZeRO-1/2      this rank's fragment of the partitioned        yes: disjoint shards
                          gradient (empty where the rank holds none);
                          with optimizer offload, of the fp32 gradient
                          partition in CPU memory
  DeepSpeed ZeRO-3        safe_get_local_grad(p) (padded local shard),   yes: disjoint shards
                          fp32 on the accelerator (DeepSpeed 0.19: a
                          copy in bf16 or with offload)
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class GradAccess(Protocol):
    holds_full_gradient: bool  # True: local statistics are already global, no reduction

    def backward(self, loss: torch.Tensor) -> None: ...

    def local_grads(self) -> list[torch.Tensor]:
        """One tensor per block, the same K blocks in the same order on every rank."""
        ...

    def take_local_grads(self) -> list[torch.Tensor]:
        """The local pieces as tensors the next backward will not touch (moved out or copied)."""
        ...

    def write_local_grads(self, grads: list[torch.Tensor]) -> None: ...

    def zero_grads(self) -> None: ...

    def step(self) -> None: ...


class TorchGrads:
    """A plain torch model and optimizer in one process: the local piece is the whole p.grad."""

    holds_full_gradient = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def local_grads(self) -> list[torch.Tensor]:
        return [_grad_or_zeros(p) for p in self.params]

    def take_local_grads(self) -> list[torch.Tensor]:
        taken = self.local_grads()
        for p in self.params:  # the next backward writes fresh tensors: no copy, no zeroing
            p.grad = None
        return taken

    def write_local_grads(self, grads: list[torch.Tensor]) -> None:
        _copy_unless_same(self.local_grads(), grads)

    def zero_grads(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def step(self) -> None:
        self.optimizer.step()


class DeepSpeedGrads:
    """A DeepSpeed engine, ZeRO stage 0 to 3, fp32 or bf16.

    With gradient_accumulation_steps = 1 a second backward replaces the ZeRO-1/2 fragments but
    adds into ZeRO-3's: zero_grads() between the two backwards is required, not cosmetic.
    In bf16 the gradient buffers are bf16: statistics are only bf16-accurate.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        stage = engine.zero_optimization_stage()
        if stage == 3:
            self.mode = "zero3"
        elif any(hasattr(p, "_hp_mapping") for p in self.params):
            self.mode = "fragments"  # ZeRO-1/2, and the bf16 optimizer at stage 0
        else:
            self.mode = "replicated"
        self.holds_full_gradient = self.mode == "replicated"
        self.offloads_fragments = self.mode == "fragments" and engine.zero_cpu_offload()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def local_grads(self) -> list[torch.Tensor]:
        if self.mode == "zero3":
            from deepspeed.utils import safe_get_local_grad

            return [safe_get_local_grad(p) for p in self.params]
        if self.mode == "fragments":
            return local_fragments(self.params, self.engine.device)
        return [_grad_or_zeros(p) for p in self.params]

    def take_local_grads(self) -> list[torch.Tensor]:
        return [g.detach().clone() for g in self.local_grads()]  # views into DeepSpeed's buffers

    def write_local_grads(self, grads: list[torch.Tensor]) -> None:
        if self.mode == "zero3":
            from deepspeed.utils import safe_set_local_grad

            for p, g in zip(self.params, grads):
                safe_set_local_grad(p, g)
        else:
            _copy_unless_same(self.local_grads(), grads)

    def zero_grads(self) -> None:
        if self.mode == "replicated":
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()
        else:
            self.engine.optimizer.zero_grad()
        if self.offloads_fragments:
            # DeepSpeed 0.19's ZeRO-1/2 offload takes every backward after a step's first for a
            # gradient-accumulation micro-step and adds to it a CPU copy it keeps of an earlier
            # backward's gradient (the previous step's g_f): here each backward starts afresh
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            self.engine.optimizer.micro_step_id = INITIAL_MICRO_STEP_ID

    def step(self) -> None:
        self.engine.step()


def local_fragments(params: list[torch.nn.Parameter], device: torch.device | str) -> list[torch.Tensor]:
    """This rank's ZeRO-1/2 fragment of each parameter's gradient, an empty block where it holds
    none (K stays aligned across ranks). The empty blocks go where the fragments are: on the
    accelerator, or in CPU memory when the optimizer is offloaded (views of the fp32 partition's
    gradient), so the statistics stack on one device; on `device` when the rank holds none."""
    fragments = []
    for p in params:
        mapping = getattr(p, "_hp_mapping", None)
        fragments.append(None if mapping is None else mapping.get_lp_grad_fragment(p._index_in_param_group))
    where = next((f.device for f in fragments if f is not None), torch.device(device))
    return [torch.zeros(0, dtype=torch.float32, device=where) if f is None else f for f in fragments]


def _grad_or_zeros(p: torch.nn.Parameter) -> torch.Tensor:
    if p.grad is None:  # unused by this loss: its gradient is exactly zero
        p.grad = torch.zeros_like(p)
    return p.grad


def _copy_unless_same(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for dst, src in zip(targets, sources):
        if dst.data_ptr() != src.data_ptr() or dst.shape != src.shape:
            dst.copy_(src)
