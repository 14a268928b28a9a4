"""Admission: the queue model and its decisions, alone and inside the dispatcher's transaction on SQLite."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from p3s import db, metrics
from p3s.dagengine import parse_graphml
from p3s.dispatcher import admin, intake
from p3s.dispatcher.admission import Admission, Entry, QueueModel, Server, new_task_limit
from p3s.dispatcher.context import Context
from p3s.dispatcher.pilots import apply_pilot_report
from p3s.messages import DataEvent, PilotReport
from p3s.states import JobState, WorkflowState
from tests.stack import graphml, make_settings

NOW = 1_000_000.0


def entry(job_id: int, deadline: float, priority: int = 5, run: float = 1.0, seq: float = NOW,
          limit: float | None = None) -> Entry:
    return Entry(job_id, priority, seq, deadline, run, run, deadline if limit is None else limit)


# -- the model alone ---------------------------------------------------------------------


def test_fifo_within_a_priority_one_pilot() -> None:
    """One free pilot, 1 s tasks: the n-th new task finishes n seconds from now; past its limit it is dropped."""
    model = QueueModel("q", [Server(NOW)])
    new = [entry(i, NOW + 10, limit=NOW + 3.5) for i in range(6)]
    verdict = model.decide(NOW, new)
    assert [e.job_id for e in verdict.admitted] == [0, 1, 2]
    assert [(e.job_id, finish - NOW) for e, finish in verdict.dropped] == [(3, 4.0), (4, 4.0), (5, 4.0)]
    assert not verdict.doomed
    assert [e.job_id for e in model.entries] == [0, 1, 2]


def test_pilots_in_parallel_and_busy_ones() -> None:
    """Two pilots, one busy for 2 more seconds: tasks go to whichever is free first."""
    model = QueueModel("q", [Server(NOW), Server(NOW + 2)])
    verdict = model.decide(NOW, [entry(i, NOW + 10, limit=NOW + 3) for i in range(5)])
    # Starts: 0 (A), 1 (A), 2 (A or B), 2 (B or A) -> finishes 1, 2, 3, 3; the fifth would finish at 4.
    assert [e.job_id for e in verdict.admitted] == [0, 1, 2, 3]
    assert [e.job_id for e, _f in verdict.dropped] == [4]


def test_a_pilot_serving_two_busy_queues_gives_each_half() -> None:
    model = QueueModel("q", [Server(NOW, slowdown=2.0)])
    verdict = model.decide(NOW, [entry(i, NOW + 10, limit=NOW + 4) for i in range(4)])
    # Each 1 s task keeps the pilot from this queue for 2 s: finishes at 1, 3, (5 > 4).
    assert [e.job_id for e in verdict.admitted] == [0, 1]


def test_higher_priority_goes_ahead_and_dooms_what_it_pushes_past_its_deadline() -> None:
    """Priority first: the new urgent task is admitted; a queued lower one it pushes past its deadline is doomed."""
    model = QueueModel("q", [Server(NOW)], [entry(1, NOW + 2.5, priority=1), entry(2, NOW + 10, priority=1)])
    verdict = model.decide(NOW, [entry(3, NOW + 10, priority=9, run=2.0, limit=NOW + 5)])
    assert [e.job_id for e in verdict.admitted] == [3]
    # Job 1 would now start at 2 and finish at 3 > 2.5: doomed, and it takes no pilot time,
    # so job 2 starts at 2, not 3.
    assert [e.job_id for e in verdict.doomed] == [1]
    assert [e.job_id for e in model.entries] == [3, 2]


def test_equal_priority_new_work_never_displaces_queued_work() -> None:
    model = QueueModel("q", [Server(NOW)], [entry(1, NOW + 1.5)])
    verdict = model.decide(NOW, [entry(2, NOW + 30, limit=NOW + 15)])
    assert [e.job_id for e in verdict.admitted] == [2] and not verdict.doomed


def test_a_dropped_task_frees_its_time_for_those_behind() -> None:
    """A tight task that cannot finish is dropped; a looser one behind it still fits."""
    model = QueueModel("q", [Server(NOW + 3)])
    verdict = model.decide(NOW, [entry(1, NOW + 10, limit=NOW + 3.5), entry(2, NOW + 30, limit=NOW + 15)])
    assert [e.job_id for e, _f in verdict.dropped] == [1]
    assert [e.job_id for e in verdict.admitted] == [2]


def test_admitted_tasks_are_held_to_their_deadline_afterwards() -> None:
    """The share applies at admission; once queued, a task keeps its place while it can meet its deadline."""
    model = QueueModel("q", [Server(NOW)])
    model.decide(NOW, [entry(1, NOW + 10, priority=1, limit=NOW + 5)])
    verdict = model.decide(NOW, [entry(2, NOW + 10, priority=9, run=4.0, limit=NOW + 5)])
    assert not verdict.doomed, "job 1 now finishes at 5 + ... = 5.0 <= its deadline 10"
    assert [e.job_id for e in model.entries] == [2, 1]


def test_time_passing_drains_the_model_between_refreshes() -> None:
    model = QueueModel("q", [Server(NOW)])
    model.decide(NOW, [entry(i, NOW + 60) for i in range(10)])
    model.advance(NOW + 3.5)
    # Tasks 0-3 started by then (at 0, 1, 2, 3); 4..9 still wait, the pilot busy until 4.
    assert [e.job_id for e in model.entries] == [4, 5, 6, 7, 8, 9]
    assert model.servers[0].free_at == NOW + 4


def test_no_pilot_admits_everything() -> None:
    """A queue no live pilot serves is not bounded by the model: deadlines still apply downstream."""
    model = QueueModel("q", [])
    verdict = model.decide(NOW, [entry(i, NOW + 1, limit=NOW + 0.5) for i in range(50)])
    assert len(verdict.admitted) == 50 and not verdict.dropped


def test_fifo_only_on_the_embedded_transport() -> None:
    model = QueueModel("q", [Server(NOW)], [entry(1, NOW + 1.5, priority=1)], priorities=False)
    verdict = model.decide(NOW, [entry(2, NOW + 10, priority=9, limit=NOW + 5)])
    assert not verdict.doomed and [e.job_id for e in model.entries] == [1, 2]


def test_new_task_limit() -> None:
    # A root stage: half its budget from the file seen, but a task longer than what is left of
    # that may still start on a free pilot if it can finish by its deadline.
    assert new_task_limit(NOW, NOW - 1, NOW + 9, 0.5, 0.5, root=True) == NOW + 4
    assert new_task_limit(NOW, NOW, NOW + 10, 7.0, 0.5, root=True) == NOW + 7
    assert new_task_limit(NOW, NOW, NOW + 10, 12.0, 0.5, root=True) == NOW + 10
    # A later stage: its parents' work is spent; it may take all its time left.
    assert new_task_limit(NOW, NOW - 6, NOW + 4, 0.5, 0.5, root=False) == NOW + 4


# -- inside the dispatcher's transaction, on SQLite ----------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator:
    url = f"sqlite:///{tmp_path / 'p3s.db'}"
    db.upgrade(url)
    eng = db.make_engine(url)
    yield eng
    eng.dispose()


def add_template(engine, text: str, name: str) -> None:
    with Session(engine) as s, s.begin():
        admin.import_template(s, parse_graphml(text, name=name))


def register(engine, c: Context, pilot_id: str, queues: list[str], state: str = "idle") -> None:
    with Session(engine) as s, s.begin():
        apply_pilot_report(s, PilotReport(pilot_id, "heartbeat", "host", 1, queues, state), c)


def events(prefix: str, n: int, seen_at: float) -> list[DataEvent]:
    return [DataEvent(name=f"{prefix}{i:03d}", path=f"/data/{prefix}{i:03d}", stream="raw", seen_at=seen_at)
            for i in range(n)]


def batch(engine, admission: Admission, evs: list[DataEvent], c: Context) -> list:
    """As the dispatcher does it: record, admit, commit, then the effects."""
    with Session(engine) as s, s.begin():
        tasks = admission.admit(s, c, intake.record_events(s, evs, c))
    c.committed()
    return tasks


def test_an_overload_is_cut_at_admission_and_every_drop_is_ended_and_counted(engine, tmp_path: Path) -> None:
    """1 pilot, 0.5 s tasks, 10 s budget, 40 files at once: those that would finish after 5 s are dropped now."""
    c = Context(make_settings(tmp_path), now=time.time())
    add_template(engine, graphml({"dqm": {"command": "true", "expected_s": "0.5"}, "plot": {"command": "true"}},
                                 edges=[("dqm", "plot")], budget_s=10, name="adm"), "adm")
    register(engine, c, "p1", ["default"])
    before = metrics.JOBS.labels("adm", "dqm", JobState.DROPPED)._value.get()
    tasks = batch(engine, Admission(), events("a", 40, c.now), c)
    # Finishes at 0.5, 1.0, ... 5.0 s: ten fit in half the 10 s budget.
    assert len(tasks) == 10
    with Session(engine) as s:
        jobs = admin.list_jobs(s, limit=1000)
        workflows = admin.list_workflows(s, limit=1000)
    roots = [j for j in jobs if j["node"] == "dqm"]
    dropped = [j for j in roots if j["state"] == JobState.DROPPED]
    assert len(dropped) == 30
    assert all(j["reason"].startswith("overload: on queue default") for j in dropped)
    assert {j["id"] for j in roots if j["state"] == JobState.QUEUED} == {t.job_id for t in tasks}
    children = {j["workflow_id"]: j for j in jobs if j["node"] == "plot"}
    for j in dropped:
        assert children[j["workflow_id"]]["state"] == JobState.DROPPED, "descendants go with it"
    assert sum(1 for w in workflows if w["state"] == WorkflowState.INCOMPLETE) == 30
    assert metrics.JOBS.labels("adm", "dqm", JobState.DROPPED)._value.get() - before == 30


def test_the_model_is_kept_between_batches_and_read_back_at_most_every_second(engine, tmp_path: Path) -> None:
    """Small batches within a second cost no refresh; the queue they filled is remembered."""
    c = Context(make_settings(tmp_path), now=time.time())
    add_template(engine, graphml({"dqm": {"command": "true", "expected_s": "1"}}, budget_s=10, name="k"), "k")
    register(engine, c, "p1", ["default"])
    admission = Admission()
    assert len(batch(engine, admission, events("a", 3, c.now), c)) == 3
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        later = Context(make_settings(tmp_path), now=c.now + 0.2)
        # The pilot is taken until 3.0 s; 4.0 and 5.0 still fit within 5 s of ~10 s left, 6.0 does not.
        assert len(batch(engine, admission, events("b", 5, later.now), later)) == 2
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)
    assert not [q for q in statements if "FROM pilots" in q], "no refresh within a second of the last"


def test_stale_model_is_read_back_from_the_database(engine, tmp_path: Path) -> None:
    """After a refresh the queue is what the database says, not what this dispatcher remembers."""
    c = Context(make_settings(tmp_path), now=time.time())
    add_template(engine, graphml({"dqm": {"command": "true", "expected_s": "1"}}, budget_s=10, name="r"), "r")
    register(engine, c, "p1", ["default"])
    first = Admission()
    assert len(batch(engine, first, events("a", 5, c.now), c)) == 5
    # A second dispatcher (or this one, restarted) sees those five queued in the database.
    other = Admission()
    assert batch(engine, other, events("b", 3, c.now), c) == []


def test_no_live_pilot_admits_and_logs_once(engine, tmp_path: Path, caplog) -> None:
    c = Context(make_settings(tmp_path), now=time.time())
    add_template(engine, graphml({"dqm": {"command": "true", "expected_s": "1"}}, budget_s=4, name="np"), "np")
    register(engine, c, "gone", ["default"], state="lost")
    admission = Admission()
    caplog.set_level("WARNING", logger="p3s.dispatcher.admission")
    assert len(batch(engine, admission, events("a", 20, c.now), c)) == 20
    later = Context(make_settings(tmp_path), now=c.now + 2)
    assert len(batch(engine, admission, events("b", 5, later.now), later)) == 5
    assert sum("no live pilot" in r.getMessage() for r in caplog.records) == 1


def test_a_hand_set_max_queue_length_wins(engine, tmp_path: Path) -> None:
    c = Context(make_settings(tmp_path, P3S_BROKER_MAX_QUEUE_LENGTH="4"), now=time.time())
    add_template(engine, graphml({"dqm": {"command": "true", "expected_s": "1"}}, budget_s=4, name="m"), "m")
    register(engine, c, "p1", ["default"])
    assert len(batch(engine, Admission(), events("a", 20, c.now), c)) == 20


def test_learned_run_time_fills_a_task_without_expected_s(engine, tmp_path: Path) -> None:
    """A stage without expected_s: its p95 from finished jobs, read again while too few had finished."""
    c = Context(make_settings(tmp_path), now=time.time())
    add_template(engine, graphml({"dqm": {"command": "true"}}, budget_s=10, name="l"), "l")
    register(engine, c, "p1", ["default"])
    admission = Admission()
    tasks = batch(engine, admission, events("a", 8, c.now), c)
    # Nothing known yet: nothing to judge by, so nothing is dropped (the pilots' own check remains).
    assert len(tasks) == 8 and {t.expected_s for t in tasks} == {0.0}
    tasks += batch(engine, Admission(share=0), events("z", 2, c.now), c)
    with Session(engine) as s, s.begin():
        for j in s.query(db.Job).all():
            j.state, j.started_at, j.ended_at = JobState.FINISHED, c.now, c.now + 2.0
    later = Context(make_settings(tmp_path), now=c.now + 1.5)
    tasks = batch(engine, admission, events("b", 5, later.now), later)
    # 2 s each on one free pilot: finishes at 2 and 4 within 5 s of ~8.5 s left... the third at 6 is not.
    assert [t.expected_s for t in tasks] == [2.0, 2.0]


def test_priorities_on_a_real_broker_order_the_queue(engine, tmp_path: Path) -> None:
    """Two templates on one queue: the urgent one goes ahead; new low-priority work is cut to fit behind it."""
    settings = make_settings(tmp_path, P3S_BROKER_URL="amqp://guest:guest@127.0.0.1:1/none")
    c = Context(settings, now=time.time())
    add_template(engine, graphml({"dqm": {"command": "true", "expected_s": "1", "priority": "1"}},
                                 trigger="low*", budget_s=30, name="low"), "low")
    add_template(engine, graphml({"dqm": {"command": "true", "expected_s": "1", "priority": "9"}},
                                 trigger="high*", budget_s=10, name="high"), "high")
    register(engine, c, "p1", ["default"])
    admission = Admission()
    assert len(batch(engine, admission, events("low", 10, c.now), c)) == 10  # up to 10 s of 15 s
    tasks = batch(engine, admission, events("high", 8, c.now), c)
    # The idle pilot took the first low one at once (busy until 1 s); the urgent ones go next,
    # ahead of the nine low ones still queued: finishing at 2, 3, 4, 5 s.
    assert len(tasks) == 4
    # The low ones now finish at 6 ... 14 s, all before their 30 s deadline; new low ones
    # finish at 15 s (admitted: half of 30 s) and 16 s (dropped).
    assert len(batch(engine, admission, events("lowx", 2, c.now), c)) == 1


# -- what the operator sees -----------------------------------------------------------------------


def test_status_shows_the_on_time_share_per_template(engine, tmp_path: Path) -> None:
    from p3s.dispatcher import status

    settings = make_settings(tmp_path)
    c = Context(settings, now=time.time())
    add_template(engine, graphml({"dqm": {"command": "true"}}, budget_s=10, name="st"), "st")
    batch(engine, Admission(share=0), events("a", 5, c.now - 100), c)
    with Session(engine) as s, s.begin():
        wfs = s.query(db.Workflow).order_by(db.Workflow.id).all()
        # Three finished in time, one finished late, one incomplete; none still running.
        for wf, (state, after) in zip(wfs, [("finished", 2), ("finished", 5), ("finished", 9.9),
                                            ("finished", 12), ("incomplete", 3)], strict=True):
            wf.state, wf.ended_at = state, wf.seen_at + after
    with Session(engine) as s:
        data = status.collect(s, settings, now=c.now, watcher_metrics="")
    assert data["on_time"] == [{"template": "st", "ended": 5, "on_time": 3, "share": 0.6}]
    text = status.render(data)
    assert "on time, workflows finished within their deadline" in text
    assert "60.0%" in text
