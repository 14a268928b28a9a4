"""Heartbeats wait for each other (``dispatcher.heartbeat_linger_s``); data events and job reports never wait.

The dispatcher runs on the embedded default (kombu's in-process broker and
SQLite), driven one turn of its consume loop at a time, so what each turn
recorded can be read in between.  Transactions are counted by the commits the
engine sees.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from p3s import app, db, topology
from p3s.broker import Outgoing, Publisher
from p3s.dispatcher import admin
from p3s.dispatcher.service import Dispatcher
from p3s.errors import ConfigError
from p3s.dagengine import parse_graphml
from p3s.messages import DataEvent, JobReport, PilotReport, Task, encode
from p3s.states import JobState, PilotState
from p3s.watcher.service import event_message
from tests.stack import graphml, make_settings

PILOTS = 10
#: Longer than any test here runs, shorter than the heartbeat timeout: only the reaper's turn or a
#: job report can end it, and the reaper's turn comes once, before anything is sent.
LONG_LINGER_S = "30"
#: A turn of the loop waits for the broker at most a quarter of this (p3s.broker.turn_s).
BROKER_HEARTBEAT_S = "0.4"
#: Turns a test may take for what it waits for.
TURNS = 100


class Driven:
    """A dispatcher stepped by hand, with a publisher posing as pilots and watchers."""

    def __init__(self, tmp_path: Path, linger: str) -> None:
        self.settings = make_settings(tmp_path, P3S_DISPATCHER_HEARTBEAT_LINGER_S=linger,
                                      P3S_DISPATCHER_REAP_INTERVAL_S="3600", P3S_BROKER_HEARTBEAT_S=BROKER_HEARTBEAT_S)
        self.dispatcher: Dispatcher = app.make_dispatcher(self.settings)
        self.engine = self.dispatcher.engine
        self.commits = 0
        event.listen(self.engine, "commit", self._count)
        self.turns = self.dispatcher.consume()
        next(self.turns)  # consuming; the reaper's first (and only) turn is behind it
        self.commits = 0
        self.publisher = Publisher(self.settings.broker, exchanges=[topology.status_exchange,
                                                                    topology.events_exchange])

    def _count(self, _conn: Any) -> None:
        self.commits += 1

    def send(self, *messages: Outgoing) -> None:
        self.publisher.publish(list(messages))

    def turn(self, count: int = 1) -> None:
        for _ in range(count):
            next(self.turns)

    def until(self, predicate: Any, what: str) -> int:
        """Turn until ``predicate()``; the number of turns it took."""
        for n in range(1, TURNS + 1):
            self.turn()
            if predicate():
                return n
        raise AssertionError(f"not {what} after {TURNS} turns")

    def pilots(self) -> dict[str, db.Pilot]:
        with Session(self.engine) as s:
            return {p.id: p for p in s.scalars(select(db.Pilot))}

    def stop(self) -> None:
        """Stop the dispatcher as a SIGTERM does: the loop's last flush, then out of the consumer context."""
        self.dispatcher.should_stop = True
        for _ in self.turns:
            pass

    def close(self) -> None:
        self.stop()
        self.publisher.close()
        self.dispatcher.close()
        event.remove(self.engine, "commit", self._count)
        self.engine.dispose()


@pytest.fixture
def driven(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Driven]:
    d = Driven(tmp_path, request.param)
    try:
        yield d
    finally:
        d.close()


def heartbeat(pilot_id: str, sent_at: float, event_name: str = "heartbeat") -> Outgoing:
    report = PilotReport(pilot_id=pilot_id, event=event_name, host="wn01", pid=1, queues=["default"],
                         state=PilotState.IDLE, sent_at=sent_at)
    return Outgoing(topology.status_exchange, topology.status_routing_key("pilot", event_name), encode(report))


def job_report(report: JobReport) -> Outgoing:
    return Outgoing(topology.status_exchange, topology.status_routing_key("job", report.state), encode(report))


def data_event(name: str) -> Outgoing:
    return event_message(DataEvent(name=name, path=f"/data/{name}", stream="raw", seen_at=time.time()))


def take_task(settings: Any) -> Task:
    """The next task on ``p3s.tasks.default``, taken as a pilot takes it."""
    with Connection(settings.broker.effective_url) as conn:
        message = conn.SimpleQueue(topology.task_queue("default")).get(timeout=5)
        message.ack()
        return Task.parse(message.body)


def ids() -> list[str]:
    return [f"pilot-{i:02d}" for i in range(PILOTS)]


@pytest.mark.parametrize("driven", [LONG_LINGER_S], indirect=True)
def test_heartbeats_arriving_one_by_one_share_one_transaction(driven: Driven) -> None:
    for n, pilot_id in enumerate(ids()):
        driven.send(heartbeat(pilot_id, 1000.0 + n, "register"))
        driven.turn(2)  # taken, then a read that finds the queue quiet: without a linger, recorded here
    assert driven.commits == 0 and driven.pilots() == {}, "the registrations did not wait for each other"
    for n, pilot_id in enumerate(ids()):
        driven.send(heartbeat(pilot_id, 2000.0 + n))
        driven.turn(2)
    assert driven.commits == 0 and driven.pilots() == {}

    # The dispatcher stopping records what waits, as the reaper's turn would.
    driven.stop()
    assert driven.commits == 1
    pilots = driven.pilots()
    assert sorted(pilots) == ids()
    assert [pilots[p].last_sent_at for p in ids()] == [2000.0 + n for n in range(PILOTS)]
    assert all(p.state == PilotState.IDLE for p in pilots.values())


@pytest.mark.parametrize("driven", ["0"], indirect=True)
def test_without_a_linger_each_quiet_moment_records_its_batch(driven: Driven) -> None:
    for n, pilot_id in enumerate(ids()[:5]):
        driven.send(heartbeat(pilot_id, 1000.0 + n, "register"))
        driven.until(lambda pilot_id=pilot_id: pilot_id in driven.pilots(), f"{pilot_id} recorded")
    assert driven.commits == 5


@pytest.mark.parametrize("driven", ["0.2"], indirect=True)
def test_lingering_heartbeats_are_recorded_once_the_linger_is_over(driven: Driven) -> None:
    before = time.time()
    for n, pilot_id in enumerate(ids()):
        driven.send(heartbeat(pilot_id, 1000.0 + n, "register"))
    driven.until(lambda: len(driven.pilots()) == PILOTS, "every pilot recorded")
    assert driven.commits == 1
    # last_seen is the dispatcher's own clock when it recorded the batch: no earlier than the reports arrived.
    assert all(before <= p.last_seen <= time.time() for p in driven.pilots().values())


@pytest.mark.parametrize("driven", [LONG_LINGER_S], indirect=True)
def test_a_data_event_is_recorded_at_once_while_heartbeats_linger(driven: Driven) -> None:
    with Session(driven.engine) as s, s.begin():
        admin.import_template(s, parse_graphml(graphml({"dqm": {"command": "/bin/true"}}), name="probe"))
    driven.commits = 0
    for n, pilot_id in enumerate(ids()):
        driven.send(heartbeat(pilot_id, 1000.0 + n, "register"))
    driven.turn(PILOTS + 1)
    assert driven.pilots() == {}

    driven.send(data_event("np04_raw_run000001_0000.dat"))
    # One turn takes it, the next finds the queues quiet and records it (and publishes its task):
    # the heartbeats' linger is no wait for it.
    driven.turn(2)
    task = take_task(driven.settings)
    assert task.values["input_name"] == "np04_raw_run000001_0000.dat"
    assert driven.pilots() == {}, "the heartbeats went on waiting for more of their kind"


@pytest.mark.parametrize("driven", [LONG_LINGER_S], indirect=True)
def test_a_job_report_is_recorded_at_once_with_the_heartbeats_waiting_beside_it(driven: Driven) -> None:
    with Session(driven.engine) as s, s.begin():
        admin.import_template(s, parse_graphml(graphml({"dqm": {"command": "/bin/true"}}), name="probe"))
    driven.send(data_event("np04_raw_run000002_0000.dat"))
    driven.turn(2)
    task = take_task(driven.settings)
    for n, pilot_id in enumerate(ids()):
        driven.send(heartbeat(pilot_id, 1000.0 + n, "register"))
    driven.turn(PILOTS + 1)
    assert driven.pilots() == {}
    driven.commits = 0

    driven.send(job_report(JobReport(task.job_id, JobState.RUNNING, "pilot-00", token=task.token,
                                     started_at=1001.0)))
    driven.turn(2)
    with Session(driven.engine) as s:
        job = s.get(db.Job, task.job_id)
        assert job is not None and (job.state, job.pilot_id) == (JobState.RUNNING, "pilot-00")
    assert sorted(driven.pilots()) == ids()
    # One transaction for the report and the heartbeats beside it (a running report makes no task).
    assert driven.commits == 1


@pytest.mark.parametrize("driven", [LONG_LINGER_S], indirect=True)
def test_the_reaper_records_the_heartbeats_that_wait_before_it_looks_for_silent_pilots(driven: Driven) -> None:
    now = time.time()
    with Session(driven.engine) as s, s.begin():
        s.add(db.Pilot(id="quiet", host="wn01", pid=1, queues="default", state=PilotState.IDLE, started_at=now - 100,
                       last_seen=now - 100, last_sent_at=now - 100, jobs_done=0, problem="", user=""))
    driven.send(heartbeat("quiet", now))
    driven.turn(2)
    assert driven.pilots()["quiet"].last_sent_at == now - 100, "the heartbeat did not wait"

    driven.dispatcher._next_reap = 0.0  # the reaper's turn is due
    driven.turn()
    quiet = driven.pilots()["quiet"]
    assert (quiet.state, quiet.last_sent_at) == (PilotState.IDLE, now)
    assert quiet.last_seen >= now


@pytest.mark.parametrize("linger", ["-1", "nan", "60"])
def test_a_linger_below_zero_or_up_to_the_heartbeat_timeout_is_refused(tmp_path: Path, linger: str) -> None:
    with pytest.raises(ConfigError, match="dispatcher.heartbeat_linger_s"):
        make_settings(tmp_path, P3S_DISPATCHER_HEARTBEAT_LINGER_S=linger, P3S_DISPATCHER_HEARTBEAT_TIMEOUT_S="60")
