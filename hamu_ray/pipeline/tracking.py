"""MLflow: one parent run per pipeline invocation, a child run per stage and per method.

Only numbers, configs, digests and counts are logged: never a row of the forget set.
Default store: sqlite inside the pipeline's output directory, with artifacts beside it;
`tracking.uri` in the pipeline or $MLFLOW_TRACKING_URI overrides it.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from hamu_ray.errors import TrackingError
from hamu_ray.schema import ConfigError

BATCH = 1000  # MLflow accepts at most 1000 metrics per log_batch call
HEALTH_TIMEOUT_S = 5.0  # one try: MLflow's own client retries for minutes before it gives up


def tracking_uri(configured: str | None, output_dir: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir.resolve()}/mlflow.db"


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk: a plain path, file:, or sqlite: (any SQLAlchemy driver)."""
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's names for hosted stores
        return False
    scheme = urlparse(uri).scheme.lower()
    return scheme in ("", "file") or scheme.split("+")[0] == "sqlite" or len(scheme) == 1  # C:\\…


def refuse_local_store_on_cluster(uri: str, nodes: list[dict] | None = None) -> None:
    """On a Ray cluster with more than one alive node, a local store is an error: it lives on
    the driver's node only, so the other nodes (and anyone browsing the results after the job)
    cannot reach it. `nodes`: ray.nodes() of the connected cluster (read here when None)."""
    if not is_local_store(uri):
        return
    if nodes is None:
        import ray

        nodes = ray.nodes()
    alive = sum(1 for node in nodes if node.get("Alive"))
    if alive > 1:
        raise ConfigError(
            f"tracking.uri: {uri} is a local MLflow store, but this Ray cluster has {alive} nodes: "
            "a file or sqlite store on one node cannot be reached from the others. Use an MLflow "
            "server URI (e.g. http://mlflow.internal:5000) via tracking.uri, --tracking-uri or "
            "$MLFLOW_TRACKING_URI")


def check_reachable(uri: str) -> None:
    """An http(s) tracking URI must answer now, before anything runs: one GET of the server's
    /health with a short timeout (any HTTP answer counts). Other stores are not probed."""
    if urlparse(uri).scheme.lower() not in ("http", "https"):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S)
    except requests.RequestException as exc:
        errno = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))  # e.g. "[Errno 111] Connection refused"
        reason = errno.group(0).strip() if errno else type(exc).__name__
        raise TrackingError(
            f"tracking URI {uri}: no MLflow server answers ({reason}); start it, "
            "or point tracking.uri, --tracking-uri or $MLFLOW_TRACKING_URI at one that does. "
            "Nothing has run.") from None


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"train.lr": "0.1", ...} (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        import mlflow

        check_reachable(uri)
        self.mlflow, self.uri = mlflow, uri
        exported = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        # set_tracking_uri also exports the URI to every later child process; this tracker's
        # store is its own, so put the variable back (the next command resolves its own store)
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported
        self.client = mlflow.MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # A local store keeps its artifacts beside it, not in the cwd; a server keeps them
            # where it was told to (--artifacts-destination), reachable from every node.
            local = artifact_root is not None and is_local_store(uri)
            location = artifact_root.resolve().as_uri() if local else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id

    @contextlib.contextmanager
    def run(self, name: str, *, params: dict[str, Any] | None = None,
            tags: dict[str, str] | None = None, run_id: str | None = None) -> Iterator[str]:
        """A run (nested under the active one, if any); yields its id. `run_id` reopens a run."""
        nested = self.mlflow.active_run() is not None
        with self.mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id, run_name=name,
                                   nested=nested, tags=tags) as active:
            if params:
                self.mlflow.log_params(flatten(params))
            yield active.info.run_id

    def log_steps(self, run_id: str, step_log: list[dict]) -> int:
        """The engine's per-step rows as MLflow metrics (numbers only); returns how many.
        NaN and ±inf are logged too (a diverging run must show it), and tagged: nonfinite_tags."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        points = [(key, float(value), int(row["step"])) for row in step_log for key, value in row.items()
                  if key != "step" and isinstance(value, numbers.Real)]
        metrics = [Metric(key, value, now, step) for key, value, step in points]
        tags = [RunTag(key, value) for key, value in nonfinite_tags(points).items()]
        for i in range(0, max(len(metrics), len(tags)), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + BATCH], tags=tags[i:i + BATCH])
        return len(metrics)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Numbers on the active run; NaN and ±inf included and tagged, as in log_steps."""
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        self.mlflow.log_metrics(values)
        tags = nonfinite_tags([(key, value, None) for key, value in values.items()])
        if tags:
            self.mlflow.set_tags(tags)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """A file, or a directory's files (a language model's export) under `folder`."""
        if Path(path).is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=folder)
        else:
            self.mlflow.log_artifact(str(path), artifact_path=folder)


def nonfinite_tags(points: list[tuple[str, float, int | None]]) -> dict[str, str]:
    """`nonfinite/<key>` tags for the metrics with NaN or ±inf among (key, value, step) points,
    e.g. "nan, +inf: first at step 12 (3 in all)". MLflow's SQL stores keep NaN but clamp ±inf to
    ±1.8e308, which reads like a number: the tag says what the value was."""
    found: dict[str, list[tuple[int | None, str]]] = {}
    for key, value, step in points:
        if not math.isfinite(value):
            found.setdefault(key, []).append((step, "nan" if math.isnan(value) else f"{value:+}"))
    tags = {}
    for key, hits in found.items():
        kinds = ", ".join(sorted({kind for _, kind in hits}))
        steps = sorted(step for step, _ in hits if step is not None)
        where = f": first at step {steps[0]} ({len(steps)} in all)" if steps else ""
        tags[f"nonfinite/{key}"] = kinds + where
    return tags
