"""``p3s purge`` and ``p3s status`` on SQLite, with hand-made records."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from p3s import db
from p3s.config import Settings, SourceSettings
from p3s.db import FileRecord, Job, Pilot, StagePriority, TemplateRecord, Workflow
from p3s.dispatcher import status
from p3s.dispatcher.purge import parse_duration, purge
from p3s.errors import ConfigError
from tests.stack import make_settings

DAY = 86400.0
NOW = time.time()
OLD = NOW - 40 * DAY
CUTOFF = NOW - 30 * DAY


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    yield engine
    engine.dispose()


def template(s: Session, name: str, created_at: float, deleted_at: float | None = None, queue: str = "default") -> int:
    version = (s.scalar(select(func.max(TemplateRecord.version)).where(TemplateRecord.name == name)) or 0) + 1
    spec = {"name": name, "nodes": [{"name": "a", "queue": queue}], "edges": []}
    record = TemplateRecord(name=name, version=version, trigger="*", budget_s=60, spec=spec,
                            created_at=created_at, deleted_at=deleted_at)
    s.add(record)
    s.flush()
    return record.id


def workflow(s: Session, template_id: int, name: str, at: float, state: str = "finished",
             jobs: tuple[str, ...] = ("finished", "finished"), latency: float = 5.0,
             decision: str = "accepted", tpl: str = "t") -> int:
    f = FileRecord(name=name, dedup_key=name, path=f"/data/{name}", stream="raw", seen_at=at, received_at=at,
                   decision=decision)
    s.add(f)
    s.flush()
    w = Workflow(file_id=f.id, template_id=template_id, template=tpl, state=state, seen_at=at, created_at=at,
                 deadline=at + 60, ended_at=None if state == "running" else at + latency)
    s.add(w)
    s.flush()
    for i, js in enumerate(jobs):
        s.add(Job(workflow_id=w.id, template=tpl, node=f"n{i}", state=js, queue="default", priority=0,
                  deadline=at + 60, wall_s=10, created_at=at, ended_at=None if js == "running" else at + latency))
    return w.id


def pilot(s: Session, pid: str, state: str, last_seen: float) -> None:
    s.add(Pilot(id=pid, host="h", pid=1, queues="default", state=state, started_at=last_seen, last_seen=last_seen))


def make_dirs(settings: Settings, wf_id: int, mtime: float) -> tuple[Path, Path]:
    out = settings.output_path / str(wf_id) / "n0"
    out.mkdir(parents=True)
    (out / "result.txt").write_text("x")
    logf = settings.log_path / str(wf_id) / f"{wf_id}-n0.log"
    logf.parent.mkdir(parents=True)
    logf.write_text("log")
    os.utime(logf, (mtime, mtime))
    return out.parent, logf


def table_counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m)) or 0
                for m in (FileRecord, Workflow, Job, Pilot, TemplateRecord)}


@pytest.fixture
def world(settings: Settings, engine: Engine, tmp_path: Path) -> dict[str, Any]:
    """Old ended records (to go), old running and recent ones (to stay), with their dirs and logs."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    w: dict[str, Any] = {"outside": outside}
    with Session(engine) as s, s.begin():
        t_live = template(s, "t", OLD)
        t_gone = template(s, "gone", OLD, deleted_at=OLD)  # deleted long ago, unreferenced: purged
        t_used = template(s, "used", OLD, deleted_at=OLD)  # deleted long ago, a recent workflow uses it
        t_fresh = template(s, "fresh", OLD, deleted_at=NOW - DAY)  # deleted recently: kept
        s.add(StagePriority(template="gone", node="a", priority=3, set_at=OLD))
        w["templates"] = {"live": t_live, "gone": t_gone, "used": t_used, "fresh": t_fresh}
        w["old"] = [
            workflow(s, t_live, "old1", OLD, "finished"),
            workflow(s, t_live, "old2", OLD + 1, "incomplete", jobs=("finished", "failed", "dropped")),
            workflow(s, t_gone, "old3", OLD + 2, "finished", jobs=("finished",)),
        ]
        w["running"] = workflow(s, t_live, "old-running", OLD + 3, "running", jobs=("finished", "running"))
        s.add(FileRecord(name="old-sampled", path="/data/old-sampled", stream="raw", seen_at=OLD, received_at=OLD,
                         decision="sampled_out"))
        w["recent"] = [
            workflow(s, t_live, "new1", NOW - 60, "finished"),
            workflow(s, t_used, "new2", NOW - 30, "finished", jobs=("finished",)),
        ]
        pilot(s, "old-lost", "lost", OLD)
        pilot(s, "old-stopped", "stopped", OLD)
        pilot(s, "old-idle", "idle", OLD)  # still says idle: never purged
        pilot(s, "new-stopped", "stopped", NOW - 60)
    w["old_dirs"] = [make_dirs(settings, i, OLD) for i in w["old"]]
    w["keep_dirs"] = [make_dirs(settings, i, NOW - 60) for i in [w["running"], *w["recent"]]]
    # A symlink inside an old output dir must be unlinked, never followed.
    (settings.output_path / str(w["old"][0]) / "link").symlink_to(outside)
    # An old output dir that is itself a symlink out of the root: the link goes, the target stays.
    os.symlink(outside, settings.output_path / "999999")
    # An old stray log of a recent workflow: the file goes, the directory (of a live workflow) stays.
    stray = settings.log_path / str(w["recent"][0]) / "old-retry.log"
    stray.write_text("old")
    os.utime(stray, (OLD, OLD))
    w["stray"] = stray
    # An old log of a workflow long gone from the database: file and directory go.
    orphan = settings.log_path / "424242" / "1-a.log"
    orphan.parent.mkdir()
    orphan.write_text("old")
    os.utime(orphan, (OLD, OLD))
    w["orphan"] = orphan
    return w


def test_parse_duration() -> None:
    assert parse_duration("30d") == 30 * DAY
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("90m") == 90 * 60
    assert parse_duration("3600s") == 3600
    assert parse_duration("45") == 45
    for bad in ("", "d", "30x", "-1d", "0s"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_purge_removes_only_old_ended(settings: Settings, engine: Engine, world: dict[str, Any]) -> None:
    lines: list[tuple[int, int]] = []
    counts = purge(engine, CUTOFF, settings.output_path, settings.log_path, batch_size=2,
                   progress=lambda c: lines.append((c.batches, c.jobs)))
    # 3 old ended workflows (6 jobs) and 4 old files (one sampled out, none of them the running one).
    assert (counts.files, counts.workflows, counts.jobs) == (4, 3, 6)
    assert counts.total == {"files": 4, "workflows": 3, "jobs": 6}
    assert counts.batches == 2 and lines == [(1, 5), (2, 6)]
    assert (counts.pilots, counts.templates) == (2, 1)
    assert counts.output_dirs == 3

    with Session(engine) as s:
        assert set(s.scalars(select(Workflow.id))) == {world["running"], *world["recent"]}
        assert set(s.scalars(select(FileRecord.name))) == {"old-running", "new1", "new2"}
        assert s.scalar(select(func.count()).select_from(Job)) == 2 + 2 + 1
        assert set(s.scalars(select(Pilot.id))) == {"old-idle", "new-stopped"}
        assert set(s.scalars(select(TemplateRecord.name))) == {"t", "used", "fresh"}
        assert list(s.scalars(select(StagePriority.template))) == []

    for out, logf in world["old_dirs"]:
        assert not out.exists() and not logf.exists() and not logf.parent.exists()
    for out, logf in world["keep_dirs"]:
        assert out.is_dir() and logf.is_file()
    assert (world["outside"] / "precious").read_text() == "keep me"
    assert os.path.lexists(settings.output_path / "999999")  # no workflow 999999 was purged
    assert not world["stray"].exists() and world["stray"].parent.is_dir()
    assert not world["orphan"].exists() and not world["orphan"].parent.exists()
    assert counts.log_files == 2 and counts.log_dirs == 4

    again = purge(engine, CUTOFF, settings.output_path, settings.log_path)
    assert (again.files, again.jobs, again.pilots, again.templates, again.batches) == (0, 0, 0, 0, 0)


def test_purge_does_not_follow_a_symlinked_workflow_dir(settings: Settings, engine: Engine, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "data").write_text("keep")
    with Session(engine) as s, s.begin():
        wf = workflow(s, template(s, "t", OLD), "f", OLD)
    settings.output_path.mkdir(parents=True)
    (settings.output_path / str(wf)).symlink_to(outside)
    counts = purge(engine, CUTOFF, settings.output_path, settings.log_path)
    assert counts.output_dirs == 1
    assert not os.path.lexists(settings.output_path / str(wf))
    assert (outside / "data").read_text() == "keep"


def test_dry_run_deletes_nothing(settings: Settings, engine: Engine, world: dict[str, Any]) -> None:
    before = table_counts(engine)
    dry = purge(engine, CUTOFF, settings.output_path, settings.log_path, batch_size=3, dry_run=True)
    assert table_counts(engine) == before
    for out, logf in world["old_dirs"]:
        assert out.is_dir() and logf.is_file()
    assert world["stray"].exists() and world["orphan"].exists()
    real = purge(engine, CUTOFF, settings.output_path, settings.log_path, batch_size=3)
    for key in ("files", "workflows", "jobs", "pilots", "templates", "output_dirs", "log_files", "batches"):
        assert getattr(dry, key) == getattr(real, key), key
    assert dry.dry_run and not real.dry_run


def test_percentile() -> None:
    values = [float(v) for v in range(1, 11)]
    assert status.percentile(values, 50) == pytest.approx(5.5)
    assert status.percentile(values, 95) == pytest.approx(9.55)
    assert status.percentile([3.0], 95) == 3.0
    assert status.percentile([], 50) is None


def test_status_counts_and_latency(settings: Settings, engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        ta = template(s, "a", NOW - DAY)
        tb = template(s, "b", NOW - DAY, queue="fast")
        template(s, "old", NOW - DAY, deleted_at=NOW - 10, queue="retired")
        for i in range(1, 11):  # latencies 1..10 s
            workflow(s, ta, f"a{i}", NOW - 600 - i, jobs=("finished",), latency=float(i), tpl="a")
        workflow(s, tb, "b1", NOW - 100, "incomplete", jobs=("failed",), latency=2.0, tpl="b")
        workflow(s, tb, "b2", NOW - 50, "running", jobs=("running", "pending"), tpl="b")
        workflow(s, ta, "a-old", NOW - 2 * 3600, jobs=("finished",), latency=100.0, tpl="a")  # out of the window
        s.add(FileRecord(name="x", path="/x", stream="raw", seen_at=NOW - 5, received_at=NOW - 5, decision="shed"))
        s.add(FileRecord(name="y", path="/y", stream="raw", seen_at=NOW - 5, received_at=NOW - 5,
                         decision="duplicate"))
        pilot(s, "p1", "idle", NOW)
        pilot(s, "p2", "busy", NOW)
        pilot(s, "p3", "busy", NOW)
        pilot(s, "p4", "lost", NOW - DAY)
    settings = dataclasses.replace(settings, sources=(
        SourceSettings(name="eos", kind="poll", location="/eos/x"),
        SourceSettings(name="buffer", kind="inotify", location="/buffer"),
    ))
    with Session(engine) as s:
        data = status.collect(s, settings, now=NOW)
    assert data["pilots"] == {"busy": 2, "idle": 1, "lost": 1}
    assert data["files"] == {"accepted": 12, "duplicate": 1, "shed": 1}
    assert data["jobs"] == {"failed": 1, "finished": 10, "pending": 1, "running": 1}
    latency = {row["template"]: row for row in data["latency"]}
    assert latency["a"]["workflows"] == 10
    assert latency["a"]["p50_s"] == pytest.approx(5.5)
    assert latency["a"]["p95_s"] == pytest.approx(9.55)
    assert latency["b"] == {"template": "b", "workflows": 1, "p50_s": 2.0, "p95_s": 2.0}
    # Queues of active templates and of the pilots' settings; the embedded broker says why no depth.
    assert [q["queue"] for q in data["queues"]] == ["default", "fast"]
    assert all(q["depth"] is None for q in data["queues"])
    assert "embedded" in data["queues_note"]
    assert [(r["name"], r["kind"], r["state"]) for r in data["sources"]] == [
        ("eos", "poll", "configured, no watcher reports it"), ("buffer", "inotify", "configured, no watcher reports it")]
    json.dumps(data)  # one JSON-able object
    text = status.render(data)
    for needle in ("fast", "busy 2", "shed 1", "eos", "configured", "5.500", "9.550"):
        assert needle in text, needle


def test_status_shows_the_sources_as_the_watchers_report_them(settings: Settings, engine: Engine) -> None:
    from p3s.db import WatcherSource

    with Session(engine) as s, s.begin():
        for name, active, healthy, at in (("eos", False, False, NOW - 5), ("buffer", True, True, NOW - 5),
                                          ("old", True, True, NOW - 600)):
            s.add(WatcherSource(host="daq1", name=name, watcher_id="daq1-7", kind="poll", location=f"/{name}",
                                stream="raw", fallback_for="", active=active, healthy=healthy, sent_at=at,
                                reported_at=at))
    settings = dataclasses.replace(settings, sources=(
        SourceSettings(name="eos", kind="poll"), SourceSettings(name="other")))
    with Session(engine) as s:
        rows = status.source_status(s, settings, NOW)
    states = [(r["name"], r["state"]) for r in rows]
    assert states == [("buffer", "active"), ("eos", "standby, unhealthy"), ("old", "silent for 600s (was active)"),
                      ("other", "configured, no watcher reports it")]


def test_status_without_broker_says_so(settings: Settings, engine: Engine) -> None:
    settings = dataclasses.replace(settings, broker=dataclasses.replace(settings.broker,
                                                                        url="amqp://guest:guest@127.0.0.1:1//"))
    with Session(engine) as s:
        data = status.collect(s, settings, now=NOW)
    assert data["queues"] == [{"queue": "default", "depth": None, "consumers": None, "pilots": 0}]
    assert data["queues_note"].startswith("broker unreachable")
    assert data["broker_unreachable"]


def run_p3s(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env["P3S_STATE_DIR"] = str(state)
    return subprocess.run([sys.executable, "-m", "p3s", *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_purge_status_top(settings: Settings, engine: Engine, world: dict[str, Any]) -> None:
    state = settings.state_path
    before = table_counts(engine)
    dry = run_p3s(state, "purge", "--older-than", "30d", "--dry-run", "--batch-size", "1")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 4 files, 3 workflows, 6 jobs, 2 pilots, 1 template versions" in dry.stdout
    assert dry.stderr.count("purge: ") >= 4  # a log line per batch (stderr is not a terminal here)
    assert table_counts(engine) == before

    st = run_p3s(state, "status", "--json")
    assert st.returncode == 0, st.stderr
    data = json.loads(st.stdout)
    assert data["files"] == {"accepted": 2}  # the two recent files
    assert data["pilots"] == {"idle": 1, "lost": 1, "stopped": 2}

    real = run_p3s(state, "purge", "--older-than", "30d", "--json")
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["jobs"] == 6
    assert table_counts(engine)["jobs"] == before["jobs"] - 6

    top = run_p3s(state, "top", "--interval", "0.1", "-n", "2")
    assert top.returncode == 0, top.stderr
    assert top.stdout.count("\x1b[H\x1b[2J") == 2 and "task queues:" in top.stdout

    bad = run_p3s(state, "purge", "--older-than", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_top_stops_on_ctrl_c(settings: Settings, engine: Engine) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env["P3S_STATE_DIR"] = str(settings.state_path)
    top = subprocess.Popen([sys.executable, "-m", "p3s", "top", "--interval", "0.2"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert top.stdout is not None
        assert "p3s status at" in top.stdout.readline()  # the first redraw is on screen
        top.send_signal(signal.SIGINT)
        out, err = top.communicate(timeout=20)
    finally:
        if top.poll() is None:
            top.kill()
    assert top.returncode == 0, err
    assert "Traceback" not in err
