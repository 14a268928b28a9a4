"""Pilots from the operator's desk: ``p3s pilots drain|stop [--now]`` over RabbitMQ, recorded in PostgreSQL.

The dispatcher runs in this process; each pilot is a ``p3s pilot`` process and
each order a ``p3s pilots ...`` command, as an operator runs them.  The orders
reach the pilots through the broker only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Stack, env_for, graphml, make_settings, probe_command, wait_for

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


def _env(stack: Stack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env.update(env_for(stack.settings), P3S_PILOT_KILL_GRACE_S="1")
    return env


def pilot(stack: Stack, *args: str) -> subprocess.Popen[str]:
    env = {**_env(stack), "P3S_DATABASE_URL": ""}  # a pilot needs no database
    return subprocess.Popen([sys.executable, "-m", "p3s", "pilot", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def p3s(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p3s", *args], env=_env(stack), text=True, capture_output=True,
                          timeout=60, check=False)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the pilot did not stop:\n{out}") from None
    return out


def state_of(stack: Stack, pilot_id: str) -> dict[str, Any]:
    return stack.pilots_by_id().get(pilot_id, {})


def registered(stack: Stack, pilot_id: str) -> None:
    wait_for(lambda: state_of(stack, pilot_id).get("state") == "idle", what=f"pilot {pilot_id} registered")


def running_job(stack: Stack) -> dict[str, Any]:
    return wait_for(lambda: next((j for j in stack.jobs() if j["state"] == "running"), None),
                    what="a job running")


def gone(pid: int) -> bool:
    """No such process, or only its zombie (a container's init may be slow to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def probe_record(stack: Stack) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for path in Path(stack.settings.output_path).glob("*/*/probe.json"):
            try:
                return json.loads(path.read_text())
            except ValueError:  # being written
                return None
        return None

    return wait_for(found, what="the payload's record")


def test_drain_finishes_the_current_job_takes_no_new_one_and_exits(stack: tuple[Stack, Path], tmp_path: Path
                                                                    ) -> None:
    s, watch = stack
    release = tmp_path / "release"
    s.import_template(graphml({"probe": {"command": probe_command("--until", str(release))}}))
    proc = pilot(s, "--id", "drainee")
    try:
        registered(s, "drainee")
        (watch / "first.dat").write_bytes(b"x")
        running_job(s)
        done = p3s(s, "pilots", "drain", "--id", "drainee")
        assert done.returncode == 0, done.stderr
        assert "pilot drainee: told to drain" in done.stdout
        wait_for(lambda: state_of(s, "drainee").get("state") == "draining", what="draining in p3s pilots")
        listed = p3s(s, "pilots")
        assert "draining" in listed.stdout, listed.stdout
        # Said twice, it is still one order: the pilot is alive and draining.
        assert p3s(s, "pilots", "drain", "--id", "drainee").returncode == 0
        (watch / "second.dat").write_bytes(b"x")
        wait_for(lambda: len(s.jobs()) == 2, what="the second job")
        release.touch()
        out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "drained (told by the operator)" in out
    jobs = {j["file"].rsplit("/", 1)[-1]: j for j in s.jobs()}
    wait_for(lambda: {j["state"] for j in s.jobs() if j["file"].endswith("first.dat")} == {"finished"},
             what="the current job finished")
    assert jobs["second.dat"]["state"] == "queued", "a draining pilot takes no new task"
    wait_for(lambda: state_of(s, "drainee").get("state") == "stopped", what="the goodbye")
    assert state_of(s, "drainee")["problem"] == "stopped by operator"
    assert "stopped by operator" in p3s(s, "pilots").stdout

    # Gone now: refused, with a reason, exit 1; nothing is sent.
    again = p3s(s, "pilots", "drain", "--id", "drainee")
    assert again.returncode == 1
    assert "not alive" in again.stderr and "stopped by operator" in again.stderr, again.stderr


def test_stop_now_kills_the_whole_payload_reports_its_job_and_exits(stack: tuple[Stack, Path]) -> None:
    s, watch = stack
    s.import_template(graphml({"probe": {"command": probe_command("--grandchild", "--sleep", "120")}}))
    proc = pilot(s, "--id", "stopped-now")
    try:
        registered(s, "stopped-now")
        (watch / "long.dat").write_bytes(b"x")
        job = running_job(s)
        record = probe_record(s)
        done = p3s(s, "pilots", "stop", "--host", socket.gethostname(), "--now")
        assert done.returncode == 0, done.stderr
        assert "pilot stopped-now: told to stop now" in done.stdout
        out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    ended = wait_for(lambda: next((j for j in s.jobs() if j["id"] == job["id"] and j["state"] != "running"), None),
                     what="the job's report")
    assert ended["state"] == "dropped"
    assert ended["reason"] == "stopped by operator: pilot stopped-now was told to stop at once"
    wait_for(lambda: gone(record["pid"]) and gone(record["grandchild"]), timeout=10,
             what="the payload and its child gone")
    wait_for(lambda: state_of(s, "stopped-now").get("state") == "stopped", what="the goodbye")
    assert state_of(s, "stopped-now")["problem"] == "stopped by operator"


def test_plain_stop_of_idle_pilots_on_a_host_and_refusals(stack: tuple[Stack, Path]) -> None:
    s, _watch = stack
    unknown = p3s(s, "pilots", "stop", "--id", "nobody-of-that-name")
    assert unknown.returncode == 2 and "no pilot nobody-of-that-name" in unknown.stderr
    usage = p3s(s, "pilots", "stop", "--id", "a", "--host", "b")
    assert usage.returncode == 2
    procs = [pilot(s, "--id", f"idle-{i}") for i in range(2)]
    try:
        for i in range(2):
            registered(s, f"idle-{i}")
        done = p3s(s, "pilots", "stop", "--host", socket.gethostname())
        assert done.returncode == 0, done.stderr
        assert "pilot idle-0: told to stop" in done.stdout and "pilot idle-1: told to stop" in done.stdout
        outs = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], outs
    for i in range(2):
        wait_for(lambda i=i: state_of(s, f"idle-{i}").get("state") == "stopped", what="the goodbyes")
    refused = p3s(s, "pilots", "stop", "--host", socket.gethostname(), "--now")
    assert refused.returncode == 1
    assert "no pilot alive" in refused.stderr, refused.stderr
