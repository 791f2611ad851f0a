"""MLflow: one parent run per pipeline invocation, a child run per stage and per method.

Only numbers, configs, digests, counts and file paths are logged: never a row of the forget set.
Default store: sqlite inside the pipeline's output directory, with artifacts beside it;
`tracking.uri` in the pipeline or $MLFLOW_TRACKING_URI overrides it.

Every write goes through a Tracker and names its run (MlflowClient's create_run, log_batch,
log_artifact(s), set_terminated; MLflow's fluent run only around a model's logging, which needs
one), so that a run's end is a write like any other, never an exception from a `with` exit.

A server that stops answering mid-run costs nothing but an upload. The first call that finds it
unreachable (the connection refused or timed out, or MLflow's retries of 429/5xx answers used up)
switches the Tracker offline for the rest of the command: one line says so, and every later
write is appended to `<buffer_dir>/operations.jsonl` instead, one JSON line each: the operation,
its run (the store's id, or for a run created offline a local key `unsent-…` that later lines
refer to), its arguments; an artifact by the path of its file, which stays on disk; a model
registration as what logs it again (registry.model_source). Reads answer "nothing known". A write
naming a key the store does not know yet (a later command reopening a run made offline) goes to
the buffer too. The command ends by printing `hamu-ray tracking upload <buffer_dir> --tracking-uri
<uri>`: `upload` replays the file in order, records its progress and the keys' ids in
`uploaded.json` (a re-run after a failure goes on where it stopped), and renames the file
operations.uploaded.jsonl once everything is in the store.

Around every call MLflow's HTTP retries and timeout are cut to seconds unless the user set them
(QUICK_HTTP; file uploads keep MLflow's timeout): a dead server is noticed in seconds, not after
MLflow's minutes of retries.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from hamu_ray.errors import MissingInputError, TrackingBufferError, TrackingError
from hamu_ray.schema import ConfigError

BATCH = 1000  # MLflow's log_batch takes at most 1000 entries per call,
PARAMS_OR_TAGS = 100  # of which at most 100 params and 100 tags
HEALTH_TIMEOUT_S = 5.0  # one try: MLflow's own client retries for minutes before it gives up
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # ~3 s to give up on a refused connection
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # s per socket wait (a host that is gone)
# A file's upload is answered once the server has stored it (behind a proxy to S3: a minute for
# a large model): these keep MLflow's timeout.
SLOW_ANSWERS = ("log_artifact", "register_model")
OPERATIONS = "operations.jsonl"
UPLOADED = "operations.uploaded.jsonl"  # operations.jsonl once every line is in the store
PROGRESS = "uploaded.json"
UNSENT = re.compile(r"unsent-[0-9a-f]{32}")  # a run or model version only a buffer holds yet
OPS = ("session", "create_run", "reopen_run", "log_batch", "log_artifact", "register_model", "end_run")
MAKES = {"create_run": "run", "register_model": "version"}  # operations that give a key its id


def tracking_uri(configured: str | None, output_dir: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir.resolve()}/mlflow.db"


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk: a plain path, file:, or sqlite: (any SQLAlchemy driver)."""
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's names for hosted stores
        return False
    scheme = urlparse(uri).scheme.lower()
    return scheme in ("", "file") or scheme.split("+")[0] == "sqlite" or len(scheme) == 1  # C:\\…


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme.lower() in ("http", "https")


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


def check_reachable(uri: str, consequence: str = "Nothing has run.") -> None:
    """An http(s) tracking URI must answer now, before anything runs: one GET of the server's
    /health with a short timeout (any HTTP answer counts). Other stores are not probed."""
    if not is_server(uri):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S)
    except requests.RequestException as exc:
        raise TrackingError(
            f"tracking URI {uri}: no MLflow server answers ({short_reason(exc)}); start it, "
            f"or point tracking.uri, --tracking-uri or $MLFLOW_TRACKING_URI at one that does. {consequence}"
        ) from None


def short_reason(exc: BaseException) -> str:
    errno = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))  # e.g. "[Errno 111] Connection refused"
    return errno.group(0).strip() if errno else type(exc).__name__


def unreachable_reason(exc: BaseException) -> str | None:
    """Why the server could not be reached, if that is what `exc` or an exception it was raised
    from says (MLflow wraps requests' errors in an MlflowException); None for any other error."""
    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return short_reason(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def quick_http(uri: str, op: str | None = None) -> contextlib.AbstractContextManager:
    """MLflow's HTTP retries and timeout cut to seconds for the calls in the block (MLflow reads
    them per request), unless the user set them; `op`: the operation sent (SLOW_ANSWERS)."""
    if not is_server(uri):
        return env_defaults({})
    slow = op in SLOW_ANSWERS
    return env_defaults({k: v for k, v in QUICK_HTTP.items() if not (slow and k == "MLFLOW_HTTP_REQUEST_TIMEOUT")})


@contextlib.contextmanager
def env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Environment variables the user has not set, for the block only: child processes started
    later see what the user set."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def set_global_uri(uri: str) -> None:
    """MLflow's fluent API (a model's logging) uses the process-wide URI. set_tracking_uri also
    exports it to every later child process; this tracker's store is its own, so the variable
    is put back (the next command resolves its own store)."""
    import mlflow

    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"


def upload_command(directory: Path, uri: str) -> str:
    return f"hamu-ray tracking upload {shlex.quote(str(directory))} --tracking-uri {shlex.quote(uri)}"


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


def new_key() -> str:
    return f"unsent-{uuid.uuid4().hex}"


def now_ms() -> int:
    return int(time.time() * 1000)


def mentions_unsent(value: Any) -> bool:
    """Whether an operation's arguments name a run or model version only a buffer holds."""
    if isinstance(value, str):
        return UNSENT.fullmatch(value) is not None
    if isinstance(value, dict):
        return any(mentions_unsent(v) for v in value.values())
    if isinstance(value, list):
        return any(mentions_unsent(v) for v in value)
    return False


def references(op: str, args: dict) -> dict:
    """An operation's arguments less the key it makes (MAKES)."""
    return {k: v for k, v in args.items() if k != MAKES.get(op)}


def resolved(value: Any, ids: dict[str, str]) -> Any:
    """`value` with every local key the store has an id for replaced by that id."""
    if isinstance(value, str):
        return ids.get(value, value)
    if isinstance(value, dict):
        return {k: resolved(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [resolved(v, ids) for v in value]
    return value


# ---- the store: how each operation is sent (by the Tracker now, or by `upload` later) ---------

class Store:
    """An MLflow store and the operations a Tracker writes to it."""

    def __init__(self, uri: str):
        from mlflow import MlflowClient

        self.uri, self.client = uri, MlflowClient(uri)
        self._experiments: dict[str, str] = {}

    def experiment_id(self, name: str, artifact_root: str | None) -> str:
        if name not in self._experiments:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                # A local store keeps its artifacts beside it, not in the cwd; a server keeps
                # them where it was told to (--artifacts-destination), reachable from every node.
                local = artifact_root is not None and is_local_store(self.uri)
                location = Path(artifact_root).as_uri() if local else None
                self._experiments[name] = self.client.create_experiment(name, artifact_location=location)
            else:
                self._experiments[name] = found.experiment_id
        return self._experiments[name]

    def send(self, op: str, args: dict) -> Any:
        """Do operation `op` (one of OPS); returns the id it makes, if any (MAKES)."""
        return getattr(self, f"_{op}")(args)

    def _session(self, args: dict) -> None:  # a buffer's marker of a command that wrote to it
        pass

    def _create_run(self, args: dict) -> str:
        experiment = self.experiment_id(args["experiment"], args["artifact_root"])
        run = self.client.create_run(experiment, start_time=args["start_time"], tags=args["tags"],
                                     run_name=args["name"])
        return run.info.run_id

    def _reopen_run(self, args: dict) -> None:
        self.client.update_run(args["run"], status="RUNNING")

    def _log_batch(self, args: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.client.log_batch(args["run"], metrics=[Metric(*m) for m in args["metrics"]],
                              params=[Param(k, v) for k, v in args["params"].items()],
                              tags=[RunTag(k, v) for k, v in args["tags"].items()])

    def _log_artifact(self, args: dict) -> None:
        path = Path(args["path"])
        if not path.exists():
            raise MissingInputError(f"artifact {path} is gone: it was to be logged to run {args['run']}; "
                                    "put it back to upload it")
        if path.is_dir():
            self.client.log_artifacts(args["run"], str(path), artifact_path=args["folder"])
        else:
            self.client.log_artifact(args["run"], str(path), artifact_path=args["folder"])

    def _register_model(self, args: dict) -> str:
        """registry.py's model logging, unless a version of these weights is registered already
        (its tags are brought up to date then)."""
        import mlflow

        from hamu_ray.pipeline import registry

        name, tags = args["name"], args["tags"]
        existing = registry.find_version(self.client, name, tags["model_sha256"])
        if existing is not None:
            for key, value in tags.items():
                self.client.set_model_version_tag(name, existing, key, value)
            return existing
        set_global_uri(self.uri)
        # The fluent run ends (FINISHED) with the block; the Tracker sets the run's own end later.
        with mlflow.start_run(run_id=args["run"]):
            return str(registry.log_model(args["source"], name, tags).registered_model_version)

    def _end_run(self, args: dict) -> None:
        self.client.set_terminated(args["run"], args["status"], end_time=args["end_time"])


# ---- the buffer -------------------------------------------------------------------------------

@dataclass
class Progress:
    """uploaded.json: how many lines of the buffer's operations.jsonl (named by its first line's
    id) are in the store, and the store's ids of the local keys (kept across buffers: a later
    command may reopen a run created offline)."""
    buffer: str | None = None
    done: int = 0
    ids: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, directory: Path) -> "Progress":
        path = directory / PROGRESS
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def write(self, directory: Path) -> None:
        from hamu_ray import files

        files.write_atomic(directory / PROGRESS, json.dumps(self.__dict__, indent=1))


class Buffer:
    """operations.jsonl in a directory: the writes a Tracker could not send, in order."""

    def __init__(self, directory: Path, uri: str):
        self.directory, self.uri = Path(directory).resolve(), uri
        self.written = 0  # lines this command appended

    @property
    def path(self) -> Path:
        return self.directory / OPERATIONS

    def known_ids(self) -> dict[str, str]:
        return Progress.read(self.directory).ids

    def append(self, op: str, args: dict) -> None:
        if self.written == 0:  # the first line of a buffer names it; each command marks its start
            self.directory.mkdir(parents=True, exist_ok=True)
            mark = {"op": "session", "uri": self.uri, "time": now_ms()}
            if not self.path.exists():
                mark["buffer"] = uuid.uuid4().hex
            elif ends_mid_line(self.path):  # a command killed mid-line: that line alone is
                self._write_text("\n")  # damaged, and the upload names it
            self._write_text(json.dumps(mark) + "\n")
        self._write_text(json.dumps({"op": op, **args}) + "\n")  # NaN and ±inf as NaN/Infinity: read back
        self.written += 1

    def _write_text(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text)


def ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


# ---- the tracker ------------------------------------------------------------------------------

class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None,
                 buffer_dir: Path | None = None, *, check: bool = True):
        """`buffer_dir`: where writes go once the server stops answering (a directory in the
        command's output); None: such a write raises. `check`: a server that does not answer now
        is one TrackingError (a command's start); False: the writes go to the buffer (a command
        that made the Tracker once its work was done, having checked at its start)."""
        from mlflow.tracking.context import registry as context

        if check:
            check_reachable(uri)
        self.uri, self.experiment = uri, experiment
        self.artifact_root = str(Path(artifact_root).resolve()) if artifact_root is not None else None
        self.buffer = Buffer(buffer_dir, uri) if buffer_dir is not None else None
        self.offline: str | None = None  # why, once the server stopped answering
        self.store = Store(uri)
        self.client = self.store.client
        self._context_tags = context.resolve_tags({})  # user, source: as mlflow.start_run adds
        self._runs: list[str] = []  # the open runs, innermost last
        self._ids: dict[str, str] | None = None  # the store's ids of keys uploaded before
        self.experiment_id = self._read(lambda: self.store.experiment_id(experiment, self.artifact_root), None)

    @contextlib.contextmanager
    def run(self, name: str, *, params: dict[str, Any] | None = None,
            tags: dict[str, str] | None = None, run_id: str | None = None) -> Iterator[str]:
        """A run, nested under the innermost open one; yields its id (offline: a local key).
        `run_id` reopens a run: the store's id, or the key of one created offline."""
        run = self._reopen(run_id, tags) if run_id else self._create(name, tags)
        self._runs.append(run)
        status = "FAILED"
        try:
            if params:
                self._log(run, params=flatten(params))
            yield run
            status = "FINISHED"
        finally:
            self._runs.pop()
            self._send("end_run", {"run": run, "status": status, "end_time": now_ms()})

    def log_steps(self, run_id: str, step_log: list[dict]) -> int:
        """The engine's per-step rows as MLflow metrics (numbers only); returns how many.
        NaN and ±inf are logged too (a diverging run must show it), and tagged: nonfinite_tags."""
        now = now_ms()
        points = [(key, float(value), int(row["step"])) for row in step_log for key, value in row.items()
                  if key != "step" and isinstance(value, numbers.Real)]
        self._log(run_id, metrics=[(key, value, now, step) for key, value, step in points],
                  tags=nonfinite_tags(points))
        return len(points)

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Numbers on the active run; NaN and ±inf included and tagged, as in log_steps."""
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        now = now_ms()
        self._log(self._active(), metrics=[(key, value, now, 0) for key, value in values.items()],
                  tags=nonfinite_tags([(key, value, None) for key, value in values.items()]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Tags on the active run."""
        self._log(self._active(), tags=tags)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """A file, or a directory's files (a language model's export) under `folder`."""
        self._send("log_artifact", {"run": self._active(), "path": str(Path(path).resolve()), "folder": folder})

    def register_model(self, name: str, source: dict, tags: dict[str, str]) -> str:
        """The model `source` describes (registry.model_source) logged in the active run and
        registered as a version of `name` carrying `tags`, unless a version with the same
        model_sha256 tag is there; returns the version (offline: a key the upload resolves)."""
        args = {"run": self._active(), "name": name, "source": source, "tags": tags, "version": new_key()}
        return self._send("register_model", args, unsent=args["version"])

    def search_runs(self, filter_string: str) -> list:
        """This experiment's runs that match; offline none are known."""
        return self._read(lambda: self.client.search_runs([self.experiment_id], filter_string=filter_string), [])

    def finish(self) -> None:
        """At a command's end: the command that uploads what went to the buffer, if anything did."""
        if self.buffer is not None and self.buffer.written:
            print(f"MLflow: {self.buffer.written} operations were not sent; upload them with:\n"
                  f"  {upload_command(self.buffer.directory, self.uri)}", flush=True)

    # ---- sending ----

    def _create(self, name: str, tags: dict | None) -> str:
        tags = {**self._context_tags, **{k: str(v) for k, v in (tags or {}).items()}}
        if self._runs:
            tags["mlflow.parentRunId"] = self._runs[-1]
        args = {"run": new_key(), "experiment": self.experiment, "artifact_root": self.artifact_root,
                "name": name, "tags": tags, "start_time": now_ms()}
        return self._send("create_run", args, unsent=args["run"])

    def _reopen(self, run_id: str, tags: dict | None) -> str:
        run = resolved(run_id, self._known_ids()) if mentions_unsent(run_id) else run_id  # uploaded since?
        self._send("reopen_run", {"run": run})
        if tags:
            self._log(run, tags=tags)
        return run

    def _log(self, run: str, *, params: dict | None = None, metrics: list | None = None,
             tags: dict | None = None) -> None:
        """log_batch within MLflow's limits: rounds of ≤ 100 params, ≤ 100 tags, the rest metrics."""
        params = list((params or {}).items())
        tags = [(k, str(v)) for k, v in (tags or {}).items()]
        metrics = [list(m) for m in metrics or []]
        per_round = BATCH - 2 * PARAMS_OR_TAGS
        rounds = max(math.ceil(len(params) / PARAMS_OR_TAGS), math.ceil(len(tags) / PARAMS_OR_TAGS),
                     math.ceil(len(metrics) / per_round))
        for i in range(rounds):
            self._send("log_batch", {"run": run,
                                     "params": dict(params[i * PARAMS_OR_TAGS:(i + 1) * PARAMS_OR_TAGS]),
                                     "metrics": metrics[i * per_round:(i + 1) * per_round],
                                     "tags": dict(tags[i * PARAMS_OR_TAGS:(i + 1) * PARAMS_OR_TAGS])})

    def _send(self, op: str, args: dict, unsent: Any = None) -> Any:
        """One write, now; or into the buffer once offline, or when it names a run (or version)
        only the buffer holds. Returns what the store returns (a new run's id, a version);
        buffered: `unsent`."""
        if mentions_unsent(args):
            args = resolved(args, self._known_ids())
        waits = self.offline is not None or mentions_unsent(references(op, args))
        if self.buffer is None or not waits:
            try:
                with quick_http(self.uri, op):
                    return self.store.send(op, args)
            except Exception as exc:
                if not self._went_offline(exc):
                    raise
        self.buffer.append(op, args)
        return unsent

    def _read(self, call, nothing: Any) -> Any:
        """A read; offline (or when it finds the server unreachable): `nothing`."""
        if self.offline is not None:
            return nothing
        try:
            with quick_http(self.uri):
                return call()
        except Exception as exc:
            if not self._went_offline(exc):
                raise
            return nothing

    def _went_offline(self, exc: Exception) -> bool:
        """Switch to the buffer for the rest of the command, if `exc` says the server is
        unreachable and there is a buffer; False: `exc` is another error (the caller raises)."""
        reason = unreachable_reason(exc)
        if reason is None or self.buffer is None:
            return False
        self.offline = reason
        print(f"MLflow: {self.uri} stopped answering ({reason}); this command goes on and keeps its "
              f"tracking in {self.buffer.directory}, to upload at the end", flush=True)
        return True

    def _known_ids(self) -> dict[str, str]:
        if self._ids is None:
            self._ids = self.buffer.known_ids() if self.buffer is not None else {}
        return self._ids

    def _active(self) -> str:
        if not self._runs:
            raise RuntimeError("no open run: call this inside `with tracker.run(...)`")
        return self._runs[-1]


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


# ---- `hamu-ray tracking upload` ----------------------------------------------------------------

@dataclass(frozen=True)
class UploadResult:
    uri: str
    operations: int  # in the buffer
    sent: int  # by this call; the others were sent before
    uploaded_file: Path | None  # where operations.jsonl went; None: there was nothing to upload


def upload(directory: Path, uri: str | None = None) -> UploadResult:
    """Replay a buffer's operations in order against the store at `uri` (default: the one the
    buffer records), going on after the last one a previous call sent."""
    directory = Path(directory).resolve()
    lines = read_operations(directory)
    if lines is None:
        return UploadResult(uri or "", 0, 0, None)
    uri = uri or recorded_uri(directory, lines)
    check_reachable(uri, "Nothing was uploaded.")
    progress = Progress.read(directory)
    if progress.buffer != lines[0]["buffer"]:  # a new buffer since the last upload
        progress = Progress(lines[0]["buffer"], 0, progress.ids)
    store, start = Store(uri), progress.done
    with env_defaults({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):  # two lines per run's end
        for index in range(start, len(lines)):
            send_line(store, lines[index], progress, directory, index, len(lines))
            progress.done = index + 1
            progress.write(directory)
    done = retired_name(directory)
    (directory / OPERATIONS).rename(done)
    writes = [line["op"] != "session" for line in lines]  # not the commands' markers
    return UploadResult(uri, sum(writes), sum(writes[start:]), done)


def send_line(store: Store, line: dict, progress: Progress, directory: Path, index: int, total: int) -> None:
    from mlflow.exceptions import MlflowException

    op, args = line["op"], {k: v for k, v in line.items() if k != "op"}
    try:
        with quick_http(store.uri, op):
            made = store.send(op, resolved(args, progress.ids))
    except Exception as exc:
        reason = unreachable_reason(exc)
        if reason is not None:
            raise TrackingError(f"tracking URI {store.uri} stopped answering ({reason}) after {index} of {total} "
                                f"operations of {directory / OPERATIONS}; run the same command again to upload "
                                "the rest") from None
        if isinstance(exc, MlflowException):  # e.g. a run this store does not have: another server?
            raise TrackingBufferError(f"{directory / OPERATIONS}, line {index + 1} ({op}): the store at "
                                      f"{store.uri} refused it: {exc.message}") from None
        raise
    if op in MAKES:
        progress.ids[args[MAKES[op]]] = made


def read_operations(directory: Path) -> list[dict] | None:
    """The buffer's lines; None when everything in it was uploaded before."""
    if not directory.is_dir():
        raise MissingInputError(f"{directory}: no such directory (a tracking buffer is the directory a "
                                "command named when its MLflow server stopped answering)")
    path = directory / OPERATIONS
    if not path.exists():
        if (directory / UPLOADED).exists():
            return None
        raise TrackingBufferError(f"{directory}: not a tracking buffer (it has no {OPERATIONS})")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            raise TrackingBufferError(f"{path}, line {number}: not an operation (cut off?): {text[:80]!r}") from None
        if not isinstance(line, dict) or line.get("op") not in OPS:
            raise TrackingBufferError(f"{path}, line {number}: not an operation: {text[:80]!r}")
        lines.append(line)
    if not lines or "buffer" not in lines[0]:
        raise TrackingBufferError(f"{path}: not a tracking buffer (its first line does not name one)")
    return lines


def recorded_uri(directory: Path, lines: list[dict]) -> str:
    uris = list(dict.fromkeys(line["uri"] for line in lines if line["op"] == "session"))
    if len(uris) > 1:
        raise TrackingBufferError(f"{directory}: commands wrote to it for several tracking URIs "
                                  f"({', '.join(uris)}); choose one with --tracking-uri")
    return uris[0]


def retired_name(directory: Path) -> Path:
    """operations.uploaded.jsonl, or .2, .3, … when earlier buffers in the directory were uploaded."""
    path, n = directory / UPLOADED, 1
    while path.exists():
        n += 1
        path = directory / f"operations.uploaded.{n}.jsonl"
    return path
