"""`hamu-ray plan --device cpu` against a measurement: two ZeRO-3 ranks (plain gloo processes:
Ray adds nothing to a worker's memory) build the job's model and run its steps as a Ray Train
worker does (worker.ready_task, build, step_function), with $HAMU_RAY_HOST_MEMORY=release (glibc
returns freed memory, so RSS follows the live tensors the plan counts); each rank's peak RSS over
the RSS it had before the model was built is what the plan predicts. Two model sizes (below
~30M parameters the process's fixed costs exceed 15 % of the model's), HAMU-Q (two backwards)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
WORLD, ROWS, STEPS = 2, 4, 3
SHAPES = {  # Llamas of ~34M and ~50M parameters, a 4096-row embedding (the tokenizer fills less)
    "34m": dict(hidden_size=512, intermediate_size=1536, layers=6, heads=8),
    "50m": dict(hidden_size=640, intermediate_size=2048, layers=8, heads=10),
}


def job(model_dir: Path, data_dir: Path):
    from hamu_ray.engine.config import parse_config

    return parse_config({
        "data": {"forget": str(data_dir / "forget.parquet"), "retain": str(data_dir / "retain.parquet"),
                 "retain_batch_size": ROWS, "forget_batch_size": ROWS,
                 "text": {"format": "qa", "max_length": 48}},
        "model": {"kind": "causal_lm", "path": str(model_dir)},
        "method": {"name": "hamu-q", "hparams": {"constraint": 0.001, "radius": 0.5, "stop_on_criterion": False,
                                                 "on_infeasible": "ascent"}},
        "train": {"lr": 1e-4, "zero_stage": 3}, "cluster": {"num_workers": WORLD},
        "output_dir": str(data_dir / "unused"),
    })


def rank_main(rank: int, port: int, model_dir: str, data_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu",
                      HAMU_RAY_HOST_MEMORY="release")  # freed memory returned: RSS follows live tensors
    torch.set_num_threads(1)
    import pyarrow.parquet as pq

    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine import usage, worker
    from hamu_ray.engine.grads import DeepSpeedGrads
    from tests.lm_fixtures import lm_batch

    eng.import_deepspeed().init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = job(Path(model_dir), Path(data_dir))
    task = worker.ready_task(cfg)

    def batch(name: str, step: int):
        rows = pq.read_table(Path(data_dir) / f"{name}.parquet").slice((step * WORLD + rank) * ROWS, ROWS)
        return lm_batch(task, rows.to_pylist())

    # the batches first, as a Ray Train worker receives them from Ray Data: the tokenizer is not
    # the model's memory
    batches = [(batch("retain", step), batch("forget", step)) for step in range(STEPS)]
    longest = max(b["input_ids"].shape[1] for pair in batches for b in pair)
    used = usage.Usage()
    engine, losses = worker.build(cfg, task)
    take_step = worker.step_function(cfg, DeepSpeedGrads(engine), *losses, [])
    for step, (retain, forget) in enumerate(batches):
        take_step(step + 1, retain, forget)
    record = used.record(torch.device("cpu"))
    Path(out, f"rank{rank}.json").write_text(json.dumps({**record, "longest": longest}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.lm_fixtures import qa_rows

    directory = tmp_path_factory.mktemp("plan-data")
    rows = qa_rows()
    rows = (rows * (1 + 2 * WORLD * ROWS * STEPS // len(rows)))
    for name in ("forget", "retain"):
        pq.write_table(pa.Table.from_pylist(rows), directory / f"{name}.parquet")
    return directory


def build_model(directory: Path, shape: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hamu_ray.tasks import small_llama
    from tests.lm_fixtures import documentation

    tokenizer = small_llama.train_tokenizer(documentation().values(), 2048)
    config = LlamaConfig(vocab_size=4096, hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("size", list(SHAPES))
def test_the_cpu_plan_predicts_each_ranks_peak_within_15_percent(size, data_dir, tmp_path):
    from hamu_ray import plan

    import subprocess
    import sys

    model_dir = build_model(tmp_path / "model", SHAPES[size])
    # the ranks in a process of their own with a minimal environment: what earlier tests of a
    # session leave in this one's (a full `make test` measured 35 % more here) is not the job's
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    done = subprocess.run([sys.executable, "-m", "tests.test_plan_measured", str(model_dir), str(data_dir),
                           str(tmp_path)], cwd=REPO, env={**keep, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    measured = [r["peak_rss_bytes"] - r["rss_before_model_bytes"] for r in ranks]
    predicted = plan.plan(job(model_dir, data_dir), device="cpu", batch_rows=ROWS,
                          seq_len=max(r["longest"] for r in ranks))
    print(f"{size}: plan {predicted.total_gpu_gb:.3f} GB, measured {[round(m / 1e9, 3) for m in measured]} GB "
          f"(before the model {[round(r['rss_before_model_bytes'] / 1e9, 3) for r in ranks]} GB)")
    for got in measured:
        assert predicted.total_gpu_gb * 1e9 == pytest.approx(got, rel=0.15), (size, predicted, ranks)


if __name__ == "__main__":  # python -m tests.test_plan_measured MODEL_DIR DATA_DIR OUT: the two ranks
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(rank_main, args=(port, *sys.argv[1:4]), nprocs=WORLD,
                                          start_method="spawn")
