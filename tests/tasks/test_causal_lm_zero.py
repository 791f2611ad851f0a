"""The causal-LM task under DeepSpeed ZeRO-3 on 2 plain gloo processes (no Ray) against the
single-process step: partitioned as it is built, the same weights as one process, a frozen
reference (a partitioned copy, or the base under disable_adapter with LoRA), LoRA training only
its adapters, bf16 tracking fp32, and an export that loads back with from_pretrained."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from hamu_ray import objectives
from hamu_ray.engine.config import parse_config
from hamu_ray.engine.grads import TorchGrads
from hamu_ray.engine.step import unlearning_step
from hamu_ray.rules import get_rule
from hamu_ray.tasks.causal_lm import ADAPTER_DIR, MODEL_DIR, CausalLMTask
from tests.engine.test_grads_deepspeed import free_port
from tests.lm_fixtures import lm_batch, qa_rows

pytestmark = pytest.mark.integration

LR, STEPS, WORLD = 0.1, 3, 2
HAMU = {"name": "hamu-q", "hparams": {"constraint": 0.02, "radius": 0.2}}
CASES = {
    "hamu-q": {"method": HAMU},
    "npo": {"method": {"name": "npo", "objective": {"beta": 0.5}}},  # a partitioned reference copy
    "bf16": {"method": HAMU, "bf16": True},
    "checkpointing": {"method": HAMU, "gradient_checkpointing": True},
    "offload": {"method": HAMU, "offload": "all"},  # optimizer state and parameters in CPU memory
    "lora": {"method": {"name": "npo", "rule": "hamu-q", "hparams": HAMU["hparams"],
                        "objective": {"beta": 0.5}},
             "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "export_merged": True}},
    "zero2": {"method": {"name": "npo", "objective": {"beta": 0.5}}, "stage": 2},  # a whole reference copy
    # a base with dropout of its own (attention_dropout; peft skips lora_dropout with the
    # adapters off): the reference must score it in eval mode, the trained model in train mode
    "lora-dropout": {"method": {"name": "npo", "objective": {"beta": 0.5}}, "base_dropout": 0.5,
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.5, "target_modules": ["q_proj", "v_proj"]}},
}
BF16_SHARE_OF_UPDATE = 0.05


def job(model_dir, case: str, stage: int = 3) -> dict:
    spec = CASES[case]
    model = {"kind": "causal_lm", "path": str(model_dir), "lora": spec.get("lora"),
             "dtype": "bf16" if spec.get("bf16") else "fp32",
             "gradient_checkpointing": spec.get("gradient_checkpointing", False)}
    return {"data": {"forget": "f.parquet", "retain": "r.parquet", "retain_batch_size": 4,
                     "forget_batch_size": 2},
            "model": model, "method": spec["method"],
            "train": {"lr": LR, "zero_stage": stage, "bf16": bool(spec.get("bf16")),
                      "offload": spec.get("offload", "none") if stage == 3 else "none"},
            "output_dir": "out"}


def batches(task: CausalLMTask, rank: int = 0, world: int = 1) -> list[tuple[dict, dict]]:
    """STEPS (retain 8 rows, forget 4 rows) batches of real QA rows; rank r takes rows r::world."""
    rows = qa_rows()
    out = []
    for step in range(STEPS):
        retain = rows[12 * step:12 * step + 8][rank::world]
        forget = rows[12 * step + 8:12 * step + 12][rank::world]
        out.append((lm_batch(task, retain), lm_batch(task, forget)))
    return out


def run_steps(task, grads, scores, reference, pairs, reduce=None) -> None:
    cfg = task.cfg
    retain_loss, forget_loss = objectives.loss_fns(cfg.method.spec, cfg.method.objective, scores, reference)
    for retain, forget in pairs:
        unlearning_step(grads, get_rule(cfg.method.rule_name, **cfg.method.hparams), lr=LR,
                        retain_loss=lambda: retain_loss(retain), forget_loss=lambda: forget_loss(forget),
                        reduce_stats=reduce)


def with_dropout(model_dir: Path, directory: Path, p: float) -> Path:
    """A copy of the model whose attention drops out with probability p in train mode."""
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "attention_dropout": p}))
    return directory


def _worker(rank: int, port: int, model_dir: str, dropout_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine.grads import DeepSpeedGrads
    from hamu_ray.engine.step import SumAcrossRanks

    eng.import_deepspeed().init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = {}
    for case in CASES:
        torch.manual_seed(0)  # the LoRA adapters' initialisation, alike on every rank
        path = dropout_dir if CASES[case].get("base_dropout") else model_dir
        task = CausalLMTask(parse_config(job(path, case, CASES[case].get("stage", 3))))
        train = task.cfg.train
        ds_config = eng.deepspeed_config(stage=train.zero_stage, lr=LR, micro_batch_size=4,
                                         bf16=train.bf16, offload=train.offload)
        model = task.build(ds_config)
        # partitioned as built: every parameter is an empty placeholder plus this rank's shard
        partition = {n: (p.numel(), p.ds_tensor.numel(), p.ds_numel)
                     for n, p in model.named_parameters() if hasattr(p, "ds_tensor")}
        engine = eng.initialize(model, ds_config)
        reference = (task.reference(engine, ds_config)
                     if objectives.needs_reference(task.cfg.method.spec) else None)
        run_steps(task, DeepSpeedGrads(engine), lambda b: task.scores(engine, b), reference,
                  batches(task, rank, WORLD), SumAcrossRanks())
        everything = lm_batch(task, qa_rows()[:6])  # a forward is a collective: every rank runs it
        with torch.no_grad():
            trained = task.scores(engine, everything).logprob
            ref = reference(everything).logprob if reference is not None else None
        base = eng.full_state_dict(engine) if task.model_cfg.lora is not None else None
        directory = Path(out) / case
        task.export(engine, directory if rank == 0 else None)
        training = [m.training for m in engine.module.modules()]  # after the references were scored
        results[case] = {"partition": partition, "trained": trained, "reference": ref, "base": base,
                         "train_mode": all(training)}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero3_runs(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-zero3")
    dropout_dir = with_dropout(tiny_lm, out / "dropout-model", CASES["lora-dropout"]["base_dropout"])
    torch.multiprocessing.start_processes(_worker, args=(free_port(), str(tiny_lm), str(dropout_dir), str(out)),
                                          nprocs=WORLD, join=True, start_method="spawn")
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def single_process(tiny_lm, case: str):
    """The same steps in one process on whole batches: plain torch, no DeepSpeed."""
    from transformers import AutoModelForCausalLM

    task = CausalLMTask(parse_config(job(tiny_lm, case, stage=0)))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    original = AutoModelForCausalLM.from_pretrained(tiny_lm).requires_grad_(False)
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    run_steps(task, grads, lambda b: task.scores(model, b),
              lambda b: task.scores(original, b), batches(task))
    return model


def loaded_scores(task: CausalLMTask, model) -> torch.Tensor:
    with torch.no_grad():
        return task.scores(model, lm_batch(task, qa_rows()[:6])).logprob


def test_zero3_partitions_every_parameter_as_it_is_built(zero3_runs):
    _, ranks = zero3_runs
    for results in ranks:
        partition = results["hamu-q"]["partition"]
        assert len(partition) == 4 * 9 + 3  # every tensor of the Llama: 9 per layer, embed, norm, head
        for name, (local, shard, whole) in partition.items():
            assert local == 0 and shard == math.ceil(whole / WORLD), name


@pytest.mark.parametrize("case", ["hamu-q", "npo", "checkpointing", "offload", "zero2"])
def test_zero3_lm_step_equals_the_single_process_step_and_the_export_reloads(zero3_runs, tiny_lm, case):
    from transformers import AutoModelForCausalLM

    out, ranks = zero3_runs
    expected = single_process(tiny_lm, case).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out / case / MODEL_DIR)
    changed = 0.0
    original = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)
        changed = max(changed, (tensor - original[name]).abs().max().item())
    assert changed > 1e-3  # the steps moved the weights: the comparison is not of two originals
    task = CausalLMTask(parse_config(job(tiny_lm, case)))
    torch.testing.assert_close(loaded_scores(task, exported), ranks[0][case]["trained"], rtol=1e-5, atol=1e-5)
    assert (out / case / MODEL_DIR / "tokenizer.json").is_file()


def test_zero3_reference_copy_is_the_original(zero3_runs, tiny_lm):
    from transformers import AutoModelForCausalLM

    _, ranks = zero3_runs
    task = CausalLMTask(parse_config(job(tiny_lm, "npo")))
    original = loaded_scores(task, AutoModelForCausalLM.from_pretrained(tiny_lm))
    torch.testing.assert_close(ranks[0]["npo"]["reference"], original, rtol=1e-5, atol=1e-5)


def test_lora_trains_only_the_adapters_and_its_reference_is_the_untouched_base(zero3_runs, tiny_lm):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, ranks = zero3_runs
    lora = ranks[0]["lora"]
    original = load_file(str(tiny_lm / "model.safetensors"))
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in lora["base"].items() if "lora_" not in k}
    assert set(base) == set(original)
    for name, tensor in original.items():
        assert torch.equal(base[name], tensor), name  # byte-identical after the run
    task = CausalLMTask(parse_config(job(tiny_lm, "lora")))
    untouched = loaded_scores(task, AutoModelForCausalLM.from_pretrained(tiny_lm))
    torch.testing.assert_close(lora["reference"], untouched, rtol=1e-5, atol=1e-5)  # disable_adapter
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), out / "lora" / ADAPTER_DIR)
    torch.testing.assert_close(loaded_scores(task, reloaded), lora["trained"], rtol=1e-5, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(out / "lora" / MODEL_DIR)  # plain transformers
    torch.testing.assert_close(loaded_scores(task, merged), lora["trained"], rtol=1e-5, atol=1e-5)
    assert (lora["trained"] - untouched).abs().max() > 1e-4  # the adapters did train


def test_the_lora_reference_scores_the_base_with_dropout_off_and_training_keeps_it_on(zero3_runs, tiny_lm):
    from transformers import AutoModelForCausalLM

    out, ranks = zero3_runs
    dropout_dir = out / "dropout-model"
    task = CausalLMTask(parse_config(job(dropout_dir, "lora-dropout")))
    base = AutoModelForCausalLM.from_pretrained(dropout_dir)  # eval mode, as from_pretrained returns it
    eval_scores = loaded_scores(task, base)
    torch.testing.assert_close(ranks[0]["lora-dropout"]["reference"], eval_scores, rtol=1e-5, atol=1e-5)
    assert all(results[case]["train_mode"] for results in ranks for case in CASES)
    with torch.no_grad():  # the check is real: in train mode this base scores otherwise
        dropped = task.scores(base.train(), lm_batch(task, qa_rows()[:6])).logprob
    assert (dropped - eval_scores).abs().max() > 1e-3


def test_bf16_tracks_the_fp32_single_process_step(zero3_runs, tiny_lm):
    from transformers import AutoModelForCausalLM

    out, _ = zero3_runs
    expected = single_process(tiny_lm, "bf16").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out / "bf16" / MODEL_DIR, dtype=torch.float32).state_dict()
    update = math.sqrt(sum(float((expected[n] - initial[n]).norm() ** 2) for n in initial))
    deviation = math.sqrt(sum(float((exported[n] - expected[n]).norm() ** 2) for n in initial))
    assert update > 0 and deviation <= BF16_SHARE_OF_UPDATE * update, deviation / update
