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
    assert size.largest_layer == size.largest_trainable == model.lm_head.weight.numel()  # vocab × hidden, untied
    lora = LoraSection(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora_size = plan.model_size(tiny_lm, lora)
    assert lora_size.trainable == trainable > 0
    assert lora_size.largest_trainable == max(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_the_8b_full_job_by_hand():
    cfg = load_config(REPO / "cluster" / "jobs" / "llama-8b-full.yaml")
    p = plan.plan(cfg, model_config=str(LLAMA_8B))
    P, L, N = 8_030_261_248, 128_256 * 4096, 8  # Llama-3.1-8B; the largest layer: embeddings
    assert p.params == P
    # DeepSpeed's ZeRO-3 estimate without offload: 4·L + 18·P/N bytes per GPU
    assert p.model_states_gpu_gb == pytest.approx((4 * L + 18 * P / N) / GB, abs=0.01)
    # bf16: DeepSpeed hands out g_r and g_f as fp32 copies of the local shard
    assert p.hamu_gpu_gb == pytest.approx(8 * P / N / GB, abs=0.001)
    assert p.reference_gpu_gb == 0 and p.frozen_gpu_gb == 0  # hamu-q needs no reference
    # ZeRO-3's working memory in bf16: the reduce bucket and its flat copy (5e8 elements each),
    # and 1e9 parameters held gathered (max_live_parameters; the model is larger)
    assert p.working_gb == pytest.approx((2 * 2 * 5e8 + 2 * 1e9) / GB, abs=0.001)
    # activations at 4 rows × 512 tokens with checkpointing: at least the 32 layers' inputs
    assert p.activations_gb > 32 * 4 * 512 * 4096 * 2 / GB
    assert p.total_gpu_gb == pytest.approx((4 * L + 18 * P / N + 8 * P / N) / GB + p.working_gb + p.activations_gb,
                                           abs=0.01) and p.fits


def test_activations_counted_on_the_meta_device_equal_a_real_backwards_saved_tensors(tiny_lm):
    """The plan's count (meta device, no memory) against the same model really run: every
    storage autograd saves for the backward, the parameters' not. The meta device runs attention
    as the math kernel does (its softmax weights saved); the fused CPU kernel keeps less, so the
    count is exact under the math kernel and an upper bound otherwise."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(3, 1000, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)  # a padded batch's mask (here nothing padded)

    def saved_bytes() -> int:
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask, labels=ids)
        return sum(saved.values())

    counted = plan.activation_bytes(tiny_lm, rows=3, seq_len=20, bf16=False)
    with sdpa_kernel(SDPBackend.MATH):
        assert counted == saved_bytes()
    assert saved_bytes() < counted




# Llama-3.1-8B on one node of 8 GPUs: T parameters, all trainable; its largest tensor the embedding
T, BLOCK, N8 = 8_030_261_248, 128_256 * 4096, 8


@pytest.mark.parametrize("stage,offload,bf16,gpu,cpu", [
    (3, "none", False, 4 * T / N8, 0),  # g_r an fp32 copy, g_f a view of the fp32 partition
    (3, "none", True, 8 * T / N8, 0),  # bf16 partition: g_f an fp32 copy too
    (3, "optimizer", True, 8 * T / N8, 0),  # offload: both copied to the GPU, nothing on the CPU
    (3, "all", False, 8 * T / N8, 0),
    (2, "none", False, 4 * T / N8, 0),
    (2, "none", True, 2 * T / N8 + 8 * BLOCK, 0),  # bf16 g_r + the statistics' fp32 block pair
    (1, "optimizer", True, 0, 4 * T / N8),  # fp32 fragments in CPU memory
    (0, "none", True, 2 * T + 8 * BLOCK, 0),  # the whole gradient on every GPU
], ids=["3-fp32", "3-bf16", "3-bf16-offload", "3-fp32-offload-all", "2-fp32", "2-bf16", "1-bf16-offload", "0-bf16"])
def test_gradient_copies_by_hand(stage, offload, bf16, gpu, cpu):
    assert plan.gradient_copies(stage=stage, offload=offload, bf16=bf16, trainable=T, largest_block=BLOCK,
                                gpus=N8) == pytest.approx((gpu, cpu))


def test_on_cpu_workers_an_offloaded_fp32_zero3_gradient_is_handed_out_as_it_is():
    # the accelerator is the CPU: `.to(accelerator).float()` of an fp32 CPU shard is the shard
    kwargs = dict(stage=3, offload="optimizer", trainable=T, largest_block=BLOCK, gpus=N8, device="cpu")
    assert plan.gradient_copies(bf16=False, **kwargs) == (4 * T / N8, 0.0)  # g_r only
    assert plan.gradient_copies(bf16=True, **kwargs) == (8 * T / N8, 0.0)  # .float() of bf16 copies


def test_zero3_states_as_deepspeed_allocates_them():
    kwargs = dict(trainable=T, gpus=N8, optimizer="SGD")
    fp32 = plan.zero3_states(bf16=False, offload="none", **kwargs)
    assert fp32["fp32 master"] == (0.0, "accelerator")  # the fp32 partition is the master
    assert sum(b for b, _ in fp32.values()) == 8 * T / N8  # parameters + gradients
    offloaded = plan.zero3_states(bf16=True, offload="optimizer", **{**kwargs, "optimizer": "AdamW"})
    assert offloaded == {"parameters": (2 * T / N8, "accelerator"), "fp32 master": (4 * T / N8, "host"),
                         "gradients": (2 * T / N8, "host"), "optimizer": (8 * T / N8, "host")}


def test_only_two_backward_methods_hold_gradient_copies_and_offload_counts_them_per_node():
    raw = load_config(REPO / "cluster" / "jobs" / "llama-8b-full.yaml").model_dump()
    raw["train"].update(zero_stage=2, offload="optimizer")
    offloaded = plan.plan(parse_config(raw), model_config=str(LLAMA_8B))
    assert offloaded.hamu_gpu_gb == 0 and offloaded.hamu_cpu_gb == pytest.approx(8 * 4 * T / N8 / GB, abs=0.01)
    raw["method"] = {"name": "surgery-implicit"}  # one backward on L_u + w·L_r: no copy kept
    assert plan.plan(parse_config(raw), model_config=str(LLAMA_8B)).hamu_cpu_gb == 0


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


def test_the_command_plans_cpu_workers_at_zero3_and_refuses_other_stages(tiny_lm, tmp_path, capsys):
    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "data": {"forget": str(tmp_path / "f.parquet"), "retain": str(tmp_path / "r.parquet"),
                 "retain_batch_size": 4, "forget_batch_size": 2, "text": {"format": "qa", "max_length": 32}},
        "model": {"kind": "causal_lm", "path": str(tiny_lm)},
        "method": {"name": "hamu-q", "hparams": {"constraint": 0.01}},
        "train": {"lr": 0.01, "zero_stage": 3}, "cluster": {"num_workers": 2}}))
    assert cli.main(["plan", str(job), "--device", "cpu", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["device"] == "cpu" and planned["gpus"] == 2
    # the larger batch (4 rows) at max_length, as activation_bytes counts it
    assert planned["activations_gb"] == round(plan.activation_bytes(tiny_lm, rows=4, seq_len=32, bf16=False) / GB, 3)
    assert cli.main(["plan", str(job), "--device", "cpu", "train.zero_stage=2"]) == 2
    assert "--device cpu sizes ZeRO-3 jobs (the stage measured on CPU workers); train.zero_stage is 2" in \
        capsys.readouterr().err


# ---- the evaluation after the last step (worker.evaluate) ------------------------------------
P8 = 8_030_261_248  # Llama-3.1-8B's parameters


def evaluating_job(name="llama-8b-full", *, workers=2, stage=3, whole_model=True):
    raw = load_config(REPO / "cluster" / "jobs" / f"{name}.yaml").model_dump()
    raw["cluster"]["num_workers"] = workers
    raw["train"]["zero_stage"] = stage
    raw["evaluation"] = {"sets": {"forget": "/mnt/cluster_storage/data/forget.parquet"}, "whole_model": whole_model}
    return plan.plan(parse_config(raw), model_config=str(LLAMA_8B))


def test_a_zero3_evaluation_with_whole_copies_adds_every_parameter_at_the_models_dtype():
    whole, partitioned = evaluating_job(whole_model=True), evaluating_job(whole_model=False)
    assert (whole.evaluation, partitioned.evaluation) == ("whole", "partitioned")
    assert whole.evaluation_copy_gb == pytest.approx(2 * P8 / GB, abs=0.001)  # bf16: 2 bytes each
    assert whole.evaluation_gb - partitioned.evaluation_gb == pytest.approx(2 * P8 / GB, abs=0.002)
    # the step's gradient copies and activations are freed; the engine's states stay
    assert partitioned.evaluation_gb == pytest.approx(
        whole.model_states_gpu_gb + whole.frozen_gpu_gb + whole.reference_gpu_gb + whole.working_gb, abs=0.002)
    # on 2 GPUs the step's g_r and g_f (8·P/2) outweigh the copy (2·P): the step decides
    assert whole.total_gpu_gb == whole.training_gb == partitioned.total_gpu_gb
    # on 8 (the cluster job) they are 8·P/8 and the copy decides
    on8 = evaluating_job(workers=8)
    assert on8.total_gpu_gb == on8.evaluation_gb == pytest.approx(
        on8.training_gb - on8.hamu_gpu_gb - on8.activations_gb + 2 * P8 / GB, abs=0.003)
    assert "with the whole copy (16.061 GB)\n    (whole_model true: every rank" in plan.describe(on8)
    assert plan.as_dict(on8)["evaluation_why"] == "whole_model true: every rank fills a whole copy of the model"


def test_lora_adapters_are_copied_in_fp32():
    lora = evaluating_job("llama-8b-lora")
    T = lora.trainable_params  # peft keeps the adapters fp32 under a bf16 base (autocast_adapter_dtype)
    assert lora.evaluation_copy_gb == pytest.approx((2 * (lora.params - T) + 4 * T) / GB, abs=0.001)


@pytest.mark.parametrize("workers, stage", [(2, 0), (1, 3)], ids=["zero0", "one-worker"])
def test_no_copy_where_the_model_is_not_zero3_partitioned_over_ranks(workers, stage):
    p = evaluating_job(workers=workers, stage=stage, whole_model=True)
    assert p.evaluation == "partitioned" and p.evaluation_copy_gb == 0
    assert p.evaluation_gb == pytest.approx(p.training_gb - p.hamu_gpu_gb - p.activations_gb, abs=0.002)
    assert p.total_gpu_gb == p.training_gb


def test_auto_shows_the_peak_with_and_without_the_copy():
    auto, partitioned = evaluating_job(workers=8, whole_model="auto"), evaluating_job(workers=8, whole_model=False)
    # the copy is made only where twice it fits in free memory: the total counts the peak without it
    assert auto.evaluation == "auto" and auto.evaluation_gb == partitioned.evaluation_gb
    assert auto.evaluation_copy_gb == pytest.approx(2 * P8 / GB, abs=0.001)
    assert auto.total_gpu_gb == partitioned.total_gpu_gb
    with_copy = round(auto.evaluation_gb + auto.evaluation_copy_gb, 3)
    assert f"{auto.evaluation_gb} GB per GPU without the whole copy, {with_copy} GB with it" in plan.describe(auto)


def test_a_job_without_evaluation_plans_only_its_step():
    p = plan.plan(load_config(REPO / "cluster" / "jobs" / "llama-8b-full.yaml"), model_config=str(LLAMA_8B))
    assert (p.evaluation, p.evaluation_gb, p.total_gpu_gb) == ("none", 0, p.training_gb)
    assert "evaluation" not in plan.describe(p)
