"""`hamu-ray plan`: sizes from config.json alone, DeepSpeed's estimates plus HAMU's own terms,
checked against hand computations and against real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hamu_ray import cli, plan
from hamu_ray.engine.config import load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
LLAMA_8B = REPO / "cluster" / "models" / "llama-3.1-8b"
GB = 1e9


def test_sizes_from_the_config_equal_the_real_models(tiny_lm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hamu_ray.tasks.causal_lm import LoraSection

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    size = plan.model_size(tiny_lm)
    assert size.total == size.trainable == sum(p.numel() for p in model.parameters())
    assert size.largest_layer == model.lm_head.weight.numel()  # vocab × hidden, untied
    lora = LoraSection(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert plan.model_size(tiny_lm, lora).trainable == trainable > 0


def test_the_8b_full_job_by_hand():
    cfg = load_config(REPO / "cluster" / "jobs" / "llama-8b-full.yaml")
    p = plan.plan(cfg, model_config=str(LLAMA_8B))
    P, L, N = 8_030_261_248, 128_256 * 4096, 8  # Llama-3.1-8B; the largest layer: embeddings
    assert p.params == P
    # DeepSpeed's ZeRO-3 estimate without offload: 4·L + 18·P/N bytes per GPU
    assert p.model_states_gpu_gb == pytest.approx((4 * L + 18 * P / N) / GB, abs=0.01)
    assert p.hamu_gpu_gb == pytest.approx(4 * P / N / GB, abs=0.001)  # the kept fp32 g_r shard
    assert p.reference_gpu_gb == 0 and p.frozen_gpu_gb == 0  # hamu-q needs no reference
    assert p.total_gpu_gb == pytest.approx((4 * L + 18 * P / N + 4 * P / N) / GB, abs=0.01) and p.fits


def test_lora_counts_its_frozen_base_and_npo_without_lora_counts_a_reference_copy():
    cfg = load_config(REPO / "cluster" / "jobs" / "llama-8b-lora.yaml")
    lora = plan.plan(cfg, model_config=str(LLAMA_8B))
    assert lora.trainable_params == 20_971_520  # r 8 on every linear of 32 layers
    assert lora.frozen_gpu_gb == pytest.approx(2 * (lora.params - lora.trainable_params) / 8 / GB, abs=0.01)
    assert lora.reference_gpu_gb == 0  # the base under disable_adapter
    raw = cfg.model_dump()
    raw["model"]["lora"] = None
    full_npo = plan.plan(parse_config(raw), model_config=str(LLAMA_8B))
    assert full_npo.reference_gpu_gb == pytest.approx(2 * full_npo.params / 8 / GB, abs=0.01)


def test_the_command_prints_json_and_fails_when_it_does_not_fit(capsys):
    job = str(REPO / "cluster" / "jobs" / "llama-8b-full.yaml")
    assert cli.main(["plan", job, "--model-config", str(LLAMA_8B), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
    assert cli.main(["plan", job, "--model-config", str(LLAMA_8B), "--gpu-memory", "16"]) == 1
    assert "does NOT fit in 16.0 GB" in capsys.readouterr().out
    assert cli.main(["plan", job]) == 2  # the weights' directory is not on this machine
    assert "no config.json" in capsys.readouterr().err
