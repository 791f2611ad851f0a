"""Tasks: what differs between a classifier and a causal LM. The engine (loop, step, driver)
reaches a task only through the `Task` interface below, chosen by `model.kind`.

A task builds the original model (already partitioned under ZeRO-3 when the task can), turns
rows into batches (tokenisation runs in the workers, as they read), scores a batch as per-example
log-likelihoods (`objectives.Scores`), provides the frozen reference, and exports the result.
A task is given the job's config (`engine.config.UnlearnConfig`) and never imports it: the
config imports the tasks' model schemas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from hamu_ray.objectives import Scores



class Task(Protocol):
    def columns(self, role: str | None = None) -> list[str]:
        """The columns every set must have (None), or a set of this role ("forget", …)."""

    def prepare(self, rows: Any, role: str) -> Any:
        """A window of one set's rows (a pyarrow Table; role "retain", "forget", "monitor_forget", …)
        as the batches take them, computed by the worker that reads them."""

    def check_prepared(self, prepared: Any, role: str, path: str) -> dict[str, int]:
        """Counts over a prepared window (never rows); raises a UserError naming the set for rows
        it cannot use."""

    def prepared_lines(self, prepared: dict[str, dict[str, int]]) -> list[str]:
        """The run's counts (set → check_prepared's counts summed, and "rows" read) as lines for the user."""

    def check_model(self) -> None:
        """The model's input files exist (before Ray starts)."""

    def import_model_code(self) -> None:
        """Import the model's code, no weights: a worker's memory before `build` is then the
        process's own (engine.usage measures the model's from there)."""

    def build(self, ds_config: dict) -> torch.nn.Module:
        """The original model, weights loaded; the input files are only read."""

    def make_batch(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A batch of CPU tensors from a numpy batch of prepared rows."""

    def scores(self, model: Callable, batch: dict[str, torch.Tensor]) -> Scores: ...

    def reference(self, engine: Any, ds_config: dict) -> Callable[[dict], Scores]:
        """The frozen original's scores (no gradient), for KL/NPO/SCRUB."""

    def evaluate(self, model: Any, sets: dict[str, list[dict]], section: Any,
                 ranks: Any) -> dict[str, dict[str, np.ndarray]]:
        """Per-example scores of every row of each evaluation set, this rank scoring its share
        (causal LM; the config refuses an evaluation section for other tasks)."""

    def export(self, engine: Any, directory: Path | None) -> None:
        """Write the trained model to `directory` (rank 0; None on other ranks). A collective
        under ZeRO-3: every rank calls it."""


def task_for(cfg: Any) -> Task:
    if cfg.model.kind == "causal_lm":
        from hamu_ray.tasks.causal_lm import CausalLMTask

        return CausalLMTask(cfg)
    from hamu_ray.tasks.classifier import ClassifierTask

    return ClassifierTask(cfg)
