"""Two dispatchers on one database and one broker: every join runs exactly once.

Two ``p3s dispatcher`` processes consume the same queues of one vhost and
write one PostgreSQL database; pilots are processes of their own.  The
template is a diamond (a -> b, a -> c, b + c -> d), so a workflow's join d
becomes ready when the second of b and c finishes, and the two reports often
reach different dispatchers at the same instant: each must see the other's
commit, or d runs twice (both enqueue it) or never (neither does).  The
payload appends one line per run to a file of the test's own, so "exactly
once" is checked by what ran, not only by what the database says.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from p3s.dispatcher import admin
from p3s.states import TERMINAL_JOB_STATES
from tests.integration.test_sampling import publish
from tests.procs import Part, Parts, import_template
from tests.stack import graphml, make_settings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

FILES = 200
PILOTS = 4
NODES = "abcd"
EDGES = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
TERMINAL = {s.value for s in TERMINAL_JOB_STATES}

# One line per run: "<workflow id> <node> <job id>", appended (O_APPEND: lines never interleave).
RECORD = "/bin/sh -c 'echo \"$1 $2 $3\" >> \"$4\"' sh {{workflow_id}} {node} {{job_id}} {runs}"

#: The dispatcher's INFO line when a workflow ends (p3s/dispatcher/jobs.py end_workflow).
ENDED = re.compile(r"workflow (\d+): (\w+)$", re.MULTILINE)


def diamond(runs: Path) -> str:
    nodes = {n: {"command": RECORD.format(node=n, runs=runs), "wall_s": "30"} for n in NODES}
    return graphml(nodes, EDGES, budget_s=600, name="diamond")


def consumers(parts: Parts, queue: str) -> int:
    from kombu import Connection

    with Connection(parts.settings.broker.url, connect_timeout=5) as conn:
        try:
            return conn.default_channel.queue_declare(queue, passive=True).consumer_count
        except Exception:  # not declared yet
            return 0


def ended_by(part: Part) -> dict[int, str]:
    return {int(wf): state for wf, state in ENDED.findall(part.log())}


def test_two_dispatchers_share_a_database_and_run_every_join_once(
    tmp_path: Path, broker_url: str, database_url: str
) -> None:
    runs = tmp_path / "runs.txt"
    runs.touch()
    settings = make_settings(tmp_path, broker_url, database_url)
    import_template(settings, diamond(runs), name="diamond")
    names = [f"np04_raw_run{7000:06d}_{i:04d}.hdf5" for i in range(FILES)]

    # Heartbeats every 5 s, not the 1 s of tests.procs.FAST: fewer reports.  On a loaded
    # host the reports can queue for longer than the 60 s after which a silent pilot
    # is lost; liveness is not what this test is about, so the timeout is long.
    with Parts(tmp_path, settings, P3S_PILOT_HEARTBEAT_S="5", P3S_DISPATCHER_HEARTBEAT_TIMEOUT_S="600") as parts:
        dispatchers = [parts.start("dispatcher", "dispatcher") for _ in range(2)]
        pilots = [parts.start("pilot", "pilot") for _ in range(PILOTS)]
        # All consume before anything arrives, so RabbitMQ shares events and reports between the two.
        for queue, count in (("p3s.dispatcher.events", 2), ("p3s.dispatcher.status", 2),
                             ("p3s.tasks.default", PILOTS)):
            parts.wait_for(lambda queue=queue, count=count: consumers(parts, queue) == count, timeout=120,
                           what=f"{count} consumers on {queue}", alive=[*dispatchers, *pilots])
        publish(broker_url, names)

        def all_ended() -> list[dict[str, Any]] | None:
            jobs = parts.db_jobs()
            done = len(jobs) == FILES * len(NODES) and all(j["state"] in TERMINAL for j in jobs)
            return jobs if done else None

        # Generous: this asserts what ran, not how fast.
        jobs = parts.wait_for(all_ended, timeout=240, every=0.5, what="every job to end",
                              alive=[*dispatchers, *pilots])
        workflows = parts.query(admin.list_workflows, limit=100000)
        checked = parts.audit()
        parts.assert_alive(*dispatchers, *pilots)
        parts.stop_all()

    # The database: four jobs per workflow, all finished; every workflow finished.
    per_workflow = Counter((j["workflow_id"], j["node"]) for j in jobs)
    assert len(workflows) == FILES
    assert {k: n for k, n in per_workflow.items() if n != 1} == {}, "one job row per node and workflow"
    assert Counter(j["state"] for j in jobs) == {"finished": FILES * len(NODES)}, [
        j for j in jobs if j["state"] != "finished"][:5]
    assert Counter(w["state"] for w in workflows) == {"finished": FILES}

    # What ran: every job exactly once, and each join only after both its parents.
    lines = [line.split() for line in runs.read_text().splitlines()]
    ran = Counter((int(wf), node) for wf, node, _job in lines)
    assert {k: n for k, n in ran.items() if n != 1} == {}, "no job ran twice"
    assert len(ran) == FILES * len(NODES), "every job ran"
    assert {(int(wf), node): int(job) for wf, node, job in lines} == {
        (j["workflow_id"], j["node"]): j["id"] for j in jobs}
    order = {(int(wf), node): i for i, (wf, node, _job) in enumerate(lines)}
    early = [wf for wf, _n in order if _n == "d" and order[(wf, "d")] < max(order[(wf, "b")], order[(wf, "c")])]
    assert early == [], "a join ran before both its parents had"

    # Each workflow was ended by exactly one dispatcher, and both did their share.
    first, second = (ended_by(d) for d in dispatchers)
    assert set(first) & set(second) == set(), "no workflow ended twice"
    assert set(first) | set(second) == {w["id"] for w in workflows}
    assert first and second, (len(first), len(second))

    assert checked.returncode == 0, checked.stdout + checked.stderr
    for part in dispatchers:
        assert part.trouble(("database unavailable", "unexpected error", "refused")) == [], part.name
        log = part.log()
        # Their row locks are taken in one order, so neither waits on the other in a cycle.
        assert "rolled back by the database" not in log, part.name
        # A pilot's start report that reaches one dispatcher after its end reached the other is no cancel.
        assert "telling the pilot to stop it" not in log, part.name


# -- the same join, its two last reports in two dispatchers' batches at once -------------------


def _dispatcher(settings: Any) -> Any:
    """A dispatcher on the test's database; it is never started (its batches are driven by the test)."""
    from kombu import Connection

    from p3s import db
    from p3s.dispatcher.service import Dispatcher

    return Dispatcher(settings, db.make_engine(settings.database_url), Connection(settings.broker.effective_url))


def _items(reports: list[Any]) -> list[Any]:
    from kombu.message import Message

    from p3s.dispatcher.service import Item

    return [Item(Message(body=b"{}", delivery_info={}, properties={}), r) for r in reports]


def _waiting_on_locks(engine: Any) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                 " AND wait_event_type = 'Lock'")).scalar_one()


def test_crossing_report_batches_of_two_dispatchers_neither_deadlock_nor_miss_a_join(
    tmp_path: Path, database_url: str
) -> None:
    """Batch A ends b of workflows 1 and 2, batch B ends c of workflows 2 and 1, at the same time.

    A third session holds job b1's row, so A stops just after its first
    step while B takes its own first step: taking the rows in batch order, A
    holds workflow 1 and waits for workflow 2, B the reverse, and PostgreSQL
    fails one batch as a deadlock.  Each d must be enqueued exactly once.
    """
    import threading
    import time

    from sqlalchemy import select, text
    from sqlalchemy.orm import Session

    from p3s import db
    from p3s.dispatcher import intake
    from p3s.dispatcher.context import Context
    from p3s.dispatcher.jobs import apply_job_report
    from p3s.messages import DataEvent, JobReport
    from p3s.states import JobState

    settings = make_settings(tmp_path, "", database_url)
    import_template(settings, diamond(tmp_path / "unused"), name="diamond")
    engine = db.make_engine(database_url)
    tokens: dict[int, str] = {}

    def step(reports: list[tuple[int, JobState]]) -> None:
        with Session(engine) as s, s.begin():
            c = Context(settings)
            for job_id, state in reports:
                tasks = apply_job_report(s, JobReport(job_id, state, "pilot-1", token=tokens[job_id],
                                                      started_at=time.time()), c)
                tokens.update({t.job_id: t.token for t in tasks})

    with Session(engine) as s, s.begin():
        tasks = intake.record_events(s, [DataEvent(f"f{i}.dat", f"/data/f{i}.dat", "raw", time.time())
                                         for i in (1, 2)], Context(settings))
    tokens.update({t.job_id: t.token for t in tasks})
    with Session(engine) as s:
        ids = {(wf, node): job for job, wf, node in s.execute(select(db.Job.id, db.Job.workflow_id, db.Job.node))}
    w1, w2 = sorted({wf for wf, _node in ids})
    step([(ids[w, "a"], st) for w in (w1, w2) for st in (JobState.RUNNING, JobState.FINISHED)])
    step([(ids[w, n], JobState.RUNNING) for w in (w1, w2) for n in "bc"])

    def batch(order: list[int]) -> list[Any]:
        return _items([JobReport(order_id, JobState.FINISHED, "pilot-1", token=tokens[order_id],
                                 started_at=time.time(), ended_at=time.time(), exit_code=0)
                       for order_id in order])

    batch_a = batch([ids[w1, "b"], ids[w2, "b"]])
    batch_b = batch([ids[w2, "c"], ids[w1, "c"]])
    results: dict[str, Any] = {}

    def run(name: str, items: list[Any]) -> None:
        dispatcher = _dispatcher(settings)
        try:
            _ctx, made = dispatcher._commit(lambda s, c: dispatcher._apply_reports(s, items, c))
            results[name] = made
        except Exception as exc:  # noqa: BLE001 - the test reports what failed
            results[name] = exc
        finally:
            dispatcher.engine.dispose()

    blocker = engine.connect()
    tx = blocker.begin()
    blocker.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": ids[w1, "b"]})
    threads = [threading.Thread(target=run, args=("A", batch_a)), threading.Thread(target=run, args=("B", batch_b))]
    try:
        threads[0].start()
        wait = time.monotonic() + 20
        while _waiting_on_locks(engine) < 1 and time.monotonic() < wait:
            time.sleep(0.05)
        threads[1].start()
        while _waiting_on_locks(engine) < 2 and time.monotonic() < wait:
            time.sleep(0.05)
        assert _waiting_on_locks(engine) == 2, "both batches wait: A on the held row, B on A"
    finally:
        tx.rollback()
        blocker.close()
        for t in threads:
            t.join(30)

    assert not isinstance(results["A"], Exception) and not isinstance(results["B"], Exception), results
    made = Counter(t.job_id for name in "AB" for t in results[name])
    assert made == {ids[w1, "d"]: 1, ids[w2, "d"]: 1}, "each join enqueued once, by one of the two"
    with Session(engine) as s:
        states = dict(s.execute(select(db.Job.id, db.Job.state)).all())
    assert {(w, n): states[ids[w, n]] for w in (w1, w2) for n in "bcd"} == {
        (w, n): "queued" if n == "d" else "finished" for w in (w1, w2) for n in "bcd"}
    engine.dispose()
