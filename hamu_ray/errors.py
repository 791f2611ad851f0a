"""The errors a user can act on. The CLI prints these as one message and exits 2; anything else
is a bug and keeps its traceback.

Each user error also derives from the built-in it refines, so `except ValueError` (or
FileExistsError, FileNotFoundError) written before this module existed still catches it.
Subclasses elsewhere: hamu_ray.schema.ConfigError and hamu_ray.engine.data.DataError (ValueError),
hamu_ray.jobs.JobsError (RuntimeError).
"""

from __future__ import annotations


class UserError(Exception):
    """A user's mistake or an unreachable service: one message, no traceback, exit 2."""


class OutputExistsError(UserError, FileExistsError):
    """An output directory is already there: results are never overwritten."""


class MissingInputError(UserError, FileNotFoundError):
    """An input the user named (weights, a data set, a file) does not exist."""


class ModelFileError(UserError, ValueError):
    """A model file the user named cannot be used (not safetensors, truncated, wrong shapes)."""


class TrackingError(UserError, ConnectionError):
    """The MLflow tracking server named by the user does not answer."""


class TrackingBufferError(UserError, ValueError):
    """A directory given to `hamu-ray tracking upload` is not a tracking buffer, or is damaged."""
