"""``pilot.payload_user``: a pilot started as root runs its payloads as another user.

The payload then cannot read the pilot's credentials (a password file mode
0600 owned by root stands for them here), yet its job runs, writes into its
output directory, and is contained as before: the cgroup, the mark and the
kill reach a payload of another user, and a pilot killed outright takes its
payload with it.  A pilot that is not root refuses the setting.

The tests that run payloads as ``nobody`` need root: they skip elsewhere, and
fail under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p3s.errors import ConfigError
from p3s.messages import Task
from p3s.pilot.contain import _own_cgroup
from p3s.pilot.identity import RunAs, payload_identity
from p3s.pilot.runner import Outcome, root_problem, run_payload
from p3s.pilot.stagein import stage_in
from p3s.states import JobState
from tests.procs import ROOT, Parts
from tests.stack import Stack, graphml, make_settings, terminal_jobs, wait_for

CI = os.environ.get("CI", "").lower() == "true"
PAYLOAD_USER = "nobody"

WHOAMI = textwrap.dedent("""\
    import json, os, subprocess, sys
    out, secret = sys.argv[1], sys.argv[2]
    record = {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "id_u": subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip(),
        "home": os.environ.get("HOME"), "user": os.environ.get("USER"),
        "p3s_env": sorted(k for k in os.environ if k.startswith("P3S_")),
        "cwd": os.getcwd(), "cgroup": open("/proc/self/cgroup").read(),
        "input": sys.argv[3] if len(sys.argv) > 3 else "",
    }
    try:
        with open(secret) as fh:
            record["secret"] = fh.read()
    except PermissionError:
        record["secret"] = "denied"
    with open("scratch", "w") as fh:  # its work directory is its own
        fh.write("x")
    if record["input"]:
        record["input_bytes"] = len(open(record["input"], "rb").read())
    with open(os.path.join(out, "whoami.json"), "w") as fh:
        json.dump(record, fh)
    """)

DAEMON = textwrap.dedent("""\
    import os, sys, time
    out, hold = sys.argv[1], float(sys.argv[2])
    pidfile = os.path.join(out, "daemon.pid")
    if os.fork() == 0:          # out of the payload's session and process group, environment wiped
        os.setsid()
        if os.fork() == 0:
            with open(pidfile + ".tmp", "w") as fh:
                fh.write(f"{os.getpid()} {os.getuid()}")
            os.rename(pidfile + ".tmp", pidfile)
            os.execve("/bin/sleep", ["sleep", "1000"], {})
        os._exit(0)
    while not os.path.exists(pidfile):
        time.sleep(0.01)
    time.sleep(hold)
    """)


def need_root() -> None:
    if os.geteuid() == 0:
        return
    message = "running payloads as another user needs a pilot started as root"
    if CI:
        pytest.fail(message + " (CI=true: this test never skips)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def nobody() -> RunAs:
    need_root()
    run_as = payload_identity(PAYLOAD_USER)
    assert run_as is not None
    return run_as


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone), removed afterwards."""
    where = Path(tempfile.mkdtemp(prefix="p3s-payload-user-"))
    where.chmod(0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def secret(place: Path) -> Path:
    """What stands for the pilot's broker password file: root's, mode 0600."""
    path = place / "broker-pilot"
    path.write_text("the-pilot-password\n")
    path.chmod(0o600)
    return path


def script(place: Path, name: str, text: str) -> Path:
    path = place / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def a_task(argv: list[str], outdir: Path, *, job_id: int = 11, wall_s: float = 30, **values: Any) -> Task:
    now = time.time()
    return Task(job_id=job_id, workflow_id=3, template="t", node="n", argv=argv,
                values={"outdir": str(outdir), **values}, env={}, queue="default", priority=5, wall_s=wall_s,
                deadline=now + 120, seen_at=now, enqueued_at=now, stage_in="input" in values)


def run(t: Task, place: Path, run_as: RunAs | None) -> Outcome:
    return run_payload(t, work_root=str(place / "work"), log_root=place / "logs", on_start=lambda _t: None,
                       between_slices=lambda: None, kill_requested=lambda: False, kill_grace_s=0.5, slice_s=0.1,
                       stage_in=stage_in, run_as=run_as)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


# -- the setting itself ------------------------------------------------------------------


def test_the_setting_is_refused_where_it_cannot_hold() -> None:
    assert payload_identity("") is None
    with pytest.raises(ConfigError, match=r"payload_user = 'nobody' needs a pilot started as root.*uid 1000"):
        payload_identity(PAYLOAD_USER, euid=1000)
    with pytest.raises(ConfigError, match="no such user"):
        payload_identity("p3s-no-such-user", euid=0)
    with pytest.raises(ConfigError, match="is root"):
        payload_identity("root", euid=0)
    entry = pwd.getpwnam(PAYLOAD_USER)
    assert payload_identity(str(entry.pw_uid), euid=0) == RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid,
                                                                 entry.pw_dir)


@pytest.mark.rabbitmq
def test_a_pilot_that_is_not_root_refuses_to_start(tmp_path: Path, broker_url: str, place: Path,
                                                   nobody: RunAs) -> None:
    """``p3s pilot`` as an unprivileged user with payload_user set: exit 2 and a clear error, no job taken."""
    settings = make_settings(place, broker_url)
    parts = Parts(tmp_path, settings)
    env = parts.env(P3S_PILOT_PAYLOAD_USER=PAYLOAD_USER, HOME=str(place))
    done = subprocess.run(["setpriv", f"--reuid={nobody.uid}", f"--regid={nobody.gid}", "--clear-groups",
                           sys.executable, "-m", "p3s", "pilot", "--id", "not-root"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert f"pilot.payload_user = '{PAYLOAD_USER}' needs a pilot started as root" in done.stderr, done.stderr


# -- a payload of another user -----------------------------------------------------------


def test_a_payload_runs_as_the_payload_user_and_cannot_read_the_pilots_secrets(
    place: Path, secret: Path, nobody: RunAs
) -> None:
    whoami = script(place, "whoami.py", WHOAMI)
    outdir = place / "out" / "3" / "n"
    out = run(a_task([sys.executable, str(whoami), "{outdir}", str(secret)], outdir), place, nobody)
    assert out.state == JobState.FINISHED, out
    record = json.loads((outdir / "whoami.json").read_text())
    assert record["uid"] == record["euid"] == nobody.uid and record["id_u"] == str(nobody.uid), record
    assert record["gid"] == nobody.gid and set(record["groups"]) <= {nobody.gid}, record
    assert record["secret"] == "denied", "the payload read the pilot's password file"
    assert record["home"] == nobody.home and record["user"] == nobody.name, record
    if _own_cgroup() is not None:
        # Moved into the job's cgroup by the pilot's prefix before the user changed.
        assert "/p3s-job11-" in record["cgroup"], record["cgroup"]
    assert "P3S_BROKER_PASSWORD_FILE" not in record["p3s_env"] and "P3S_BROKER_URL" not in record["p3s_env"]
    assert (outdir / "whoami.json").stat().st_uid == nobody.uid, "its output is its own"
    assert outdir.stat().st_uid == nobody.uid
    # The log stays the pilot's, written through the descriptor the pilot opened.
    assert Path(out.log).stat().st_uid == 0
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_text() == "the-pilot-password\n"
    assert list((place / "work").iterdir()) == [], "the work directory is removed"


def test_the_stage_in_copy_runs_as_the_payload_user(place: Path, secret: Path, nobody: RunAs) -> None:
    """The copy cannot read for the payload what the payload could not read: a root pilot is no way round."""
    whoami = script(place, "whoami.py", WHOAMI)
    readable = place / "raw.dat"
    readable.write_bytes(b"abc" * 100)
    readable.chmod(0o644)
    outdir = place / "out" / "3" / "n"
    argv = [sys.executable, str(whoami), "{outdir}", str(secret), "{input}"]
    out = run(a_task(argv, outdir, input=str(readable)), place, nobody)
    assert out.state == JobState.FINISHED, out
    record = json.loads((outdir / "whoami.json").read_text())
    assert record["input_bytes"] == 300 and record["input"].startswith(str(place / "work")), record
    out = run(a_task(argv, outdir, job_id=12, input=str(secret)), place, nobody)
    assert out.state == JobState.FAILED and "stage-in" in out.reason and "Permission denied" in out.reason, out


def test_a_work_root_the_payload_user_cannot_enter_is_a_broken_pilot(place: Path, nobody: RunAs) -> None:
    closed = place / "closed"
    closed.mkdir(mode=0o700)
    problem = root_problem(str(closed / "work"), place / "logs", nobody)
    assert problem == f"the work root {closed / 'work'} is unusable: payload user nobody may not enter {closed}"
    assert root_problem(str(place / "work"), place / "logs", nobody) == ""
    out = run(a_task(["true"], closed / "out"), place, nobody)
    assert out.state == JobState.FAILED and f"may not enter {closed}" in out.reason, out


@pytest.mark.parametrize(("hold", "wall_s", "state"), [(0, 30, JobState.FINISHED), (60, 1.5, JobState.TIMEOUT)])
def test_a_daemon_of_another_users_payload_does_not_outlive_its_job(
    place: Path, nobody: RunAs, hold: float, wall_s: float, state: JobState
) -> None:
    daemon = script(place, "daemon.py", DAEMON)
    outdir = place / "out" / "3" / "n"
    out = run(a_task([sys.executable, str(daemon), "{outdir}", str(hold)], outdir, wall_s=wall_s), place, nobody)
    pid, uid = map(int, (outdir / "daemon.pid").read_text().split())
    try:
        assert out.state == state, out
        assert uid == nobody.uid
        wait_for(lambda: not alive(pid), timeout=5, what=f"the daemon {pid} of the payload to be gone")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


PILOT = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    from p3s.messages import Task
    from p3s.pilot.identity import payload_identity
    from p3s.pilot.runner import run_payload
    place, pidfile = Path(sys.argv[1]), sys.argv[2]
    now = time.time()
    task = Task(job_id=21, workflow_id=3, template="t", node="n",
                argv=["/bin/sh", "-c", 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec sleep 1000', pidfile],
                values={}, env={}, queue="default", priority=5, wall_s=600, deadline=now + 600,
                seen_at=now, enqueued_at=now)
    run_payload(task, work_root=str(place / "work"), log_root=place / "logs", on_start=lambda _t: None,
                between_slices=lambda: None, kill_requested=lambda: False, run_as=payload_identity("nobody"))
    """)


def test_a_pilot_killed_outright_takes_its_other_users_payload_with_it(place: Path, nobody: RunAs) -> None:
    """The kernel clears a process's parent-death signal when its user changes: it must be set after."""
    runs = place / "runs"
    runs.mkdir(mode=0o777)
    runs.chmod(0o777)
    pidfile = runs / "payload.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pilot = subprocess.Popen([sys.executable, "-c", PILOT, str(place), str(pidfile)], env=env, cwd=ROOT)
    try:
        wait_for(pidfile.exists, timeout=20, what="the payload to start")
        pid = int(pidfile.read_text())
        assert alive(pid) and os.stat(f"/proc/{pid}").st_uid == nobody.uid
        pilot.kill()
        pilot.wait(10)
        wait_for(lambda: not alive(pid), timeout=5, what=f"the payload {pid} to die with its pilot")
    finally:
        if pilot.poll() is None:
            pilot.kill()
            pilot.wait(10)
        if pidfile.exists() and alive(pid := int(pidfile.read_text())):
            os.kill(pid, signal.SIGKILL)


# -- the whole pipeline, with a pilot of RabbitMQ and PostgreSQL --------------------------


@pytest.mark.rabbitmq
@pytest.mark.postgres
def test_a_job_of_another_user_finishes_and_writes_its_output(
    place: Path, secret: Path, nobody: RunAs, broker_url: str, database_url: str
) -> None:
    whoami = script(place, "whoami.py", WHOAMI)
    watch = place / "incoming"
    watch.mkdir()
    settings = make_settings(place, broker_url, database_url, P3S_PILOT_PAYLOAD_USER=PAYLOAD_USER)
    stack = Stack(settings, watch=watch).start()
    try:
        (pilot,) = stack.group.pilots
        assert pilot.run_as == nobody
        stack.import_template(graphml({"who": {"command": f"{sys.executable} {whoami} {{outdir}} {secret} {{input}}",
                                               "stage_in": True}}))
        (watch / "run1.dat").write_bytes(b"x" * 10)
        (job,) = wait_for(lambda: terminal_jobs(stack, 1), timeout=30, what="the job to end")
        assert job["state"] == "finished" and job["exit_code"] == 0, job
        outdir = settings.output_path / str(job["workflow_id"]) / job["node"]
        record = json.loads((outdir / "whoami.json").read_text())
        assert record["id_u"] == str(nobody.uid) and record["secret"] == "denied", record
        assert record["input_bytes"] == 10
        assert (outdir / "whoami.json").stat().st_uid == nobody.uid
    finally:
        stack.stop()
