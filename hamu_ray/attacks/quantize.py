"""Fake quantization of a model's linear layers: round-to-nearest, symmetric, weights only.

Each nn.Linear weight W [out, in] is cut along its input dimension into groups (int8: one group
per output row, i.e. per output channel; int4: groups of 128 input columns, the last one
smaller when `in` is not a multiple of 128). Per group, with b bits:

    s = max|w| / (2^(b-1) - 1/2)                      (the scale)
    q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)     (round half to even, torch.round)
    ŵ = s · q

the signed b-bit grid of AutoGPTQ's symmetric quantizer (2^b levels over [-max|w|, max|w|]).
Only +max|w| can leave the grid (w/s = 2^(b-1) - 1/2 rounds up to 2^(b-1) and is clamped one
level down), so every weight moves by at most s/2. An all-zero group stays zero. The result is
stored back in the weight's dtype (bf16 rounds s·q once more): a float model that computes as
the quantized one would, which is all an evaluation needs.

What is not quantized, as in GPTQ, AWQ and bitsandbytes by default: biases, embeddings
(nn.Embedding), norms, and the output head of a Hugging Face model (get_output_embeddings(),
the lm_head). A head tied to the input embedding is therefore never touched, and the tie holds
(the copy keeps shared parameters shared); a linear weight shared by several modules is
quantized once.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

GROUP_SIZE = {8: None, 4: 128}  # bits → input columns per group (None: the whole row)


def fake_quantize(model: nn.Module, bits: int) -> nn.Module:
    """A copy of `model` whose linear weights are fake-quantized to `bits` (8 or 4); the given
    model is left as it was."""
    if isinstance(bits, bool) or bits not in GROUP_SIZE:
        raise ValueError(f"bits {bits!r}: fake quantization supports {sorted(GROUP_SIZE, reverse=True)} bits "
                         "(int8 per output channel, int4 in groups of 128)")
    quantized = copy.deepcopy(model)
    for weight in quantized_weights(quantized):
        with torch.no_grad():
            weight.copy_(quantize_weight(weight, bits, GROUP_SIZE[bits]))
    return quantized


def quantized_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights fake_quantize changes: every nn.Linear's, once each, but those shared with
    the output head or an embedding."""
    kept = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        kept.add(id(head.weight))
    weights: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in kept:
            weights.setdefault(id(module.weight), module.weight)
    return list(weights.values())


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """ŵ of a [out, in] weight, groups of `group_size` input columns (None: one per row)."""
    w = weight.detach().float()
    size = w.shape[1] if group_size is None else group_size
    pieces = [quantize_group(piece, bits) for piece in w.split(size, dim=1)]  # the last may be narrower
    return torch.cat(pieces, dim=1).to(weight.dtype)


def quantize_group(w: torch.Tensor, bits: int) -> torch.Tensor:
    """s·q row by row of w [out, g]: one scale per row of the group."""
    levels = 2 ** (bits - 1)
    scale = w.abs().amax(dim=1, keepdim=True) / (levels - 0.5)  # [out, 1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: q = 0
    q = torch.clamp(torch.round(w / scale), -levels, levels - 1)
    return scale * q
