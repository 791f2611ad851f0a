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


def test_json_is_all_that_reaches_stdout_on_a_machine_without_a_gpu():
    """DeepSpeed guesses its accelerator at import and prints the guess on stdout, which made
    `plan --json` unreadable (a plan is for the cluster's GPUs, whatever this machine has)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user's shell
    done = subprocess.run([sys.executable, "-m", "hamu_ray.cli", "plan", "cluster/jobs/llama-8b-full.yaml",
                           "--model-config", str(LLAMA_8B), "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["params"] == 8_030_261_248
    assert "accelerator" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_a_pipeline_is_planned_by_its_methods_job(tiny_lm, tmp_path, capsys):
    import yaml

    from hamu_ray.files import write_rows

    sets = {name: str(write_rows([{"question": f"{name}?", "answer": "yes"}], tmp_path / f"{name}.parquet"))
            for name in ("forget", "retain")}  # your own files; their sets are not prepared yet
    raw = {"name": "byo", "output_dir": str(tmp_path / "run"), "data": {"source": "files", **sets},
           "model": {"kind": "causal_lm", "path": str(tiny_lm)}, "unlearn": {"lr": 0.01},
           "methods": [{"name": "gdiff"}, {"name": "npo", "label": "npo-slow"}], "cluster": {"num_workers": 2}}
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(raw))
    assert cli.main(["plan", str(pipeline)]) == 2  # a job is expected: say how to give one
    assert capsys.readouterr().err == (
        f"hamu-ray: {pipeline} is a pipeline (it has methods:), not a job (method: and output_dir:): "
        "`hamu-ray run` runs it; `hamu-ray plan` and `hamu-ray hardness` take the job of one of its "
        "methods with --method LABEL (e.g. --method gdiff)\n")
    assert cli.main(["plan", str(pipeline), "--method", "npo-slow", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)  # the pipeline's model and cluster
    assert (planned["model"], planned["gpus"], planned["params"]) == (str(tiny_lm), 2, plan.model_size(tiny_lm).total)
    assert cli.main(["plan", str(REPO / "cluster" / "jobs" / "llama-8b-full.yaml"), "--method", "npo"]) == 2
    assert "is a job, not a pipeline; leave --method out" in capsys.readouterr().err
