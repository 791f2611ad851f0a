"""A retain set of several GB through an unlearning job on this machine: what the driver and the
workers hold, and what a resumed stream costs.

Writes a parquet retain set of generated text (`--gb`, uncompressed, 16k-row row groups) and a
64-row forget set, builds the tests' tiny Llama, then measures
- the driver's checks (`driver.check_inputs`: footers and counts): seconds and the driver's RSS growth;
- the sets' content digests and the forget/retain disjointness pass in one process
  (`data.content_digest`, `data.check_disjoint`: what the driver did before the workers shared it);
- one HAMU-Q job of `--steps` steps on 2 CPU workers (`driver.run_unlearning`): wall seconds, the
  workers' shared check of the sets (`set_check_s`, before the model is built), the driver's peak
  RSS growth, each worker's peak RSS (the run summary's usage);
- the first batch of a worker's stream started at pair 0 and at pairs deep into the set (what a
  resumed run does: `shards.paired_batches(start=k)`), each with the tokenisation it needs.
Writes OUT/stream_set.json and prints a table.

    python scripts/stream_set.py [--out runs/stream_set] [--gb 2] [--steps 6]

OUT must not exist (nothing is overwritten).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROW_GROUP, CHARS = 16_384, 400


def write_text_set(path: str, rows: int, seed: int) -> None:
    """`rows` rows of CHARS random letters and spaces, uncompressed (the file is as large as the
    text), with page checksums, one row group at a time (this process never holds the set)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz    ", dtype=np.uint8)
    rng = np.random.default_rng(seed)
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema, compression="none", write_page_checksum=True) as writer:
        for start in range(0, rows, ROW_GROUP):
            count = min(ROW_GROUP, rows - start)
            block = alphabet[rng.integers(0, len(alphabet), size=(count, CHARS))]
            writer.write_table(pa.table({"text": [line.tobytes().decode() for line in block]}, schema=schema),
                               row_group_size=ROW_GROUP)


class PeakRSS:
    """The largest resident set of this process while it runs (sampled every 20 ms)."""

    def __init__(self):
        import psutil

        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def job(model: Path, root: Path, out: Path, steps: int):
    from hamu_ray.engine.config import parse_config

    return parse_config({
        "data": {"forget": str(root / "forget.parquet"), "retain": str(root / "retain.parquet"),
                 "retain_batch_size": 4, "forget_batch_size": 2, "shuffle_seed": 5,
                 "text": {"format": "text", "max_length": 24}},
        "model": {"kind": "causal_lm", "path": str(model)},
        "method": {"name": "hamu-q", "hparams": {"constraint": 0.05, "radius": 0.5}},
        "train": {"lr": 0.01, "max_steps": steps, "zero_stage": 0},
        "cluster": {"num_workers": 2},
        "output_dir": str(out),
    })


def first_batch_seconds(cfg, start: int) -> float:
    """Rank 0's stream (2 ranks) opened at pair `start`, until its first pair is ready."""
    from hamu_ray.engine import shards
    from hamu_ray.engine.worker import Prepared
    from hamu_ray.tasks import task_for

    task = task_for(cfg)
    task.import_model_code()  # the tokenizer, as a worker loads it before its first step
    began = time.perf_counter()
    prepared = Prepared(task)
    pairs = shards.paired_batches(
        prepared.rank_shard(cfg, "retain", 0, 2), prepared.rank_shard(cfg, "forget", 0, 2),
        retain_batch_size=cfg.data.retain_batch_size, forget_batch_size=cfg.data.forget_batch_size,
        anchor="retain", epochs=1, make_batch=task.make_batch, shuffle_seed=cfg.data.shuffle_seed,
        start=start)
    next(pairs)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/stream_set")
    parser.add_argument("--gb", type=float, default=2.0, help="the retain set's size on disk")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists():
        parser.error(f"--out {out} exists; choose a new directory (nothing is overwritten)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hamu_ray.engine.driver import check_inputs, ray_session, run_unlearning
    from tests.lm_fixtures import build_tiny_lm

    out.mkdir(parents=True)
    rows = int(args.gb * 1e9 / CHARS)
    began = time.perf_counter()
    write_text_set(str(out / "retain.parquet"), rows, 0)
    write_text_set(str(out / "forget.parquet"), 64, 1)
    results = {"rows": rows, "file_gb": round((out / "retain.parquet").stat().st_size / 1e9, 2),
               "write_s": round(time.perf_counter() - began, 1)}
    model = build_tiny_lm(out / "model")
    cfg = job(model, out, out / "job", args.steps)

    with PeakRSS() as driver:
        began = time.perf_counter()
        check_inputs(cfg)
    results.update(check_s=round(time.perf_counter() - began, 1), check_rss_growth_mb=round(driver.growth / 2**20))
    results["one_process_check_s"] = round(one_process_check_seconds(out), 1)

    per_rank = rows // 2 // cfg.data.retain_batch_size  # pairs in a pass of rank 0's slice
    results["first_batch_s"] = {str(k): round(first_batch_seconds(cfg, k), 2)
                                for k in (0, per_rank // 2, per_rank - 1)}

    with ray_session(cfg.cluster), PeakRSS() as driver:
        began = time.perf_counter()
        run_unlearning(cfg)
    summary = json.loads((out / "job" / "summary.json").read_text())
    results.update(job_s=round(time.perf_counter() - began, 1), job_driver_rss_growth_mb=round(driver.growth / 2**20),
                   set_check_s=summary["set_check_s"], worker_peak_rss_gb=summary["usage"].get("peak_rss_gb"),
                   prepared=summary["prepared"])
    (out / "stream_set.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


def one_process_check_seconds(out: Path) -> float:
    """Both sets hashed and the retain rows looked up among the forget rows', in this process."""
    from hamu_ray.engine import data

    began = time.perf_counter()
    forget, retain = (data.inspect_set(name, str(out / f"{name}.parquet"), ["text"])
                      for name in ("forget", "retain"))
    data.content_digest(forget), data.content_digest(retain)
    data.check_disjoint(forget, retain, ["text"])
    return time.perf_counter() - began


if __name__ == "__main__":
    sys.exit(main())
