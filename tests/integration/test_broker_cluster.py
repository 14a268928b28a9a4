"""Broker node loss: a three-node RabbitMQ cluster loses the node of the events queue, later that of the task queues.

The cluster is the test's own (tests/rabbitcluster.py: own node names, ports,
directories and cookie, killed by PID); the system's RabbitMQ is not touched.
Watcher, dispatcher and two pilots run as separate processes with every
node's URL (each part in an order of its own), ``queue_type = "quorum"``
(events, status, expired and invalid replicated on the three nodes) and
transient classic task queues.  One raw file in ten is processed (a trivial
payload); every file goes through the watcher, the events queue and the
dispatcher.

While 1 000 files arrive, the node leading the events queue is killed with
SIGKILL, then started again (a quorum queue needs a majority: a second node
lost while the first is still down would stop it, as RabbitMQ documents), and
then the node holding the task queues is killed.  At that moment tasks wait
there: a second template sends the jobs of a few ``held`` files to the queue
``held``, which no pilot serves (as when its pilots are away), and the test
has made that queue on the node of ``p3s.tasks.default`` before the first of
them was published (a classic queue lives where it was first declared).  The
broker confirmed every one of them, and they are in the queue when its node
dies.  Every file must end with exactly one decision, every job in a terminal
state, each one that did not finish with a reason; the held ones ``expired``
through the dispatcher's reaper at their deadline, counted in
``p3s_jobs_total``, as every job is; ``p3s audit`` must balance; and after
each kill the next job must start within the AMQP heartbeat timeout plus a
margin, measured on the records.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from p3s import broker, topology
from p3s.db import Job
from p3s.states import JobState
from tests.conftest import unavailable
from tests.integration.test_metrics_once import scrape
from tests.procs import Parts, import_template
from tests.rabbitcluster import SBIN, Cluster, ClusterError, Node, free_port
from tests.stack import graphml, make_settings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

FILES = 1000
PILOTS = 2
HEARTBEAT_S = 2.0
# RabbitMQ and kombu call a connection dead after two missed heartbeats.
HEARTBEAT_TIMEOUT_S = 2 * HEARTBEAT_S
# Reconnecting to another node, a quorum queue electing its new leader, a
# consumer declaring its queue again: a few seconds on a loaded 2-core host.
MARGIN_S = 6.0
# Admission lets a first task in only if it can finish within half the budget
# after its file was seen: after a kill the backlog is seconds late, and a
# tighter budget would drop everything behind it as stale (as it should).
BUDGET_S = 40
# One raw file in ten makes a workflow, as DQM samples: the others are
# decided sampled_out.  Every file still goes watcher -> events -> dispatcher.
SAMPLED = 0.1
# The held files: every one makes a job whose task waits in p3s.tasks.held, which
# no pilot serves, until that queue's node is killed.  A budget short enough to
# end them while the raw files still arrive, long enough that RabbitMQ's own TTL
# cannot expire them before the kill (the kill follows their publication by
# seconds); the reaper's reason is not the TTL's.
HELD_FILES = 8
HELD = "held"  # the template's name, and that of the queue its tasks go to
HELD_BUDGET_S = 15
HELD_REASON = "deadline passed before it started"
# Every part's settings, and those of the test's own connection to one node.
PARTS_ENV = {
    "P3S_BROKER_HEARTBEAT_S": str(HEARTBEAT_S),
    "P3S_BROKER_QUEUE_TYPE": "quorum",
    "P3S_BROKER_TASK_QUEUE_DURABLE": "false",
    "P3S_BROKER_FAILOVER_STRATEGY": "shuffle",
    "P3S_DISPATCHER_HEARTBEAT_TIMEOUT_S": "10",
    # By name, not by stream: the held files come through the same watched directory.
    "P3S_SAMPLING": f'{{"np04_raw_*": {SAMPLED}}}',
}
TERMINAL = {"finished", "failed", "timeout", "expired", "lost", "dropped"}
DECISIONS = {"accepted", "sampled_out", "duplicate", "shed", "refused"}


def _tools_present() -> None:
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if not (SBIN / tool).exists() and shutil.which(tool) is None:
            unavailable("RabbitMQ cluster", f"{tool} is not installed")


class Writer(threading.Thread):
    """Writes the files into the watched directory at a steady pace.

    It holds after ``hold_at`` files until ``go_on`` is set, so that files
    still arrive after the second kill however long the restarted node took.
    """

    def __init__(self, watch: Path, count: int, per_s: float, hold_at: int) -> None:
        super().__init__(name="writer", daemon=True)
        self.watch, self.count, self.pause, self.hold_at = watch, count, 1.0 / per_s, hold_at
        self.written = 0
        self.go_on = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        for i in range(self.count):
            if i == self.hold_at:
                self.go_on.wait(120)
                next_at = time.monotonic()
            (self.watch / f"np04_raw_run002000_{i:05d}.dat").write_bytes(b"x")
            self.written = i + 1
            next_at += self.pause
            time.sleep(max(0.0, next_at - time.monotonic()))


class ClusterOnFailure:
    """Adds the cluster's logs and queues to a failure, while its nodes still run."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, AssertionError):
            exc.args = (f"{exc.args[0] if exc.args else ''}\n{self.cluster.describe()}",)


def _declare_held_queue(tmp_path: Path, node: Node) -> None:
    """Make p3s.tasks.held on ``node`` alone, declared as the parts declare it."""
    settings = make_settings(tmp_path, node.url, **PARTS_ENV)
    with broker.connect(settings.broker) as conn:
        topology.declare(conn, [topology.task_queue(HELD)])


def _held_in_broker(session: Session) -> int:
    """Held jobs queued whose task the broker confirmed."""
    return int(session.scalar(
        select(func.count()).select_from(Job)
        .where(Job.template == HELD, Job.state == JobState.QUEUED, Job.published_at.is_not(None))
    ) or 0)


def _first_start_after(jobs: list[dict], moment: float) -> float | None:
    starts = [j["started_at"] for j in jobs if j["started_at"] and j["started_at"] > moment]
    return min(starts) if starts else None


def test_flow_survives_losing_the_events_leader_and_the_task_queue_node(
    tmp_path: Path, database_url: str
) -> None:
    _tools_present()
    cluster = Cluster(tmp_path / "cluster")
    settings = make_settings(tmp_path, ";".join(cluster.urls), database_url)
    started: list[BaseException] = []

    def start_cluster() -> None:
        try:
            cluster.start(timeout=90)
        except (ClusterError, OSError, subprocess.SubprocessError) as exc:
            started.append(exc)

    # The nodes boot while the database gets its schema and the template.
    booting = threading.Thread(target=start_cluster)
    booting.start()
    try:
        import_template(settings, graphml({"run": {"command": "/bin/true"}}, trigger="np04_raw_*", budget_s=BUDGET_S))
        import_template(settings, graphml({"wait": {"command": "/bin/true", "queue": HELD}},
                                          trigger="np04_held_*", budget_s=HELD_BUDGET_S, name=HELD),
                        name=HELD)
        booting.join()
        if started:
            unavailable("RabbitMQ cluster", f"could not start three nodes: {started[0]}\n{cluster.describe()}")
        watch = tmp_path / "incoming"
        watch.mkdir()
        with ClusterOnFailure(cluster), Parts(tmp_path, settings, **PARTS_ENV) as parts:
            _run_flow(parts, cluster, watch)
    finally:
        booting.join()
        cluster.stop()


def _run_flow(parts: Parts, cluster: Cluster, watch: Path) -> None:
    metrics_port = free_port()
    dispatcher = parts.start("dispatcher", "dispatcher", P3S_METRICS_PORT=str(metrics_port))
    parts.wait_for(lambda: dispatcher.log_has("dispatcher: consuming on"), alive=[dispatcher], timeout=90,
                   what="the dispatcher to consume")
    pilots = [parts.start("pilot", "pilot", "--queues", "default", "--id", f"cluster-pilot-{i}") for i in range(PILOTS)]
    watcher = parts.start("watcher", "watcher", "--watch", str(watch))
    every = [dispatcher, watcher, *pilots]
    parts.wait_for(lambda: all(p.log_has("waiting for tasks") for p in pilots) and watcher.log_has("watcher: following"),
                   alive=every, timeout=90, what="the pilots and the watcher to start")

    writer = Writer(watch, FILES, per_s=20, hold_at=FILES * 7 // 10)
    writer.start()
    decided = lambda n: lambda: len(parts.db_files()) >= n  # noqa: E731

    # 1. The leader of the events queue.
    parts.wait_for(decided(FILES // 5), alive=every, timeout=60, what=f"{FILES // 5} files recorded")
    events_node = cluster.node_named(cluster.queue_leader("p3s.dispatcher.events"))
    first_kill = time.time()
    events_node.kill()
    parts.wait_for(lambda: _first_start_after(parts.db_jobs(), first_kill), alive=every, timeout=60,
                   what="a job to start after the events leader was killed")
    # A quorum queue serves while a majority of its members runs: bring the
    # node back (on its own data, it rejoins) before taking another away.
    events_node.restart()
    events_node.wait_booted(60)

    # 2. The node that holds the (transient, classic) task queues, tasks waiting in one.
    # As soon as the node is back, while files still arrive.
    parts.wait_for(decided(FILES * 2 // 5), alive=every, timeout=60, what=f"{FILES * 2 // 5} files recorded")
    task_node = cluster.node_named(cluster.queue_leader("p3s.tasks.default"))
    _declare_held_queue(parts.tmp_path, task_node)
    for i in range(HELD_FILES):
        (watch / f"np04_held_run002000_{i:05d}.dat").write_bytes(b"x")
    parts.wait_for(lambda: parts.query(_held_in_broker) == HELD_FILES, alive=every, timeout=30,
                   what=f"the broker to confirm the {HELD_FILES} held tasks")
    queues = cluster.queues()
    assert queues.get(f"p3s.tasks.{HELD}") == (task_node.name, HELD_FILES), queues
    assert queues["p3s.tasks.default"][0] == task_node.name, queues
    second_kill = time.time()
    task_node.kill()
    writer.go_on.set()

    writer.join(60)
    assert writer.written == FILES
    parts.wait_for(lambda: len(parts.db_files()) >= FILES + HELD_FILES, alive=every, timeout=60,
                   what="every file recorded")
    # The tasks lost with their queue end at their deadline, through the reaper.
    parts.wait_for(lambda: all(j["state"] in TERMINAL for j in parts.db_jobs()), alive=every,
                   timeout=BUDGET_S + 30, what="every job in a terminal state")

    files = parts.db_files()
    names = Counter(f["name"] for f in files)
    assert len(names) == FILES + HELD_FILES and set(names.values()) == {1}, [n for n, c in names.items() if c != 1][:10]
    decisions = Counter(f["decision"] for f in files)
    assert set(decisions) <= DECISIONS and decisions["accepted"] and decisions["sampled_out"], decisions
    assert all(f["decision"] for f in files)

    jobs = parts.db_jobs()
    states = Counter(j["state"] for j in jobs)
    assert set(states) <= TERMINAL, states
    unfinished = [j for j in jobs if j["state"] != "finished"]
    assert all(j["reason"] for j in unfinished), [j for j in unfinished if not j["reason"]][:5]
    accepted = sum(f["decision"] == "accepted" for f in files)
    assert len(jobs) == accepted, (len(jobs), accepted)

    # The tasks that waited on the killed node: gone with their queue, ended by the
    # reaper at their deadline, never started.
    held = [j for j in jobs if j["template"] == HELD]
    assert len(held) == HELD_FILES, held
    assert all(j["state"] == "expired" and j["reason"] == HELD_REASON and not j["started_at"] for j in held), held

    # Each ending counted: the dispatcher's counters (it ran throughout) and the audit agree with the records.
    counted = scrape(metrics_port).get("p3s_jobs_total", {})
    assert counted == Counter((j["node"], j["state"], j["template"]) for j in jobs), counted
    audit = parts.json("audit", "--grace", "1")
    assert audit["ok"] and audit["jobs"] == dict(states), audit

    gaps = {}
    for name, kill in (("events leader", first_kill), ("task queue node", second_kill)):
        resumed = _first_start_after(jobs, kill)
        assert resumed is not None, f"no job started after the {name} was killed\n{parts.describe()}"
        gaps[name] = resumed - kill
    print(f"\ncluster of RabbitMQ {cluster.version}: files {decisions}, jobs {states}, "
          f"first start after each kill {', '.join(f'{k} {v:.1f}s' for k, v in gaps.items())}, "
          f"{HELD_FILES} held tasks expired {min(j['ended_at'] for j in held) - second_kill:.1f}s after the kill, "
          f"killed {events_node.name} then {task_node.name}")
    for name, gap in gaps.items():
        assert gap < HEARTBEAT_TIMEOUT_S + MARGIN_S, f"after the {name} was killed, the next start took {gap:.1f}s"
    parts.assert_alive(*every)
    if os.environ.get("P3S_TEST_CLUSTER_LOGS"):
        print(parts.describe())
