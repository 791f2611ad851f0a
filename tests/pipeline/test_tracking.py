"""Metrics reach MLflow as they are: a diverging run's NaN and ±inf are recorded, never dropped.
On a real sqlite store (MLflow keeps NaN there and clamps ±inf to ±1.8e308)."""

from __future__ import annotations

import math
import sys

import mlflow

from hamu_ray.pipeline.tracking import Tracker

STEPS = [{"step": 1, "loss/forget": 0.5, "stop": "none"}, {"step": 2, "loss/forget": math.nan},
         {"step": 3, "loss/forget": math.inf}, {"step": 4, "loss/forget": -math.inf},
         {"step": 5, "loss/forget": 2.0}]


def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "nonfinite", artifact_root=tmp_path / "mlartifacts")


def test_nonfinite_steps_are_in_the_metric_history_and_tagged(tmp_path):
    t = tracker(tmp_path)
    with t.run("diverging") as run_id:
        assert t.log_steps(run_id, STEPS) == 5
    history = sorted(t.client.get_metric_history(run_id, "loss/forget"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    values = [m.value for m in history]
    assert values[0] == 0.5 and math.isnan(values[1]) and values[4] == 2.0
    assert values[2] >= sys.float_info.max and values[3] <= -sys.float_info.max  # inf, as the store keeps it
    tags = t.client.get_run(run_id).data.tags
    assert tags["nonfinite/loss/forget"] == "+inf, -inf, nan: first at step 2 (3 in all)"


def test_nonfinite_final_metrics_are_logged_and_tagged(tmp_path):
    t = tracker(tmp_path)
    with t.run("final") as run_id:
        t.log_metrics({"forget_quality": math.nan, "gap": math.inf, "steps": 30, "stop": "none"})
    run = mlflow.MlflowClient(t.uri).get_run(run_id)
    assert math.isnan(run.data.metrics["forget_quality"]) and run.data.metrics["steps"] == 30
    assert run.data.metrics["gap"] >= sys.float_info.max
    assert run.data.tags["nonfinite/forget_quality"] == "nan" and run.data.tags["nonfinite/gap"] == "+inf"
    assert "nonfinite/steps" not in run.data.tags


def test_finite_metrics_get_no_tags():
    from hamu_ray.pipeline.tracking import nonfinite_tags

    assert nonfinite_tags([("loss", 1.0, 1), ("acc", 0.5, None)]) == {}


def test_a_tracker_does_not_leak_its_store_into_later_commands(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; a later `hamu-ray` subprocess of the
    same process (a test suite, a notebook) would then log into this tracker's store."""
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker(tmp_path)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    tracker(tmp_path)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"


# ---- a tracking server that does not answer ---------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_fails_at_once_with_one_clear_error(tmp_path):
    import time

    import pytest

    from hamu_ray.errors import TrackingError
    from hamu_ray.pipeline.stages import run_pipeline
    from tests.pipeline.test_pipeline import digits_config

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingError, match=rf"{uri}: no MLflow server answers \(\[Errno 111\] Connection refused\)"):
        Tracker(uri, "anything")
    assert time.perf_counter() - started < 10  # MLflow's own client would retry for minutes

    def to_the_dead_server(raw):
        raw["tracking"] = {"uri": uri}
    with pytest.raises(TrackingError, match="Nothing has run"):
        run_pipeline(digits_config(tmp_path / "out", to_the_dead_server))
    assert not (tmp_path / "out").exists()  # before any data, Ray or worker
    import ray
    assert not ray.is_initialized()


def test_any_http_answer_counts_as_reachable():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from hamu_ray.pipeline.tracking import check_reachable

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_address[1]}")  # a proxy's 404 is an answer
    finally:
        server.shutdown()
