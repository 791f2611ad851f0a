"""Outputs that appear complete or not at all.

A file or directory is built beside its target under a hidden name and renamed into place
(a rename within one directory is atomic), so a crash, an error or Ctrl-C never leaves a
half-written model, set or report where a later run would take it for a finished one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from hamu_ray.errors import ModelFileError, OutputExistsError


def file_stats(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of a file, or of every file below a directory, in path order: what
    tells an edited model from the one a cached result was made of, without reading it."""
    path = Path(path)
    paths = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()]


def hidden_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike, *, resume_key: str | None = None,
                keep_if: Callable[[Path, BaseException], bool] | None = None) -> Iterator[Path]:
    """A fresh directory beside `target`, renamed to it when the block succeeds and removed when
    the block raises (KeyboardInterrupt included). An existing target is refused: results are
    never overwritten. Staging directories left by a process that is gone (killed: it could not
    clean up) are removed first.

    With `resume_key` (the identity of the work) the staging directory has a fixed name, so the
    same work started again after its process was killed continues in it (an unlearning job's
    Ray Train checkpoints are there); one left by other work is refused with one error and
    nothing removed. `keep_if(staging, error)` (with a resume_key) says whether a failed block's
    directory is kept for the same work to continue, as a killed process's is; its owner
    record then says that no process writes it."""
    target = Path(target)
    if target.exists():
        raise OutputExistsError(f"{target} already exists; nothing is overwritten: choose a new one")
    if keep_if is not None and resume_key is None:
        raise ValueError("keep_if needs a resume_key: only resumable work is kept")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target, resume_key)
    staging = resumable_sibling(target) if resume_key else hidden_sibling(target, "partial")
    staging.mkdir(exist_ok=resume_key is not None)
    write_atomic(owner_file(staging), json.dumps({**this_process(), "key": resume_key}))
    try:
        yield staging
        staging.rename(target)
    except BaseException as exc:
        if keep_if is not None and keep_if(staging, exc):
            write_atomic(owner_file(staging), json.dumps({"stopped": True, "key": resume_key}))
            raise
        shutil.rmtree(staging, ignore_errors=True)
        owner_file(staging).unlink(missing_ok=True)
        raise
    owner_file(staging).unlink(missing_ok=True)


def resumable_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def owner_file(staging: Path) -> Path:
    """Who is writing a staging directory (host, pid, process start time, resume key): a
    sibling file, so that the staged directory holds only the output."""
    return staging.parent / f"{staging.name}.owner.json"


def this_process() -> dict:
    import socket

    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def owner_alive(owner: dict) -> bool:
    """False when the owner stopped (a failed run kept for resuming), or was on this host and its
    process is gone (a reused pid is told apart by its start time); another host's process
    cannot be checked from here."""
    import socket

    import psutil

    if owner.get("stopped"):
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        return abs(psutil.Process(int(owner["pid"])).create_time() - float(owner["started"])) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError, TypeError):
        return False


def remove_abandoned(target: Path, resume_key: str | None = None) -> None:
    """Remove the staging directories of `target` whose owner process is gone, except the
    resumable one of the same work (`resume_key`): that one is kept to be continued. A live
    owner's resumable directory, or an abandoned one of other work, is refused."""
    for staging in sorted(target.parent.glob(f".{glob.escape(target.name)}.partial*")):
        if staging.name.endswith(".owner.json") or not staging.is_dir():
            continue
        try:
            owner = json.loads(owner_file(staging).read_text())
        except (OSError, ValueError):
            continue  # no owner record (an older version's, or one being created): left alone
        resumable = staging == resumable_sibling(target)
        if owner_alive(owner):
            if resumable and resume_key is not None:
                raise OutputExistsError(
                    f"{target}: another run is writing it ({staging.name}, pid {owner.get('pid')} on "
                    f"{owner.get('host')}); wait for it, or stop it first")
            continue
        if resumable and resume_key is not None:
            if owner.get("key") == resume_key:
                continue  # the same work, interrupted: resumed from it
            raise OutputExistsError(
                f"{target}: {staging} holds an interrupted run of another job (its model, data, "
                "method or settings differ from this one's); run that job again to resume it, or "
                "remove that directory to start this one")
        shutil.rmtree(staging, ignore_errors=True)
        owner_file(staging).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """An empty temporary file beside `path` for the block to write; it replaces `path` when the
    block succeeds and is deleted when it raises. `mode` (e.g. 0o600 for files holding forget
    rows) is set before anything is written; None: the usual mode of a new file (umask)."""
    path = Path(path)
    tmp = hidden_sibling(path, "tmp")
    # created owner-only when a mode is asked for: sensitive bytes are never readable by others
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600))
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes, mode: int | None = None) -> None:
    """`data` (text is written as UTF-8) at `path`, all of it or none; see atomic_path."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def removed_unless_kept(path: str | os.PathLike) -> Iterator[Callable[[], None]]:
    """For a block that creates the directory `path`: yields `keep`. If the block raises before
    calling it and `path` did not exist before, `path` is removed, with the parents made for it
    while they are empty. An existing `path` is left alone: nothing that was there is removed."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not os.path.lexists(p)]  # path first, then upward
    kept = False

    def keep() -> None:
        nonlocal kept
        kept = True

    try:
        yield keep
    except BaseException:
        if made and not kept:
            shutil.rmtree(path, ignore_errors=True)
            for parent in made[1:]:
                with contextlib.suppress(OSError):  # not empty: someone else writes there too
                    parent.rmdir()
        raise


def write_rows(rows: list[dict], path: str | os.PathLike, schema=None) -> Path:
    """Rows as one parquet file, whole or not at all, owner-only: every set is handled as a
    user's forget rows are (they are sensitive). Pages carry CRC checksums, which every reader
    of the rows verifies (engine.data.read_piece)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path, mode=0o600) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, write_page_checksum=True)
    return Path(path)


def check_safetensors(path: str | os.PathLike, field: str) -> None:
    """A safetensors file whose header parses and whose tensors' bytes are all there, read
    from the header alone: a truncated copy fails here, on the driver, with one message, not
    in every worker with a deserialisation traceback."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{field} {path}: not a safetensors file ({exc})") from None
    if size < 8 + length + end:
        raise ModelFileError(f"{field} {path}: truncated: {size} bytes, its header needs {8 + length + end}")
