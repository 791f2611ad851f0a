"""A retain set four times larger than the Ray object store (100 MB store, a 420 MB parquet of
generated text) unlearns a few steps of the tiny Llama: the workers read their slices window by
window, the driver's memory stays bounded, and a run whose worker is killed resumes to exactly
the uninterrupted result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import stream_set

pytestmark = pytest.mark.integration

ROWS = 1_050_000  # of 400 characters: 420 MB of text, 65 row groups
OBJECT_STORE = 100 * 2**20
DRIVER_GROWTH = 150 * 2**20  # the bound on the driver's RSS growth during a run (the set: 420 MB)


@pytest.fixture(scope="module")
def small_store_ray():
    import ray

    ray.init(num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False, log_to_driver=False)
    assert ray.cluster_resources()["object_store_memory"] <= OBJECT_STORE
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def big_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    code = ("import sys; from scripts.stream_set import write_text_set; "
            "write_text_set(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))")
    for name, rows, seed in (("retain", ROWS, 0), ("forget", 64, 1)):
        subprocess.run([sys.executable, "-c", code, str(root / f"{name}.parquet"), str(rows), str(seed)],
                       check=True, cwd=Path(__file__).parents[2])
    assert (root / "retain.parquet").stat().st_size > 4 * OBJECT_STORE
    return root


def job(tiny_lm, root, out, **train):
    cfg = stream_set.job(tiny_lm, root, out, steps=6)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train),
                                  "cluster": cfg.cluster.model_copy(update={"max_failures": 1})})


def test_a_set_larger_than_the_object_store_streams_and_resumes_exactly(small_store_ray, tiny_lm, big_sets,
                                                                        tmp_path):
    from safetensors.torch import load_file

    from hamu_ray.engine import data
    from hamu_ray.engine.driver import run_unlearning
    from hamu_ray.tasks.causal_lm import MODEL_DIR
    from tests.engine.test_engine_ray import run_killing_a_worker

    with stream_set.PeakRSS() as driver:
        straight = run_unlearning(job(tiny_lm, big_sets, tmp_path / "straight"))
    assert straight.steps == 6 and straight.sets["retain"].num_rows == ROWS
    print(f"driver RSS growth during the run: {driver.growth / 2**20:.0f} MB")
    assert driver.growth < DRIVER_GROWTH, f"the driver grew by {driver.growth / 2**20:.0f} MB"
    summary = json.loads((straight.output_dir / "summary.json").read_text())  # 7 blocks, hashed by 2 ranks
    assert summary["sets"]["retain"]["sha256"] == data.content_digest(straight.sets["retain"])

    resumed = run_killing_a_worker(job(tiny_lm, big_sets, tmp_path / "killed", checkpoint_every=1))
    assert resumed.steps == 6 and 2 <= resumed.resumed_from_step < 6

    weights = [load_file(next((r.output_dir / MODEL_DIR).glob("*.safetensors"))) for r in (straight, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert (weights[0][name] == weights[1][name]).all(), name  # the same rows, the same order
