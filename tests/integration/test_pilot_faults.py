"""A pilot under faults: several queues, runaway payloads, slow stage-in, redelivery, full disk.

On RabbitMQ + PostgreSQL.
"""

from __future__ import annotations

import errno
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p3s import app, broker, topology
from p3s.config import Settings, SourceSettings
from p3s.messages import JobReport, PilotReport, Task, encode, parse_status
from p3s.pilot.service import Pilot
from p3s.watcher.service import Watcher
from tests.stack import PROBE, Stack, graphml, make_settings, probe_command, terminal_jobs, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
def make(tmp_path: Path, broker_url: str, database_url: str) -> Iterator:
    stacks: list[Stack] = []

    def factory(pilots: int = 1, **env: str) -> tuple[Stack, Path]:
        watch = tmp_path / "incoming"
        watch.mkdir(exist_ok=True)
        stack = Stack(make_settings(tmp_path, broker_url, database_url, **env), watch=watch, pilots=pilots).start()
        stacks.append(stack)
        return stack, watch

    yield factory
    for stack in stacks:
        stack.stop()


# -- case 6: one pilot on several queues ----------------------------------------


def test_one_pilot_on_three_queues_keeps_its_channel_and_starts_promptly(make) -> None:
    stack, watch = make(pilots=1, P3S_PILOT_QUEUES="default,dqm,display")
    (pilot,) = stack.group.pilots
    stack.import_template(graphml({
        "reco": {"command": probe_command(), "queue": "default"},
        "dqm": {"command": probe_command(), "queue": "dqm"},
        "display": {"command": probe_command(), "queue": "display"},
    }, name="fan"), "fan")
    wait_for(lambda: pilot.connections, what="the pilot to consume")
    files = 8
    for i in range(files):
        (watch / f"run{i:02d}.dat").write_bytes(b"x")
    jobs = wait_for(lambda: terminal_jobs(stack, 3 * files), timeout=60, what="every job to end")
    assert [j["state"] for j in jobs] == ["finished"] * (3 * files), jobs
    assert {j["queue"] for j in jobs} == {"default", "dqm", "display"}
    assert pilot.connections == 1, "the pilot's channel failed and was opened again"
    # How long each task waited for this pilot once both were ready: from its
    # queueing, or from the end of the pilot's previous job if that came later.
    # The defect made each wait about a second; a prompt start is far below that.
    waits, free_at = [], 0.0
    for job in sorted(jobs, key=lambda j: j["started_at"]):
        waits.append(job["started_at"] - max(job["queued_at"], free_at))
        free_at = job["ended_at"]
    assert statistics.median(waits) < 0.5, [round(w, 3) for w in waits]


# -- pilots alone on a real broker, no dispatcher: reports read from p3s.status ----


@pytest.fixture
def alone(tmp_path: Path, broker_url: str) -> Iterator[Callable[..., Pilot]]:
    """Pilots in threads on their own vhost, with the topology declared; stopped afterwards."""
    running: list[tuple[Pilot, threading.Thread]] = []

    def factory(settings: Settings | None = None, pilot_id: str = "alone", **env: str) -> Pilot:
        settings = settings or make_settings(tmp_path, broker_url, **env)
        with broker.connect(settings.broker) as conn:
            topology.declare_all(conn, settings.pilot.queues)
        pilot = app.make_pilot(settings, pilot_id=pilot_id)
        t = threading.Thread(target=lambda: (pilot.run(), pilot.close()), daemon=True)
        t.start()
        running.append((pilot, t))
        return pilot

    yield factory
    for pilot, _t in running:
        pilot.should_stop = True
    for pilot, t in running:
        t.join(15)
        assert not t.is_alive(), f"pilot {pilot.id} did not stop"


def a_task(job_id: int, outdir: Path, *args: str, wall_s: float = 60, queue: str = "default") -> Task:
    now = time.time()
    return Task(job_id=job_id, workflow_id=job_id, template="raw", node="probe",
                argv=[sys.executable, str(PROBE), "--out", str(outdir), *args], values={"outdir": str(outdir)},
                env={}, queue=queue, priority=5, wall_s=wall_s, deadline=now + 120, seen_at=now, enqueued_at=now)


def publish(settings: Settings, *tasks: Task) -> None:
    publisher = broker.Publisher(settings.broker, exchanges=[topology.tasks_exchange])
    try:
        publisher.publish([broker.Outgoing(topology.tasks_exchange, t.queue, encode(t), priority=t.priority)
                           for t in tasks])
    finally:
        publisher.close()


class StatusReader:
    """Every report on p3s.status so far, read with a raw consumer of the dispatcher's status queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reports: list[JobReport | PilotReport] = []

    def read(self) -> list[JobReport | PilotReport]:
        with broker.connect(self.settings.broker) as conn:
            queue = topology.status_queue(conn.default_channel)
            while (message := queue.get(no_ack=True)) is not None:
                self.reports.append(parse_status(message.body))
        return self.reports

    def jobs(self, job_id: int) -> list[JobReport]:
        return [r for r in self.read() if isinstance(r, JobReport) and r.job_id == job_id]

    def pilots(self, pilot_id: str) -> list[PilotReport]:
        return [r for r in self.read() if isinstance(r, PilotReport) and r.pilot_id == pilot_id]

    def wait_job(self, job_id: int, what: str, timeout: float = 20) -> JobReport:
        def terminal() -> Any:
            return next((r for r in self.jobs(job_id) if r.state != "running"), None)

        return wait_for(terminal, timeout=timeout, what=what)


# -- case 9: a task delivered twice is not run twice ------------------------------


def test_a_redelivered_task_is_reported_not_run(tmp_path: Path, broker_url: str, alone) -> None:
    settings = make_settings(tmp_path, broker_url)
    with broker.connect(settings.broker) as conn:
        topology.declare_all(conn, settings.pilot.queues)
    outdir = tmp_path / "out"
    publish(settings, a_task(41, outdir))
    # Taken and never acked, then its connection drops: RabbitMQ delivers it again, flagged.
    with broker.connect(settings.broker) as conn:
        taken = topology.task_queue("default")(conn.default_channel).get(no_ack=False)
        assert taken is not None and not taken.delivery_info["redelivered"]
    status = StatusReader(settings)
    alone(settings, pilot_id="careful")
    report = status.wait_job(41, "the pilot's report on the redelivered task")
    assert report.state == "lost" and report.redelivered, report
    assert "may have run already" in report.reason and report.pilot_id == "careful"
    assert report.ended_at is not None
    assert not (outdir / "probe.json").exists(), "the payload of a redelivered task ran"
    # The pilot goes on: a fresh task runs.
    publish(settings, a_task(42, outdir))
    assert status.wait_job(42, "the fresh task").state == "finished"
    assert (outdir / "probe.json").exists()


def test_a_lifetime_hand_back_is_rejected_to_the_dead_letters(tmp_path: Path, broker_url: str, alone) -> None:
    settings = make_settings(tmp_path, broker_url, P3S_PILOT_LIFETIME_S="30")
    with broker.connect(settings.broker) as conn:
        topology.declare_all(conn, settings.pilot.queues)
    publish(settings, a_task(43, tmp_path / "out", wall_s=600))
    pilot = alone(settings, pilot_id="short-lived")
    wait_for(lambda: pilot.should_stop, what="the pilot to hand the task back and retire")

    def dead_letter() -> Any:
        with broker.connect(settings.broker) as conn:
            return topology.expired_queue(conn.default_channel).get(no_ack=True)

    message = wait_for(dead_letter, what="the task in p3s.expired")
    (death, *_) = message.headers["x-death"]
    assert death["reason"] == "rejected" and not message.delivery_info["redelivered"]
    assert Task.parse(message.body).job_id == 43
    with broker.connect(settings.broker) as conn:
        assert broker.queue_depth(conn, topology.task_queue("default")) == 0


# -- case 7: nothing a payload started outlives its job ---------------------------

DAEMONIZE = """\
import os, sys, time
out, hold = sys.argv[1], float(sys.argv[2])
os.makedirs(out, exist_ok=True)
pidfile = os.path.join(out, "daemon.pid")
if os.fork() == 0:          # the classic double fork: out of the payload's session and process group
    os.setsid()
    if os.fork() == 0:
        with open(pidfile + ".tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.rename(pidfile + ".tmp", pidfile)
        time.sleep(1000)
    os._exit(0)
while not os.path.exists(pidfile):
    time.sleep(0.01)
time.sleep(hold)
"""


def _alive(pid: int) -> bool:
    from tests.scenarios import _alive as alive

    return alive(pid)


@pytest.mark.parametrize(("hold", "wall_s", "state"), [(0, 60, "finished"), (60, 1.5, "timeout")])
def test_a_daemon_started_by_the_payload_does_not_outlive_its_job(
    tmp_path: Path, make, hold: float, wall_s: float, state: str
) -> None:
    script = tmp_path / "daemonize.py"
    script.write_text(DAEMONIZE)
    stack, watch = make(pilots=1)
    stack.import_template(graphml({"daemon": {"command": f"{sys.executable} {script} {{outdir}} {hold}",
                                              "wall_s": str(wall_s)}}, name="daemon"), "daemon")
    (watch / "d.dat").write_bytes(b"x")
    (job,) = wait_for(lambda: terminal_jobs(stack, 1), timeout=20, what="the job to end")
    pidfile = outdir_for(stack, job) / "daemon.pid"
    pid = int(pidfile.read_text())
    try:
        assert job["state"] == state, job
        wait_for(lambda: not _alive(pid), timeout=5, what=f"the payload's daemon {pid} to be gone")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- case 8: a slow stage-in keeps the pilot's heartbeats going, and has a deadline ---


def test_a_slow_stage_in_heartbeats_and_times_out(tmp_path: Path, broker_url: str, database_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    xrdcp = bin_dir / "xrdcp"
    xrdcp.write_text("#!/bin/sh\nexec sleep 60\n")  # a copy that never ends
    xrdcp.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = make_settings(tmp_path, broker_url, database_url, P3S_PILOT_HEARTBEAT_S="0.5",
                             P3S_DISPATCHER_HEARTBEAT_TIMEOUT_S="2", P3S_DISPATCHER_REAP_INTERVAL_S="0.3")
    stack = Stack(settings, pilots=1)
    stack.group.watcher = Watcher(settings, [SourceSettings(name="xroot", location=str(watch),
                                                            url_prefix="root://127.0.0.1:1//data")])
    stack.start()
    try:
        stack.import_template(graphml({"reco": {"command": probe_command("{input}"), "stage_in": True,
                                                "wall_s": "4"}}, name="staged"), "staged")
        (pilot,) = stack.group.pilots
        (watch / "slow.dat").write_bytes(b"x")
        seen: set[str] = set()

        def ended() -> Any:
            seen.update(p["state"] for p in stack.pilots())
            return terminal_jobs(stack, 1)

        (job,) = wait_for(ended, timeout=20, what="the stage-in to time out")
        assert "lost" not in seen, "the pilot was declared lost while it staged in"
        assert job["state"] == "failed" and "stage-in" in job["reason"] and "timed out" in job["reason"], job
        assert job["pilot_id"] == pilot.id
        wait_for(lambda: stack.pilots_by_id()[pilot.id]["state"] == "idle", what="the pilot idle again")
        assert not (outdir_for(stack, job) / "probe.json").exists(), "the payload ran without its input"
    finally:
        stack.stop()


def outdir_for(stack: Stack, job: dict) -> Path:
    from tests.scenarios import outdir_of

    return outdir_of(stack, job)


# -- case 12: a full work disk swallows nothing ----------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tiny tmpfs of its own (root only), unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=64", "tmpfs", str(where)],
                       check=True, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        message = f"cannot mount a small tmpfs for the full-disk test (needs root): {detail}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: this test never skips)", pytrace=False)
        pytest.skip(message)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True, timeout=10)


def fill(where: Path) -> None:
    """Use up every block and every inode of the filesystem at ``where``."""
    try:
        with open(where / "blocks", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    n = 0
    try:
        while True:
            (where / f"inode{n}").touch()
            n += 1
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc


def empty(where: Path) -> None:
    for entry in where.iterdir():
        if entry.is_file():
            entry.unlink()


def test_a_full_work_disk_swallows_no_task(tmp_path: Path, make, small_disk: Path) -> None:
    stack, watch = make(pilots=1)
    (healthy,) = stack.group.pilots
    full = make_settings(tmp_path, stack.settings.broker.url, stack.settings.database.url,
                         P3S_PILOT_WORK_ROOT=str(small_disk / "work"))
    sick = app.make_pilot(full, pilot_id="full-disk")
    stack.group.pilots.append(sick)
    t = threading.Thread(target=lambda: (sick.run(), sick.close()), daemon=True)
    stack.group.threads.append(t)
    t.start()
    stack.import_template(graphml({"probe": {"command": probe_command("--sleep", "0.2")}}))
    wait_for(lambda: sick.connections and healthy.connections, what="both pilots to consume")
    fill(small_disk)
    files = 12
    for i in range(files):
        (watch / f"f{i:02d}.dat").write_bytes(b"x")
    jobs = wait_for(lambda: terminal_jobs(stack, files), timeout=40, what="every job to end")
    failed = [j for j in jobs if j["state"] != "finished"]
    assert failed, "the pilot on the full disk took no task, so the test showed nothing"
    for j in failed:
        assert j["state"] == "failed" and j["pilot_id"] == "full-disk", j
        assert "no space left on device" in j["reason"] and str(small_disk) in j["reason"], j
    assert all(j["pilot_id"] == healthy.id for j in jobs if j["state"] == "finished")
    broken = wait_for(lambda: (p := stack.pilots_by_id().get("full-disk")) and p["state"] == "broken" and p,
                      what="the full-disk pilot's heartbeat to say broken")
    assert "no space left on device" in broken["problem"] and str(small_disk) in broken["problem"], broken
    assert sick.connections == 1 and healthy.connections == 1, "no task error reached the connection"
    # Room again: the pilot takes tasks once more.
    empty(small_disk)
    wait_for(lambda: stack.pilots_by_id()["full-disk"]["state"] == "idle", what="the pilot to recover")
    assert stack.pilots_by_id()["full-disk"]["problem"] == ""
    stack.group.pilots.remove(healthy)
    healthy.should_stop = True
    wait_for(lambda: stack.pilots_by_id()[healthy.id]["state"] == "stopped", what="the healthy pilot to stop")
    (watch / "after.dat").write_bytes(b"x")
    jobs = wait_for(lambda: terminal_jobs(stack, files + 1), timeout=20, what="the job after recovery")
    assert jobs[-1]["state"] == "finished" and jobs[-1]["pilot_id"] == "full-disk", jobs[-1]
