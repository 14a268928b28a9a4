"""A pilot's own end: job and idle limits, lifetime, and the first and second SIGTERM (RabbitMQ + PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, env_for, graphml, make_settings, probe_command, terminal_jobs, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
def stack(tmp_path: Path, broker_url: str, database_url: str) -> Iterator[tuple[Stack, Path]]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    s = Stack(make_settings(tmp_path, broker_url, database_url), watch=watch, pilots=0).start()
    try:
        yield s, watch
    finally:
        s.stop()


def pilot(stack: Stack, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env.update(env_for(stack.settings), P3S_DATABASE_URL="")
    return subprocess.Popen([sys.executable, "-m", "p3s", "pilot", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the pilot did not stop by itself:\n{out}") from None
    return out


def test_max_jobs_then_exit(stack: tuple[Stack, Path]) -> None:
    s, watch = stack
    s.import_template(graphml({"probe": {"command": probe_command()}}))
    proc = pilot(s, "--max-jobs", "2", "--id", "two-jobs")
    for i in range(3):
        (watch / f"f{i}.dat").write_bytes(b"x")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert "ran 2 job(s)" in out
    states = sorted(j["state"] for j in s.jobs())
    assert states == ["finished", "finished", "queued"], "the third task waits for another pilot"
    wait_for(lambda: s.pilots_by_id().get("two-jobs", {}).get("state") == "stopped", what="the goodbye")


def test_idle_exit(stack: tuple[Stack, Path]) -> None:
    s, _watch = stack
    started = time.monotonic()
    proc = pilot(s, "--idle-exit", "1.5", "--id", "idler")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert "idle for" in out
    assert time.monotonic() - started >= 1.5


def test_lifetime_too_short_for_the_task_hands_it_back(stack: tuple[Stack, Path]) -> None:
    s, watch = stack
    s.import_template(graphml({"probe": {"command": probe_command(), "wall_s": "600"}}))
    (watch / "long.dat").write_bytes(b"x")
    wait_for(lambda: [j for j in s.jobs() if j["state"] == "queued"], what="the task queued")
    proc = pilot(s, "--lifetime", "30", "--id", "short-lived")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert "less than job" in out
    (job,) = s.jobs()
    assert job["state"] == "queued" and job["started_at"] is None, "the task went back untouched"
    # Another pilot with time enough takes it.
    other = pilot(s, "--max-jobs", "1")
    assert finish(other) and other.returncode == 0
    assert s.jobs()[0]["state"] == "finished"


def test_first_sigterm_finishes_the_job(stack: tuple[Stack, Path]) -> None:
    s, watch = stack
    s.import_template(graphml({"probe": {"command": probe_command("--sleep", "2")}}))
    proc = pilot(s, "--id", "polite")
    (watch / "a.dat").write_bytes(b"x")
    wait_for(lambda: [j for j in s.jobs() if j["state"] == "running"], what="the job to run")
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0, out
    (job,) = terminal_jobs(s, 1) or wait_for(lambda: terminal_jobs(s, 1), what="the report")
    assert job["state"] == "finished"


def test_second_sigterm_kills_the_payload_group(stack: tuple[Stack, Path]) -> None:
    s, watch = stack
    s.import_template(graphml({"probe": {"command": probe_command("--sleep", "60", "--grandchild")}}))
    proc = pilot(s, "--id", "hasty")
    (watch / "a.dat").write_bytes(b"x")
    wait_for(lambda: [j for j in s.jobs() if j["state"] == "running"], what="the job to run")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, timeout=15)
    assert proc.returncode == 0, out
    (job,) = wait_for(lambda: terminal_jobs(s, 1), what="the report")
    assert job["state"] == "failed" and "stop at once" in job["reason"]
    from tests.scenarios import _alive, read_probe

    seen = read_probe(s, job)
    wait_for(lambda: not _alive(seen["grandchild"]), timeout=5, what="the grandchild to be gone")
    assert not Path(seen["cwd"]).exists(), "no work directory is left behind"
