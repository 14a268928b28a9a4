"""A pilot under faults: several queues, runaway payloads, slow stage-in, redelivery, full disk (RabbitMQ + PostgreSQL)."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p3s import app, broker, topology
from p3s.config import Settings
from p3s.messages import JobReport, PilotReport, Task, encode, parse_status
from p3s.pilot.service import Pilot
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
