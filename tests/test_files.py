"""The one place outputs are staged: a directory or file appears complete, or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from hamu_ray.files import atomic_path, removed_unless_kept, staging_dir, write_atomic


def test_staging_dir_appears_at_the_target_only_on_success(tmp_path):
    target = tmp_path / "stages" / "original-abc"
    with staging_dir(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".original-abc.partial-")
        (staging / "summary.json").write_text("{}")
        assert not target.exists()
    assert (target / "summary.json").read_text() == "{}"
    assert os.listdir(target.parent) == ["original-abc"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_staging_leaves_nothing(tmp_path, error):
    target = tmp_path / "out"
    with pytest.raises(error):
        with staging_dir(target) as staging:
            (staging / "half-written").write_text("x")
            raise error()
    assert os.listdir(tmp_path) == []


def test_staging_dir_refuses_an_existing_target(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model").write_text("keep me")
    with pytest.raises(FileExistsError, match="out already exists"):
        with staging_dir(tmp_path / "out"):
            pytest.fail("the block must not run")
    assert (tmp_path / "out" / "model").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["out"]


def test_write_atomic_replaces_text_or_bytes_and_sets_the_mode(tmp_path):
    path = tmp_path / "forget.json"
    write_atomic(path, "old")
    write_atomic(path, "naïve\n")
    assert path.read_text(encoding="utf-8") == "naïve\n"
    write_atomic(path, b"\x00\x01", mode=0o600)
    assert path.read_bytes() == b"\x00\x01" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["forget.json"]


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path, error):
    path = tmp_path / "set.parquet"
    path.write_text("old")
    with pytest.raises(error):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise error()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["set.parquet"]


def test_removed_unless_kept_removes_a_new_directory_and_the_parents_made_for_it(tmp_path):
    out = tmp_path / "runs" / "demo"
    with pytest.raises(ValueError):
        with removed_unless_kept(out):
            (out / "stages").mkdir(parents=True)
            raise ValueError("prepare failed")
    assert os.listdir(tmp_path) == []


def test_removed_unless_kept_keeps_a_kept_or_existing_directory(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with removed_unless_kept(out) as keep:
            out.mkdir()
            keep()
            raise ValueError("a training stage failed")
    assert out.is_dir()
    (out / "earlier").write_text("cached")
    with pytest.raises(ValueError):
        with removed_unless_kept(out):
            raise ValueError("prepare failed")
    assert (out / "earlier").read_text() == "cached"


def dead_owner() -> dict:
    """The owner record of a process that has exited (this host, its pid and start time)."""
    import socket
    import subprocess
    import sys

    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    record = {"host": socket.gethostname(), "pid": child.pid, "started": psutil.Process(child.pid).create_time()}
    child.wait()
    return record


def leave_staging(target, name: str, owner: dict, key: str | None = None):
    """A staging directory as a killed process leaves it: its contents and its owner record."""
    import json

    from hamu_ray.files import owner_file

    staging = target.parent / name
    staging.mkdir(parents=True)
    (staging / "checkpoint").write_text("step 2")
    owner_file(staging).write_text(json.dumps({**owner, "key": key}))
    return staging


def test_staging_left_by_a_killed_process_is_removed_and_a_live_ones_kept(tmp_path):
    from hamu_ray.files import this_process

    target = tmp_path / "report"
    gone = leave_staging(target, ".report.partial-0000dead", dead_owner())
    alive = leave_staging(target, ".report.partial-0000live", this_process())  # a concurrent writer
    with staging_dir(target) as staging:
        (staging / "hardness.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == sorted(["report", alive.name, alive.name + ".owner.json"])
    assert not gone.exists()


def test_the_same_work_continues_in_its_interrupted_staging_and_other_work_is_refused(tmp_path):
    from hamu_ray.errors import OutputExistsError
    from hamu_ray.files import this_process

    target = tmp_path / "out"
    left = leave_staging(target, ".out.partial", dead_owner(), key="job-a")
    with pytest.raises(OutputExistsError, match=r"out\.partial holds an interrupted run of another job"):
        with staging_dir(target, resume_key="job-b"):
            pytest.fail("the block must not run")
    assert (left / "checkpoint").read_text() == "step 2"  # nothing removed

    with staging_dir(target, resume_key="job-a") as staging:
        assert staging == left and (staging / "checkpoint").read_text() == "step 2"  # continued
        with pytest.raises(OutputExistsError, match="another run is writing it"):  # while it runs
            with staging_dir(target, resume_key="job-a"):
                pytest.fail("the block must not run")
    assert (target / "checkpoint").read_text() == "step 2" and os.listdir(tmp_path) == ["out"]

    leave_staging(tmp_path / "again", ".again.partial", this_process(), key="job-a")  # alive owner
    with pytest.raises(OutputExistsError, match="another run is writing it"):
        with staging_dir(tmp_path / "again", resume_key="job-a"):
            pytest.fail("the block must not run")


def test_a_failed_block_kept_on_request_is_continued_by_the_same_work_only(tmp_path):
    from hamu_ray.errors import OutputExistsError

    target = tmp_path / "out"
    interrupted = lambda staging, error: isinstance(error, KeyboardInterrupt)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(target, resume_key="job-a", keep_if=interrupted) as staging:
            (staging / "checkpoint").write_text("step 2")
            raise KeyboardInterrupt
    assert (staging / "checkpoint").read_text() == "step 2" and not target.exists()
    with pytest.raises(OutputExistsError, match=r"out\.partial holds an interrupted run of another job"):
        with staging_dir(target, resume_key="job-b"):
            pytest.fail("the block must not run")
    # the same process continues it (its owner record says no process writes it); an error the
    # predicate does not keep removes it
    with pytest.raises(RuntimeError):
        with staging_dir(target, resume_key="job-a", keep_if=interrupted) as again:
            assert again == staging and (again / "checkpoint").read_text() == "step 2"
            raise RuntimeError("diverged")
    assert os.listdir(tmp_path) == []
