"""An older system's template, converted by ``p3s dag import --legacy``, runs on RabbitMQ + PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, env_for, make_settings, terminal_jobs, wait_for
from tests.unit.test_legacy import fan_out

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


def p3s_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``p3s`` command against the stack's broker and database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env.update(env_for(stack.settings))
    return subprocess.run([sys.executable, "-m", "p3s", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def stack(tmp_path: Path, broker_url: str, database_url: str) -> Iterator[tuple[Stack, Path]]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    # One pilot per filter: admission gives a stage whose run time it has not learned yet
    # one task per free pilot, and the three filters start together.
    s = Stack(make_settings(tmp_path, broker_url, database_url), watch=watch, pilots=3).start()
    try:
        yield s, watch
        assert s.audit().ok, s.audit().problems
    finally:
        s.stop()


def test_the_converted_fan_out_runs_its_filters_and_finishes(stack: tuple[Stack, Path], tmp_path: Path) -> None:
    s, watch = stack
    legacy = tmp_path / "fan.legacy.graphml"
    legacy.write_text(fan_out())
    done = p3s_cli(s, "dag", "import", "--legacy", str(legacy), "--name", "fan", "--trigger", "run*.dat",
                   "--budget", "120")
    assert done.returncode == 0, done.stderr
    assert "template fan version 1: 5 node(s)" in done.stdout
    assert "note: node 'filter1': P3S_EXECMODE=SHELL" in done.stderr

    (watch / "run1.dat").write_text("hello from the older system\n")
    jobs = {j["node"]: j for j in wait_for(lambda: terminal_jobs(s, 5), what="the converted fan-out")}
    assert {n: j["state"] for n, j in jobs.items()} == dict.fromkeys(
        ["entry", "filter1", "filter2", "filter3", "exit"], "finished"
    )
    (wf,) = s.workflows()
    assert wf["state"] == "finished"

    # The no-ops ran nowhere: finished by the dispatcher, with no pilot and no start.
    for noop in ("entry", "exit"):
        assert jobs[noop]["pilot_id"] is None and jobs[noop]["started_at"] is None, jobs[noop]
        assert jobs[noop]["reason"] == "no-op: nothing to run"
    assert jobs["exit"]["ended_at"] >= max(jobs[f"filter{i}"]["ended_at"] for i in (1, 2, 3))

    # Each filter, a shell command line, read the input through $INFILE and wrote through its own $OUTFILE.
    outputs = s.settings.output_path / str(wf["id"])
    for i in (1, 2, 3):
        job = jobs[f"filter{i}"]
        assert job["pilot_id"] is not None and job["exit_code"] == 0, job
        assert (outputs / f"filter{i}" / f"filter{i}.txt").read_text() == "HELLO FROM THE OLDER SYSTEM\n"
    assert not (outputs / "entry").exists() and not (outputs / "exit").exists()
