"""What a user reads: the tool's own lines, not the libraries' noise. Each test runs the real
code (MLflow on sqlite, torch.export, a real `hamu-ray unlearn` on a local Ray with its output
redirected) and looks for the noise in what it printed or logged."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent


class Records(logging.Handler):
    """Every record a logger lets through (its filters run before its handlers)."""

    def __init__(self, *names: str):
        super().__init__(level=logging.DEBUG)
        self.names, self.messages, self.warnings = names, [], []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.levelno >= logging.WARNING:
            self.warnings.append(record.getMessage())

    def __enter__(self):
        for name in self.names:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.names:
            logging.getLogger(name).removeHandler(self)


@pytest.fixture
def mlflow_run(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("quiet", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        yield
    mlflow.set_tracking_uri(None)


def test_a_language_model_is_registered_without_a_progress_bar_or_a_warning(tiny_lm, mlflow_run, capfd):
    """Its directory is logged as the model's artifact, which MLflow copies through its download
    path: a "Downloading artifacts" bar for a local copy. (Logged through the transformers
    flavour, a local directory drew two warnings: no model card or license on the hub.)"""
    from hamu_ray.pipeline import registry

    with Records("mlflow") as seen:
        info = registry.log_model({"kind": "causal_lm", "model_dir": str(tiny_lm)}, "lm", {"role": "test"})
    assert info.registered_model_version == 1
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert not seen.warnings, seen.warnings


def test_a_registered_classifier_takes_any_batch_size_and_export_says_nothing(tmp_path, mlflow_run):
    """A one-row input example made torch.export fix the batch dimension to 1 (and log that per
    classifier): the registered model refused two rows."""
    import mlflow
    import numpy as np
    from safetensors.torch import save_file

    from hamu_ray.pipeline import registry
    from hamu_ray.tasks.classifier import EXPORT_WEIGHTS, ClassifierModel, build_model

    model = {"kind": "mlp", "sizes": [4, 8, 3]}
    save_file(build_model(ClassifierModel(**model)).state_dict(), tmp_path / EXPORT_WEIGHTS)
    with Records("torch._export.non_strict_utils") as seen:
        info = registry.log_model({"kind": "classifier", "stage_dir": str(tmp_path), "model": model}, "mlp", {})
    assert not [m for m in seen.messages if "Dim.AUTO" in m], seen.messages
    assert mlflow.pyfunc.load_model(info.model_uri).predict(np.zeros((3, 4), np.float32)).shape == (3, 3)


def test_a_dropped_message_is_only_that_one():
    from hamu_ray import quiet

    logger = logging.getLogger("hamu_ray.tests.quiet")
    with Records(logger.name) as seen:
        with quiet.without_log_messages(logger.name, "noise"), quiet.without_log_messages(logger.name, "noise"):
            logger.warning("noise: dropped")
            logger.warning("a real problem")
        logger.warning("noise again, after the block")
    assert seen.messages == ["a real problem", "noise again, after the block"]
    assert logger.filters == []


# `hamu-ray unlearn JOB` inside a Ray session holding as many workers as a long pipeline keeps
# (the raylet counts them all; one short job alone stays below its warning)
BUSY_DRIVER = """
import os, sys, ray
from hamu_ray.cli import main
from hamu_ray.engine.config import ClusterSection
from hamu_ray.engine.driver import ray_session

with ray_session(ClusterSection()):
    Idle = ray.remote(num_cpus=0)(type("Idle", (), {"pid": lambda self: os.getpid()}))
    idle = [Idle.remote() for _ in range(10)]
    ray.get([worker.pid.remote() for worker in idle])
    code = main(["unlearn", sys.argv[1]])
    ray.get([worker.pid.remote() for worker in idle])  # the raylet's warnings have had time to arrive
sys.exit(code)
"""


@pytest.mark.integration
def test_a_redirected_run_shows_the_tools_lines_and_none_of_rays_noise(tiny_lm, tmp_path):
    """`hamu-ray unlearn … > log 2>&1`: Ray Data logged its progress every 10 s per dataset, the
    raylet warned about the workers this tool keeps on purpose, in raw ANSI colour codes."""
    from hamu_ray.files import write_rows
    from tests.lm_fixtures import qa_rows

    rows = qa_rows()
    sets = {name: str(write_rows(part, tmp_path / f"{name}.parquet"))
            for name, part in (("forget", rows[:4]), ("retain", rows[4:12]))}
    job = {"data": {**sets, "retain_batch_size": 2, "forget_batch_size": 2, "text": {"max_length": 64}},
           "model": {"kind": "causal_lm", "path": str(tiny_lm)},
           "method": {"name": "hamu-q", "hparams": {"constraint": 0.01, "radius": 0.1}},
           "train": {"lr": 0.01, "max_steps": 2, "progress_every": 1},
           "cluster": {"num_workers": 2, "cpus_per_worker": 0.5}, "output_dir": str(tmp_path / "out")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX", "RAY_DATA_DISABLE_PROGRESS_BARS")}
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        done = subprocess.run([sys.executable, "-c", BUSY_DRIVER, str(tmp_path / "job.yaml")],
                              cwd=ROOT, env=env, stdout=out, stderr=err, timeout=900)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert done.returncode == 0, stderr[-3000:]
    assert "[unlearn] sets ready (forget 4 rows, retain 8 rows); starting 2 worker(s)" in stdout, stdout
    assert f"{tmp_path / 'out'}: 2 steps, stop" in stdout
    everything = stdout + stderr
    assert "maximum expected startup concurrency" not in everything, everything
    assert "\x1b[" not in everything
    assert "Running Dataset" not in everything and "Progress bars disabled" not in everything, everything
