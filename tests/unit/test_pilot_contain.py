"""Payload containment: the mark, the cgroup and the tree find every process a payload started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p3s.pilot import contain
from p3s.pilot.contain import MARK_VARIABLE, Containment

# Starts a daemon by double fork + setsid, and one more that drops its whole environment,
# writes their pids, then exits (or holds on).
SCRIPT = """\
import os, sys, time
out, hold = sys.argv[1], float(sys.argv[2])
def spawn(name, argv, env):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(os.path.join(out, name), "w") as fh:
                fh.write(str(os.getpid()))
            os.execve(argv[0], argv, env)
        os._exit(0)
spawn("marked", ["/bin/sleep", "1000"], dict(os.environ))
spawn("bare", ["/bin/sleep", "1001"], {})
while not all(os.path.exists(os.path.join(out, n)) for n in ("marked", "bare")):
    time.sleep(0.01)
time.sleep(hold)
"""


@pytest.fixture(params=["cgroup", "mark"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test with the cgroup (where this host gives one) and with the environment mark alone."""
    if request.param == "cgroup":
        if contain._own_cgroup() is None:
            pytest.skip("no cgroup v2 hierarchy here")
    else:
        monkeypatch.setattr(contain, "_own_cgroup", lambda: None)
    return request.param


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


def start(tmp_path: Path, box: Containment, hold: float) -> tuple[subprocess.Popen[bytes], int, int]:
    script = tmp_path / "spawn.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([*box.prefix(), sys.executable, str(script), str(tmp_path), str(hold)],
                            env=box.environ(dict(os.environ)), start_new_session=True)
    box.attach(proc)
    end = time.monotonic() + 10
    while not ((tmp_path / "marked").exists() and (tmp_path / "bare").exists()):
        assert time.monotonic() < end, "the payload did not start its daemons"
        time.sleep(0.01)
    time.sleep(0.05)  # the pid files are written just before exec
    return proc, int((tmp_path / "marked").read_text()), int((tmp_path / "bare").read_text())


def test_the_mark_is_in_the_environment_and_names_pilot_and_job() -> None:
    box = Containment("pilot-1", 42)
    try:
        env = box.environ({MARK_VARIABLE: "someone else's", "A": "b"})
        assert env[MARK_VARIABLE] == box.mark and box.mark.startswith("pilot-1.42.")
        assert env["A"] == "b"
        assert Containment("pilot-1", 42).mark != box.mark, "each job has a mark of its own"
    finally:
        box.close()


def test_a_daemon_outside_the_process_group_is_killed_after_its_payload_exits(tmp_path: Path, way: str) -> None:
    box = Containment("unit", 1)
    assert (box.cgroup is not None) == (way == "cgroup")
    proc, marked, bare = start(tmp_path, box, hold=0)
    try:
        assert proc.wait(10) == 0
        assert alive(marked) and alive(bare), "the daemons outlive the payload and its killpg"
        found = box.members()
        assert marked in found, "found by its mark or its cgroup"
        if way == "cgroup":
            assert bare in found, "found by the cgroup, though it has no mark and left the tree"
        box.close()
        assert not alive(marked)
        if way == "cgroup":
            assert not alive(bare)
        # Without a cgroup, a daemon that left the tree and scrubbed its environment is beyond reach.
    finally:
        for pid in (marked, bare):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_kill_while_the_payload_runs_reaches_every_descendant(tmp_path: Path, way: str) -> None:
    box = Containment("unit", 2)
    proc, marked, bare = start(tmp_path, box, hold=60)
    try:
        assert proc.poll() is None
        box.signal(signal.SIGTERM)
        # Without a cgroup, the scrubbed daemon is out of reach once it left the payload's tree.
        wanted = (marked, bare) if way == "cgroup" else (marked,)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in wanted) and time.monotonic() < deadline:
            box.reap()
            time.sleep(0.02)
        assert not any(alive(p) for p in wanted), "found by its mark or cgroup while the payload lives"
        assert proc.poll() is None, "the payload itself is left to its own Popen"
    finally:
        proc.kill()
        proc.wait()
        box.close()
        for pid in (marked, bare):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_adopted_orphans_are_reaped(tmp_path: Path, way: str) -> None:
    if not contain.become_subreaper():
        pytest.skip("this kernel does not let a process become a child subreaper")
    box = Containment("unit", 3)
    proc, marked, bare = start(tmp_path, box, hold=0)
    try:
        proc.wait(10)
        box.track()
        box.close()
        for pid in (marked, bare):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        box.reap()
        # A killed daemon the pilot adopted is waited for, not left a zombie.
        assert not os.path.exists(f"/proc/{marked}"), "an adopted daemon was left a zombie"
    finally:
        for pid in (marked, bare):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_cgroup_is_removed_with_the_containment() -> None:
    box = Containment("unit", 4)
    where = box.cgroup
    box.close()
    assert box.cgroup is None
    if where is not None:
        assert not where.exists()
