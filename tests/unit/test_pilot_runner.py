"""The runner and stage-in without a server: errors while preparing a job end it with a reason."""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

import pytest

from p3s.messages import Task
from p3s.pilot.runner import describe, exit_reason, root_problem, run_payload
from p3s.pilot.stagein import StageInError, stage_in, stage_in_timeout
from p3s.states import JobState


def task(argv: list[str], *, job_id: int = 7, wall_s: float = 30, stage: bool = False, **values: str) -> Task:
    now = time.time()
    return Task(job_id=job_id, workflow_id=1, template="t", node="n", argv=argv, values=dict(values), env={},
                queue="default", priority=5, wall_s=wall_s, deadline=now + 60, seen_at=now, enqueued_at=now,
                stage_in=stage)


def run(t: Task, work_root: str | None, log_root: Path, beats: list[float] | None = None) -> object:
    return run_payload(t, work_root=work_root, log_root=log_root, on_start=lambda _t: None,
                       between_slices=lambda: beats.append(time.monotonic()) if beats is not None else None,
                       kill_requested=lambda: False, kill_grace_s=0.5, slice_s=0.1, stage_in=stage_in)


def test_describe_names_the_error_in_words() -> None:
    assert describe(OSError(errno.ENOSPC, "x")) == "no space left on device"
    assert describe(OSError(errno.EROFS, "x")) == "read-only file system"
    assert exit_reason(3) == "exit code 3" and exit_reason(-9) == "killed by signal SIGKILL"


def test_a_work_root_that_cannot_be_made_fails_the_job_with_the_cause(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = run(task(["true"]), str(blocker / "work"), tmp_path / "logs")
    assert out.state == JobState.FAILED and out.started_at is None
    assert out.reason == f"not a directory creating the work directory under {blocker / 'work'}"


def test_a_log_directory_that_cannot_be_made_fails_the_job_with_the_cause(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("")
    out = run(task(["true"]), str(tmp_path / "work"), blocker)
    assert out.state == JobState.FAILED
    assert out.reason.startswith("not a directory creating the log directory"), out.reason
    assert list((tmp_path / "work").iterdir()) == [], "the work directory is removed"


def test_a_failing_payload_says_how_it_failed(tmp_path: Path) -> None:
    out = run(task([sys.executable, "-c", "raise SystemExit(28)"]), str(tmp_path / "work"), tmp_path / "logs")
    assert out.state == JobState.FAILED and out.exit_code == 28 and out.reason == "exit code 28"


def test_root_problem_sees_an_unusable_root(tmp_path: Path) -> None:
    assert root_problem(str(tmp_path / "work"), tmp_path / "logs") == ""
    blocker = tmp_path / "file"
    blocker.write_text("")
    problem = root_problem(str(blocker), tmp_path / "logs")
    assert problem == f"the work root {blocker} is unusable: file exists"
    assert root_problem(str(tmp_path / "work"), blocker).startswith(f"the log root {blocker} is unusable")


def test_stage_in_copies_a_local_file(tmp_path: Path) -> None:
    source = tmp_path / "raw.dat"
    source.write_bytes(b"abc" * 1000)
    work = tmp_path / "w"
    work.mkdir()
    values: dict[str, str | list[str]] = {"input": str(source)}
    stage_in(task(["true"], stage=True), str(work), values)
    assert values["input"] == str(work / "raw.dat") and (work / "raw.dat").read_bytes() == source.read_bytes()


def test_stage_in_of_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(StageInError, match="stage-in of .*missing.dat failed"):
        stage_in(task(["true"], stage=True), str(tmp_path), {"input": str(tmp_path / "missing.dat")})


def test_a_copy_that_never_ends_heartbeats_and_times_out(tmp_path: Path) -> None:
    fifo = tmp_path / "never.fifo"
    os.mkfifo(fifo)  # no writer ever comes: a read from it blocks, like one from a hung mount
    beats: list[float] = []
    work = tmp_path / "w"
    work.mkdir()
    started = time.monotonic()
    with pytest.raises(StageInError, match=r"stage-in of .*never.fifo timed out after 1.5s"):
        stage_in(task(["true"], stage=True), str(work), {"input": str(fifo)}, lambda: beats.append(1),
                 timeout_s=1.5)
    assert time.monotonic() - started < 10
    assert len(beats) >= 2, "the pilot's heartbeats went on during the copy"


def test_a_stage_in_timeout_ends_the_job_with_its_reason(tmp_path: Path) -> None:
    fifo = tmp_path / "never.fifo"
    os.mkfifo(fifo)
    beats: list[float] = []
    out = run(task(["true"], wall_s=1, stage=True, input=str(fifo)), str(tmp_path / "work"), tmp_path / "logs",
              beats)
    assert out.state == JobState.FAILED and out.started_at is None
    assert "stage-in" in out.reason and "timed out after 1s" in out.reason, out.reason
    assert beats


def test_stage_in_timeout_is_within_wall_limit_and_deadline() -> None:
    t = task(["true"], wall_s=900)
    assert stage_in_timeout(t, now=t.deadline - 30) == 30
    assert stage_in_timeout(task(["true"], wall_s=5)) == 5
    assert stage_in_timeout(task(["true"], wall_s=5000), now=0) == 600
    assert stage_in_timeout(t, now=t.deadline + 10) == 1.0
