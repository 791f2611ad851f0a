"""Attacks on an unlearned model that try to bring the forgotten knowledge back, and the share
of it they recover: quantization (Zhang et al., ICLR 2025: 4-bit quantization of an unlearned
LLM restores most of what it forgot) and relearning (a few fine-tuning steps on a little of it).

Pure torch and numbers: no Ray, DeepSpeed, MLflow or pydantic import belongs in this package;
the pipeline (hamu_ray.pipeline.lm_pipeline) applies the attacks where it scores its models.
"""
