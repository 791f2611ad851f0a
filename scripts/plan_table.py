"""The README's "Will it fit?" table: `hamu-ray plan` of the cluster jobs with the model swapped.

Each row is cluster/jobs/llama-8b-{full,lora}.yaml (8 GPUs of 80 GB on one node, ZeRO-3, bf16,
gradient checkpointing, 512 tokens) planned for a model config in cluster/models/, with the
method and train.offload given; nothing is typed by hand. Prints one Markdown table.

    python scripts/plan_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = [  # (model, job, method, offload)
    ("llama-3.2-1b", "full", "hamu-q", "none"),
    ("llama-3.2-1b", "full", "npo", "none"),
    ("llama-3.2-1b", "lora", "npo", "none"),
    ("llama-3.1-8b", "full", "hamu-q", "none"),
    ("llama-3.1-8b", "full", "npo", "none"),
    ("llama-3.1-8b", "lora", "npo", "none"),
    ("llama-3.1-70b", "full", "hamu-q", "none"),
    ("llama-3.1-70b", "full", "npo", "none"),
    ("llama-3.1-70b", "full", "hamu-q", "optimizer"),
    ("llama-3.1-70b", "full", "hamu-q", "all"),
    ("llama-3.1-70b", "lora", "npo", "none"),
]


def main() -> int:
    from hamu_ray import plan
    from hamu_ray.engine.config import load_config

    print("| model | variant | method | offload | model states | frozen base | reference | HAMU g_r (+ g_f) "
          "| activations | ZeRO-3 working | **total per GPU** | CPU per node |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, variant, method, offload in ROWS:
        rule = ["method.rule=hamu-q"] if method != "hamu-q" else []  # two backwards, as the jobs run
        cfg = load_config(REPO / "cluster" / "jobs" / f"llama-8b-{variant}.yaml",
                          [f"method.name={method}", *rule, f"train.offload={offload}"])
        p = plan.plan(cfg, model_config=str(REPO / "cluster" / "models" / model))
        shape = (f"LoRA r{cfg.model.lora.r} ({p.trainable_params / 1e6:.1f}M)" if p.lora else "full")
        total = f"**{p.total_gpu_gb:.1f}**" + ("" if p.fits else " — does not fit")
        print(f"| {model} ({p.params / 1e9:.2f}B) | {shape} | {method} | {offload} | {p.model_states_gpu_gb:.1f} "
              f"| {p.frozen_gpu_gb:.1f} | {p.reference_gpu_gb:.1f} | {p.hamu_gpu_gb:.2f} | {p.activations_gb:.1f} "
              f"| {p.working_gb:.1f} | {total} | {p.model_states_cpu_gb + p.hamu_cpu_gb:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
