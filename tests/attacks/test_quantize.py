"""The quantizer against hand-computed grids, a bound on what int8 does to a model's outputs,
and what it must leave alone (the given model, embeddings, the output head and its tie)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hamu_ray.attacks.quantize import fake_quantize


def linear(weight: list[list[float]], bias: list[float] | None = None) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return layer


def test_int4_by_hand_groups_of_128_the_last_one_ragged():
    """int4: s = max|w| / 7.5 per row and group of 128 input columns; 130 columns make a group
    of 128 (the first 4 columns below, then zeros) and a last group of 2. Values chosen so every
    s is a power of 2 (exact in float)."""
    zeros = [0.0] * 124
    layer = linear([[1.875, -0.9375, 0.625, 0.125, *zeros, -3.75, 1.25],
                    [0.0, 0.0, 0.0, 0.0, *zeros, 0.0, -0.46875]], bias=[0.3, -0.7])
    quantized = fake_quantize(layer, 4)
    # row 0, group 1: s = 1.875/7.5 = 0.25; w/s = 7.5, -3.75, 2.5, 0.5 → round half to even 8
    #   (clamped to 7: the grid's top), -4, 2, 0 → ŵ = 1.75, -1, 0.5, 0
    # row 0, group 2 (ragged): s = 3.75/7.5 = 0.5; w/s = -7.5, 2.5 → -8 (the grid's bottom, kept), 2
    # row 1, group 1: all zero, stays zero; group 2: s = 0.46875/7.5 = 0.0625; 0, -7.5 → 0, -8
    expected = torch.tensor([[1.75, -1.0, 0.5, 0.0, *zeros, -4.0, 1.0],
                             [0.0, 0.0, 0.0, 0.0, *zeros, 0.0, -0.5]])
    torch.testing.assert_close(quantized.weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(quantized.bias, torch.tensor([0.3, -0.7]), rtol=0, atol=0)  # biases stay


def test_int8_by_hand_one_scale_per_output_channel():
    """int8: s = max|w| / 127.5 per output row, over all its input columns (200 > 128: one group)."""
    zeros = [0.0] * 196
    layer = linear([[1.9921875, 0.0078125, 0.0234375, -1.0, *zeros],
                    [-1.9921875, 0.01171875, 0.5, 0.0, *zeros]])
    quantized = fake_quantize(layer, 8)
    # both rows: s = 1.9921875/127.5 = 1/64. Row 0: w/s = 127.5 → 128 → clamped 127, 0.5 → 0,
    # 1.5 → 2, -64. Row 1: -127.5 → -128 (kept), 0.75 → 1, 32, 0
    expected = torch.tensor([[127 / 64, 0.0, 2 / 64, -1.0, *zeros], [-2.0, 1 / 64, 0.5, 0.0, *zeros]])
    torch.testing.assert_close(quantized.weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [3, 16, 0, True, "4"])
def test_bits_outside_8_and_4_are_refused(bits):
    with pytest.raises(ValueError, match=r"bits .*supports \[8, 4\] bits"):
        fake_quantize(nn.Linear(4, 4), bits)


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def output_error_bound(model: nn.Sequential, quantized: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A bound on |f̂(x) − f(x)| per output, from the int8 scales alone: a linear layer's error is
    |Ŵ x̂ − W x| ≤ |Ŵ| |x̂ − x| + |Ŵ − W| |x|, and |Ŵ − W| ≤ s/2 elementwise (s = max|w|/127.5
    per output row) gives |Ŵ − W| |x| ≤ s/2 · ‖x‖₁; ReLU is 1-Lipschitz and keeps it."""
    error = torch.zeros_like(x)
    for layer, layer_q in zip(model, quantized):
        if isinstance(layer, nn.Linear):
            scale = layer.weight.abs().amax(dim=1) / 127.5  # [out]
            error = error @ layer_q.weight.abs().T + scale / 2 * x.abs().sum(dim=1, keepdim=True)
        x = layer(x)
    return error


def test_int8_changes_an_mlps_outputs_by_less_than_the_bound_from_its_scales():
    model, x = mlp(0), torch.randn(32, 20, generator=torch.Generator().manual_seed(1))
    quantized = fake_quantize(model, 8)
    with torch.no_grad():
        change = (quantized(x) - model(x)).abs()
        bound = output_error_bound(model, quantized, x)
    assert (change <= bound + 1e-6).all()  # a worst case: here ≈ 100× the change (0.0027)
    assert change.max() > 0  # it did quantize


def test_the_given_model_is_left_as_it_was():
    model = mlp(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = fake_quantize(model, 4)
    assert quantized is not model
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert not torch.equal(quantized[0].weight, model[0].weight)


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # hidden 160, intermediate 200: int4 groups of 128 + 32 and 128 + 72
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=160, intermediate_size=200,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=tied))


def check_grid(original: torch.Tensor, quantized: torch.Tensor, bits: int, group_size: int) -> None:
    """Per row and group of `group_size` input columns, with s = max|w| / (2^(b-1) - 1/2) of the
    original weights: ŵ / s is an integer of the signed b-bit range, and |ŵ − w| ≤ s/2."""
    levels = 2 ** (bits - 1)
    for w, w_hat in zip(original.split(group_size, dim=1), quantized.split(group_size, dim=1)):
        scale = w.abs().amax(dim=1, keepdim=True) / (levels - 0.5)
        q = w_hat / scale
        assert (q - q.round()).abs().max() < 1e-3
        assert q.round().min() >= -levels and q.round().max() <= levels - 1
        assert ((w_hat - w).abs() <= scale / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("tied", [False, True])
def test_a_llamas_linear_layers_are_quantized_and_its_embeddings_and_head_are_not(tied):
    model = tiny_llama(tied)
    quantized = fake_quantize(model, 4)
    names = [n for n, m in quantized.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    modules = dict(quantized.named_modules())
    originals = dict(model.named_modules())
    for name in names:
        check_grid(originals[name].weight.detach(), modules[name].weight.detach(), 4, 128)
        assert not torch.equal(modules[name].weight, originals[name].weight), name
    torch.testing.assert_close(quantized.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(quantized.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    assert (quantized.lm_head.weight is quantized.model.embed_tokens.weight) == tied


def test_int4_moves_a_llamas_logits_further_than_int8():
    model = tiny_llama(False)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        change = {bits: (fake_quantize(model, bits)(ids).logits - logits).abs().max() for bits in (8, 4)}
    assert 0 < change[8] < change[4] / 4, change
