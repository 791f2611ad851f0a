"""Third-party output a user need not read, switched off where it starts with the libraries' own
settings. Each switch is scoped: to output that is not a terminal, or to one exact message; the
tool's own progress lines and every error stay."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

# Ray Data's one-line notice that its progress is off (we turned it off; see ray_driver_output)
PROGRESS_OFF_NOTICE = ("ray.data._internal.progress", "Progress bars disabled.")


def ray_driver_output() -> None:
    """Before Ray starts on the driver. Output that is not a terminal (a log file, a pipe) gets
    no ANSI colour codes around Ray's raylet lines (RAY_COLOR_PREFIX=0, read as Ray prints) and
    no Ray Data progress, which Ray Data then logs every 10 s per dataset (its own test is
    stdout's). A variable the user set stands."""
    if sys.stdout.isatty():
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        drop_log_messages(*PROGRESS_OFF_NOTICE)


class DroppedMessages(logging.Filter):
    """Drops a logger's records whose message begins with one of `beginnings`. Equal filters
    are one: a logger takes it once however often it is added."""

    def __init__(self, beginnings: tuple[str, ...]):
        super().__init__()
        self.beginnings = beginnings

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.beginnings)

    def __eq__(self, other) -> bool:
        return isinstance(other, DroppedMessages) and other.beginnings == self.beginnings

    def __hash__(self) -> int:
        return hash(self.beginnings)


def drop_log_messages(logger_name: str, *beginnings: str) -> None:
    """From now on drop the records of logger `logger_name` whose message begins with one of
    `beginnings`; every other record of that logger passes."""
    logging.getLogger(logger_name).addFilter(DroppedMessages(beginnings))


@contextlib.contextmanager
def without_log_messages(logger_name: str, *beginnings: str) -> Iterator[None]:
    """drop_log_messages while the block runs."""
    drop_log_messages(logger_name, *beginnings)
    try:
        yield
    finally:
        logging.getLogger(logger_name).removeFilter(DroppedMessages(beginnings))


@contextlib.contextmanager
def without_artifact_progress() -> Iterator[None]:
    """No MLflow artifact progress bars while the block runs (MLflow reads the variable per
    transfer): logging a model with a local directory as its artifact copies that directory
    through MLflow's download path, a "Downloading artifacts" bar for a local copy. A value the
    user set stands."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)
