"""A job's evaluation phase: how its ranks share the rows (`Ranks`), and on disk the per-example
scores its workers computed (numbers only, never a row's text), one file beside the export,
`<set>/<score>` arrays. The scoring itself is the task's (tasks.lm_scores)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SCORES_FILE = "evaluation.npz"


@dataclass(frozen=True)
class Ranks:
    """This process's part of a data-parallel scoring: `rank` of `world`; `lockstep` when every
    forward pass is a collective (ZeRO-3). The default is one process scoring every row."""
    rank: int = 0
    world: int = 1
    lockstep: bool = False
    device: torch.device = torch.device("cpu")

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n rows (the first n % world ranks get one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def most(self, count: int) -> int:
        """The largest `count` over the ranks (a collective in lockstep; else this rank's)."""
        if not self.lockstep:
            return count
        import torch.distributed as dist

        value = torch.tensor([count], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def gather(self, part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every rank's share, concatenated in rank order (the rows' order); a collective."""
        if self.world == 1:
            return part
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, part)
        return {name: np.concatenate([p[name] for p in parts]) for name in part}

    @staticmethod
    def of_job(device: torch.device, zero_stage: int) -> "Ranks":
        """The ranks of the running job (torch.distributed initialised), or one process."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return Ranks(device=device)
        world = dist.get_world_size()
        return Ranks(dist.get_rank(), world, zero_stage == 3 and world > 1, device)


ALONE = Ranks()


def attacked_set(name: str, attack: str) -> str:
    """The scores' name of set `name` scored again under an attack (evaluation.attacks)."""
    return f"{name}@{attack}"


def set_label(name: str) -> str:
    return f"evaluation {name}"  # "evaluation forget set x.parquet: ..." in data's errors


def read_sets(section) -> dict[str, list[dict]]:
    """Every evaluation set's rows (engine.config.EvaluationSection: small, whole on each worker)."""
    from hamu_ray.engine import data

    return {name: data.open_dataset(path, data.file_format(set_label(name), path))[1].to_table().to_pylist()
            for name, path in section.sets.items()}


def write_scores(path: Path, scores: dict[str, dict[str, np.ndarray]]) -> None:
    np.savez(path, **{f"{name}/{score}": values for name, per_set in scores.items()
                      for score, values in per_set.items()})


def read_scores(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """set → score → per-example values, as written (numbers and booleans only: no pickles)."""
    scores: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as stored:
        for key in stored.files:
            name, score = key.split("/", 1)
            scores.setdefault(name, {})[score] = stored[key]
    return scores
