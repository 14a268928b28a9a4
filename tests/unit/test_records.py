"""The dispatcher's records on SQLite, without a broker: decisions, versions, idempotent reports, audit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from p3s import db
from p3s.dagengine import parse_graphml
from p3s.dispatcher import admin, intake, reaper
from p3s.dispatcher.jobs import apply_job_report, expire_task, mark_published
from p3s.dispatcher.context import Context
from p3s.dispatcher.audit import run_audit
from p3s.dispatcher.sampling import keep
from p3s.errors import NotFound
from p3s.messages import DataEvent, JobReport
from p3s.states import JobState
from tests.stack import graphml, make_settings


@pytest.fixture
def engine(tmp_path: Path) -> Iterator:
    url = f"sqlite:///{tmp_path / 'p3s.db'}"
    db.upgrade(url)
    eng = db.make_engine(url)
    yield eng
    eng.dispose()


def ctx(tmp_path: Path, **env: str) -> Context:
    return Context(make_settings(tmp_path, **env))


def event(name: str, **kw: object) -> DataEvent:
    return DataEvent(name=name, path=f"/data/{name}", stream=str(kw.pop("stream", "raw")), seen_at=time.time(),
                     **kw)  # type: ignore[arg-type]


def add_template(engine, text: str, name: str) -> None:
    with Session(engine) as s, s.begin():
        admin.import_template(s, parse_graphml(text, name=name))


# The token of each task handed out, as the pilot that took it would carry it in its reports.
TOKENS: dict[int, str] = {}


def _keep_tokens(tasks: list) -> list:
    TOKENS.update({t.job_id: t.token for t in tasks})
    return tasks


def record(engine, events: list[DataEvent], c: Context) -> list:
    with Session(engine) as s, s.begin():
        return _keep_tokens(intake.record_events(s, events, c))


def report(engine, job_id: int, state: JobState, c: Context, **kw: object) -> list:
    kw.setdefault("token", TOKENS.get(job_id, ""))
    with Session(engine) as s, s.begin():
        return _keep_tokens(apply_job_report(s, JobReport(job_id, state, "pilot-1", **kw), c))  # type: ignore[arg-type]


def jobs(engine) -> dict[str, dict]:
    with Session(engine) as s:
        return {j["node"]: j for j in admin.list_jobs(s, limit=1000)}


DIAMOND = graphml(
    {"a": {"command": "true"}, "b": {"command": "true"}, "c": {"command": "true"}, "d": {"command": "true"}},
    edges=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
)


def test_each_matching_template_makes_its_own_workflow(engine, tmp_path: Path) -> None:
    add_template(engine, graphml({"m": {"command": "true"}}, trigger="*.hdf5"), "monitor")
    add_template(engine, graphml({"p": {"command": "true"}}, trigger="np04_*"), "purity")
    add_template(engine, graphml({"x": {"command": "true"}}, trigger="*.root"), "other")
    tasks = record(engine, [event("np04_run1.hdf5")], ctx(tmp_path))
    assert sorted(t.template for t in tasks) == ["monitor", "purity"]
    assert len({t.workflow_id for t in tasks}) == 2


def test_deleted_template_stops_new_workflows_and_keeps_history(engine, tmp_path: Path) -> None:
    add_template(engine, graphml({"m": {"command": "true"}}), "monitor")
    assert len(record(engine, [event("f1")], ctx(tmp_path))) == 1
    with Session(engine) as s, s.begin():
        admin.delete_template(s, "monitor")
    assert record(engine, [event("f2")], ctx(tmp_path)) == []
    with Session(engine) as s:
        assert [w["template"] for w in admin.list_workflows(s)] == ["monitor"]
        assert admin.list_templates(s) == []
        assert [t["state"] for t in admin.list_templates(s, include_deleted=True)] == ["deleted"]
        with pytest.raises(NotFound):
            admin.delete_template(s, "monitor")


def test_running_workflows_keep_their_template_version(engine, tmp_path: Path) -> None:
    c = ctx(tmp_path)
    add_template(engine, graphml({"a": {"command": "true"}, "b": {"command": "echo v1"}}, edges=[("a", "b")]), "t")
    (first,) = record(engine, [event("f1")], c)
    add_template(engine, graphml({"a": {"command": "true"}, "b": {"command": "echo v2"}}, edges=[("a", "b")]), "t")
    (child,) = report(engine, first.job_id, JobState.FINISHED, c, ended_at=time.time())
    assert child.argv == ["echo", "v1"], "a workflow made from version 1 runs version 1 to its end"
    (second,) = record(engine, [event("f2")], c)
    (child2,) = report(engine, second.job_id, JobState.FINISHED, c, ended_at=time.time())
    assert child2.argv == ["echo", "v2"]


def test_decisions_duplicate_sampled_out_and_forced(engine, tmp_path: Path) -> None:
    add_template(engine, graphml({"m": {"command": "true"}}), "monitor")
    c = ctx(tmp_path, P3S_SAMPLING='{"raw": 0.5}')
    names = [f"run{i:04d}.hdf5" for i in range(200)]
    record(engine, [event(n) for n in names], c)
    record(engine, [event(names[0]), event(names[0], force=True, by_hand=True)], c)
    with Session(engine) as s:
        files = admin.list_files(s, limit=1000)
    decisions = {f["name"]: f["decision"] for f in files if not f["by_hand"] and f["id"] <= 200}
    assert {n for n, d in decisions.items() if d == "accepted"} == {n for n in names if keep(n, 0.5)}
    assert {d for d in decisions.values()} == {"accepted", "sampled_out"}
    last_two = sorted(files, key=lambda f: f["id"])[-2:]
    assert [(f["decision"], f["forced"]) for f in last_two] == [("duplicate", False), ("accepted", True)]


def test_redelivered_event_is_recorded_once(engine, tmp_path: Path) -> None:
    add_template(engine, graphml({"m": {"command": "true"}}), "monitor")
    ev = event("f1")
    (task,) = record(engine, [ev], ctx(tmp_path))
    with Session(engine) as s, s.begin():
        mark_published(s.connection(), [task.job_id], time.time())
    assert record(engine, [ev], ctx(tmp_path)) == [], "the same event again is a redelivery, not a new sighting"
    with Session(engine) as s:
        assert len(admin.list_files(s)) == 1


def test_redelivered_event_publishes_the_task_the_broker_never_confirmed(engine, tmp_path: Path) -> None:
    """A dispatcher killed between its commit and its publish: the redelivery publishes the task, once."""
    add_template(engine, graphml({"m": {"command": "true"}}), "monitor")
    ev = event("f1")
    (task,) = record(engine, [ev], ctx(tmp_path))
    (again,) = record(engine, [ev], Context(make_settings(tmp_path), now=time.time() + 1))
    assert again.job_id == task.job_id and again.argv == task.argv
    with Session(engine) as s:
        assert len(admin.list_files(s)) == 1
        assert [j["state"] for j in admin.list_jobs(s)] == ["queued"]
    # Too late to run it: the job ends, saying why, instead of being published.
    late = Context(make_settings(tmp_path), now=task.deadline + 1)
    assert record(engine, [ev], late) == []
    (job,) = jobs(engine).values()
    assert job["state"] == "expired" and job["reason"].startswith("not published")


def test_a_refused_file_is_recorded_with_its_reason_and_makes_nothing(engine, tmp_path: Path) -> None:
    add_template(engine, graphml({"m": {"command": "true"}}), "monitor")
    c = ctx(tmp_path)
    with Session(engine) as s, s.begin():
        tasks = intake.record_events(s, [event("run\\xff.dat"), event("good.dat")], c,
                                     ["file name is not valid UTF-8", ""])
    assert [t.values["input_name"] for t in tasks] == ["good.dat"]
    with Session(engine) as s:
        files = {f["name"]: f for f in admin.list_files(s)}
    assert files["run\\xff.dat"]["decision"] == "refused"
    assert files["run\\xff.dat"]["reason"] == "file name is not valid UTF-8"
    assert files["good.dat"]["decision"] == "accepted"


def test_counters_move_only_when_the_transaction_commits(engine, tmp_path: Path) -> None:
    from p3s import metrics

    add_template(engine, graphml({"m": {"command": "true"}}), "monitor")
    counter = metrics.FILES.labels("raw", "accepted")
    before = counter._value.get()
    c = ctx(tmp_path)
    with pytest.raises(RuntimeError), Session(engine) as s, s.begin():
        intake.record_events(s, [event("rolled-back.dat")], c)
        raise RuntimeError("the transaction fails after the work")
    assert counter._value.get() == before, "nothing counted for a transaction that rolled back"
    # The dispatcher makes a new context for each attempt: the failed one's effects go with it.
    c = ctx(tmp_path)
    record(engine, [event("kept.dat")], c)
    assert counter._value.get() == before
    c.committed()
    assert counter._value.get() == before + 1


def test_reports_are_idempotent_and_terminal_states_are_never_left(engine, tmp_path: Path) -> None:
    c = ctx(tmp_path)
    add_template(engine, DIAMOND, "diamond")
    (root,) = record(engine, [event("f1")], c)
    now = time.time()
    children = report(engine, root.job_id, JobState.FINISHED, c, ended_at=now, exit_code=0)
    assert sorted(t.node for t in children) == ["b", "c"]
    # The same report again, and a late 'running' after 'finished': nothing moves, nothing is enqueued twice.
    assert report(engine, root.job_id, JobState.FINISHED, c, ended_at=now, exit_code=0) == []
    assert report(engine, root.job_id, JobState.RUNNING, c, started_at=now) == []
    assert report(engine, root.job_id, JobState.FAILED, c, exit_code=1) == []
    b, cc = sorted(children, key=lambda t: t.node)
    assert report(engine, b.job_id, JobState.FINISHED, c, ended_at=now) == [], "the join waits for c"
    assert report(engine, cc.job_id, JobState.FAILED, c, ended_at=now, exit_code=2) == []
    j = jobs(engine)
    assert (j["a"]["state"], j["b"]["state"], j["c"]["state"], j["d"]["state"]) == (
        "finished", "finished", "failed", "dropped")
    assert f"'c' (job {cc.job_id})" in j["d"]["reason"]
    with Session(engine) as s:
        (wf,) = admin.list_workflows(s)
        assert wf["state"] == "incomplete" and wf["ended_at"] is not None
        assert run_audit(s, time.time(), 60).ok


def test_reaper_expires_late_jobs_and_loses_silent_pilots(engine, tmp_path: Path) -> None:
    add_template(engine, graphml({"a": {"command": "true"}, "b": {"command": "true"}}, edges=[("a", "b")],
                                 budget_s=1), "t")
    c = ctx(tmp_path, P3S_DISPATCHER_REAP_GRACE_S="0")
    (task,) = record(engine, [event("f1")], c)
    with Session(engine) as s, s.begin():
        mark_published(s.connection(), [task.job_id], time.time())
    later = Context(c.settings, now=time.time() + 5)
    with Session(engine) as s, s.begin():
        assert reaper.reap(s, later) == []
    j = jobs(engine)
    assert (j["a"]["state"], j["b"]["state"]) == ("expired", "dropped")
    # A dead-letter for the same task afterwards changes nothing.
    with Session(engine) as s, s.begin():
        assert expire_task(s, task, "expired", later) == []
    assert jobs(engine)["a"]["reason"] == "deadline passed before it started"


def test_audit_finds_what_is_wrong(engine, tmp_path: Path) -> None:
    c = ctx(tmp_path)
    add_template(engine, graphml({"a": {"command": "true"}}, budget_s=1), "t")
    record(engine, [event("f1"), event("f2")], c)
    with Session(engine) as s:
        report_ = run_audit(s, time.time() + 100, grace_s=10)
    assert not report_.ok
    assert any("past their deadline" in p for p in report_.problems)
    assert any("never confirmed" in p for p in report_.problems), "queued tasks the broker never confirmed"
    with Session(engine) as s, s.begin():
        s.execute(update(db.Job).where(db.Job.id == 1).values(deadline=float("inf")))
    with Session(engine) as s:
        assert any("deadline that is not a finite time" in p for p in run_audit(s, time.time(), 10).problems)
    with Session(engine) as s, s.begin():
        s.execute(update(db.Job).values(state="finished", ended_at=time.time()))
    with Session(engine) as s:
        report_ = run_audit(s, time.time() + 100, grace_s=10)
    assert any("workflows whose state disagrees" in p for p in report_.problems)
    assert report_.streams == [{"stream": "raw", "seen": 2, "accepted": 2, "sampled_out": 0, "duplicate": 0,
                                "shed": 0, "refused": 0}]


def test_a_report_without_the_right_token_or_from_another_pilot_changes_nothing(engine, tmp_path: Path) -> None:
    from p3s.errors import ReportRefused

    c = ctx(tmp_path)
    add_template(engine, graphml({"a": {"command": "true"}, "b": {"command": "true"}}, edges=[("a", "b")]), "t")
    (task,) = record(engine, [event("f1")], c)
    now = time.time()
    for forged in (
        JobReport(task.job_id, JobState.FINISHED, "pilot-1", ended_at=now, exit_code=0),  # no token
        JobReport(task.job_id, JobState.FINISHED, "pilot-1", ended_at=now, exit_code=0, token="0" * 32),
        JobReport(task.job_id, JobState.RUNNING, "pilot-1", started_at=now, token="f" * 32),
    ):
        with pytest.raises(ReportRefused, match="token"), Session(engine) as s, s.begin():
            apply_job_report(s, forged, c)
    assert jobs(engine)["a"]["state"] == "queued"
    report(engine, task.job_id, JobState.RUNNING, c, started_at=now)
    with pytest.raises(ReportRefused, match="took the job"), Session(engine) as s, s.begin():
        apply_job_report(s, JobReport(task.job_id, JobState.FINISHED, "pilot-2", ended_at=now, exit_code=0,
                                      token=task.token), c)
    assert jobs(engine)["a"]["state"] == "running" and jobs(engine)["b"]["state"] == "pending"
    (child,) = report(engine, task.job_id, JobState.FINISHED, c, ended_at=now, exit_code=0)
    assert child.node == "b" and child.token and child.token != task.token


def test_a_path_outside_the_roots_of_its_stream_is_refused(engine, tmp_path: Path) -> None:
    import dataclasses

    from p3s.config import SourceSettings

    add_template(engine, graphml({"m": {"command": "true"}}), "monitor")
    settings = dataclasses.replace(
        make_settings(tmp_path),
        sources=(SourceSettings(name="buffer", location="/data/buffer", stream="raw"),
                 SourceSettings(name="eos", kind="xrootd", location="root://eos.example.org//eos/np04", stream="raw")),
    )
    events = [
        DataEvent("ok.dat", "/data/buffer/run1/ok.dat", "raw", time.time()),
        DataEvent("eos.dat", "root://eos.example.org//eos/np04/run1/eos.dat", "raw", time.time()),
        DataEvent("shadow", "/etc/shadow", "raw", time.time()),
        DataEvent("up.dat", "/data/buffer/../secret/up.dat", "raw", time.time()),
        DataEvent("near.dat", "/data/buffer-other/near.dat", "raw", time.time()),
        DataEvent("other.dat", "/anywhere/other.dat", "calib", time.time()),  # a stream with no roots: unchecked
    ]
    with Session(engine) as s, s.begin():
        tasks = intake.record_events(s, events, Context(settings))
    assert sorted(t.values["input_name"] for t in tasks) == ["eos.dat", "ok.dat", "other.dat"]
    with Session(engine) as s:
        files = {f["name"]: f for f in admin.list_files(s)}
    for name in ("shadow", "up.dat", "near.dat"):
        assert files[name]["decision"] == "refused", files[name]
        assert files[name]["reason"] == "path outside the roots of stream 'raw'"


def test_a_task_started_after_its_job_ended_gets_its_pilot_told_to_stop(engine, tmp_path: Path) -> None:
    """A queued job cancelled (or expired) while its task waited: the pilot that takes it later is told to stop."""
    c = ctx(tmp_path)
    add_template(engine, graphml({"a": {"command": "true"}}), "t")
    (task,) = record(engine, [event("f1")], c)
    with Session(engine) as s, s.begin():
        s.execute(update(db.Job).values(state="dropped", reason="cancelled by operator", ended_at=time.time()))
    later = Context(c.settings)
    report(engine, task.job_id, JobState.RUNNING, later, started_at=time.time())
    assert [(o.action, o.pilot_id, o.job_id) for o in later.orders] == [("cancel_job", "pilot-1", task.job_id)]
    assert jobs(engine)["a"]["state"] == "dropped", "the job's end stands"
