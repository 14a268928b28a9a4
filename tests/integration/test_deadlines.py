"""Late work is dropped and counted: the three expiry paths, lost pilots, overload (RabbitMQ + PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p3s import app, broker, metrics, topology
from tests.stack import Stack, env_for, graphml, make_settings, probe_command, terminal_jobs, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


def two_stage(name: str, budget_s: float, priority: int = 5, sleep: float = 0.0) -> str:
    """A root stage and a child, so every test also shows the drop of descendants."""
    root = {"command": probe_command("--sleep", str(sleep)) if sleep else probe_command(), "priority": str(priority)}
    return graphml({"first": root, "second": {"command": probe_command()}}, edges=[("first", "second")],
                   trigger=f"{name}*", budget_s=budget_s, name=name)


def expired_count(template: str) -> float:
    return metrics.JOBS.labels(template, "first", "expired")._value.get()


def by_template(stack: Stack, template: str) -> dict[str, dict]:
    return {j["node"]: j for j in stack.jobs() if j["template"] == template}


def assert_expired_once(stack: Stack, template: str, reason: str) -> None:
    jobs = by_template(stack, template)
    assert jobs["first"]["state"] == "expired", jobs["first"]
    assert reason in jobs["first"]["reason"]
    assert jobs["first"]["started_at"] is None, "an expired task never ran"
    assert jobs["second"]["state"] == "dropped"
    assert f"'first' (job {jobs['first']['id']})" in jobs["second"]["reason"]
    assert expired_count(template) == 1, "the job must be counted expired exactly once"


@pytest.fixture
def make(tmp_path: Path, broker_url: str, database_url: str) -> Iterator:
    stacks: list[Stack] = []

    def factory(pilots: int = 0, **env: str) -> tuple[Stack, Path]:
        watch = tmp_path / "incoming"
        watch.mkdir(exist_ok=True)
        stack = Stack(make_settings(tmp_path, broker_url, database_url, **env), watch=watch, pilots=pilots).start()
        stacks.append(stack)
        return stack, watch

    yield factory
    for stack in stacks:
        try:
            report = stack.audit(grace_s=30)
            assert report.ok, report.problems
        finally:
            stack.stop()


def start_pilot(stack: Stack) -> threading.Thread:
    """One more in-process pilot, started late on purpose; stopped with the stack."""
    pilot = app.make_pilot(stack.settings)
    stack.group.pilots.append(pilot)
    t = threading.Thread(target=lambda: (pilot.run(), pilot.close()), daemon=True)
    stack.group.threads.append(t)
    t.start()
    return t


def test_path_a_broker_dead_letters_an_expired_task(make) -> None:
    stack, watch = make(pilots=0, P3S_DISPATCHER_REAP_GRACE_S="600")  # the reaper stays out of it
    stack.import_template(two_stage("ttl", budget_s=1), "ttl")
    (watch / "ttl1.dat").write_bytes(b"x")
    wait_for(lambda: by_template(stack, "ttl").get("first", {}).get("state") == "expired", timeout=20,
             what="RabbitMQ to dead-letter the task")
    assert_expired_once(stack, "ttl", "dead-lettered by the broker (expired)")
    with broker.connect(stack.settings.broker) as conn:
        assert broker.queue_depth(conn, topology.task_queue("default")) == 0


def test_path_b_pilot_refuses_a_late_delivery(make) -> None:
    """RabbitMQ hands a prefetch-1 consumer a high-priority task whose TTL passed: the pilot refuses it."""
    stack, watch = make(pilots=0, P3S_DISPATCHER_REAP_GRACE_S="600")
    stack.import_template(two_stage("bulk", budget_s=300, priority=1), "bulk")
    stack.import_template(two_stage("urgent", budget_s=1, priority=9), "urgent")
    (watch / "bulk1.dat").write_bytes(b"x")
    wait_for(lambda: by_template(stack, "bulk").get("first", {}).get("state") == "queued", what="bulk queued")
    (watch / "urgent1.dat").write_bytes(b"x")
    wait_for(lambda: by_template(stack, "urgent").get("first", {}).get("state") == "queued", what="urgent queued")
    time.sleep(2.0)  # the urgent task's deadline passes while no pilot is there
    assert by_template(stack, "urgent")["first"]["state"] == "queued", "RabbitMQ did not expire it by itself"
    start_pilot(stack)
    wait_for(lambda: by_template(stack, "urgent")["first"]["state"] == "expired", what="the pilot's refusal")
    assert_expired_once(stack, "urgent", "deadline")
    assert by_template(stack, "urgent")["first"]["pilot_id"], "the refusal came from a pilot"
    wait_for(lambda: by_template(stack, "bulk")["second"]["state"] == "finished", what="the bulk workflow")


def test_path_c_reaper_expires_a_task_stuck_behind_the_head(make) -> None:
    """A long-lived task at the head keeps RabbitMQ from expiring a short-lived one behind it."""
    stack, watch = make(pilots=0, P3S_DISPATCHER_REAP_GRACE_S="3")
    stack.import_template(two_stage("head", budget_s=300), "head")
    stack.import_template(two_stage("behind", budget_s=1), "behind")
    (watch / "head1.dat").write_bytes(b"x")
    wait_for(lambda: by_template(stack, "head").get("first", {}).get("state") == "queued", what="head queued")
    (watch / "behind1.dat").write_bytes(b"x")
    job = wait_for(lambda: by_template(stack, "behind").get("first"), what="behind created")
    wait_for(lambda: time.time() > job["deadline"] + 1.5, what="the deadline to pass")
    # Past its TTL, yet RabbitMQ still holds it: only the head of a queue is expired.
    assert by_template(stack, "behind")["first"]["state"] == "queued"
    with broker.connect(stack.settings.broker) as conn:
        assert broker.queue_depth(conn, topology.task_queue("default")) == 2
    wait_for(lambda: by_template(stack, "behind")["first"]["state"] == "expired", what="the reaper")
    assert_expired_once(stack, "behind", "deadline passed before it started")
    # When a pilot comes, the broker or the pilot meets the stale task too; neither changes the record.
    start_pilot(stack)
    wait_for(lambda: by_template(stack, "head")["second"]["state"] == "finished", what="the head workflow")
    time.sleep(1.0)
    assert_expired_once(stack, "behind", "deadline passed before it started")


def test_killed_pilot_is_lost_and_its_job_is_not_redelivered(make) -> None:
    stack, watch = make(pilots=0, P3S_DISPATCHER_HEARTBEAT_TIMEOUT_S="3")
    stack.import_template(two_stage("lost", budget_s=300, sleep=60), "lost")
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env.update(env_for(stack.settings), P3S_PILOT_HEARTBEAT_S="0.5", P3S_DATABASE_URL="")
    victim = subprocess.Popen([sys.executable, "-m", "p3s", "pilot", "--id", "victim"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(p["id"] == "victim" for p in stack.pilots()), what="the pilot to register")
        (watch / "lost1.dat").write_bytes(b"x")
        wait_for(lambda: by_template(stack, "lost").get("first", {}).get("state") == "running", what="the job")
        start_pilot(stack)  # a healthy pilot that must not get the lost job
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.time()
        wait_for(lambda: by_template(stack, "lost")["first"]["state"] == "lost", timeout=15, what="the job lost")
    finally:
        if victim.poll() is None:
            victim.kill()
    assert time.time() - killed_at < 3 + 2 * stack.settings.dispatcher.reap_interval_s + 2
    pilots = {p["id"]: p for p in stack.pilots()}
    assert pilots["victim"]["state"] == "lost"
    jobs = by_template(stack, "lost")
    assert jobs["first"]["pilot_id"] == "victim" and "victim" in jobs["first"]["reason"]
    assert jobs["second"]["state"] == "dropped"
    time.sleep(1.5)
    assert sum(p["jobs_done"] for i, p in stack.pilots_by_id().items() if i != "victim") == 0
    assert by_template(stack, "lost")["first"]["state"] == "lost"
    with broker.connect(stack.settings.broker) as conn:
        assert broker.queue_depth(conn, topology.task_queue("default")) == 0


def test_overload_is_bounded_and_accounted(make) -> None:
    """Files arrive far faster than one pilot runs them: a bounded queue, nothing started late, books balance."""
    stack, watch = make(pilots=1, P3S_BROKER_MAX_QUEUE_LENGTH="4", P3S_DISPATCHER_REAP_GRACE_S="1")
    stack.import_template(graphml({"dqm": {"command": probe_command("--sleep", "0.3"), "expected_s": "0.3"}},
                                  budget_s=3, name="load"), "load")
    deepest = 0
    with broker.connect(stack.settings.broker) as conn:
        for i in range(60):
            (watch / f"burst{i:03d}.dat").write_bytes(b"x")
            time.sleep(0.02)
            deepest = max(deepest, broker.queue_depth(conn, topology.task_queue("default", 4)))
    jobs = wait_for(lambda: terminal_jobs(stack, 60), timeout=60, what="every job to end")
    states = [j["state"] for j in jobs]
    assert deepest <= 4, "the task queue is bounded"
    assert states.count("finished") >= 3, states
    assert states.count("dropped") > 0, "a full queue sheds its oldest tasks"
    assert {j["reason"] for j in jobs if j["state"] == "dropped"} == {"overload"}
    for j in jobs:
        if j["started_at"] is not None:
            assert j["started_at"] <= j["deadline"], f"job {j['id']} started after its deadline"
    assert set(states) <= {"finished", "dropped", "expired"}
    assert len(stack.files()) == 60
