"""The everyday commands on the embedded default: import, list, run, pilots, logs, status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from p3s import db
from p3s.cli import EXIT_FAILURE, EXIT_OK
from p3s.config import load_settings
from p3s.db import FileRecord, Job, Pilot, TemplateRecord, Workflow
from p3s.dispatcher import admin, status
from p3s.messages import SourcesReport, encode, parse_status
from p3s.pilot.runner import exit_reason
from tests.stack import graphml as _graphml

ROOT = Path(__file__).resolve().parents[2]


def graphml(nodes: Any, name: str = "probe", **kwargs: Any) -> str:
    """tests.stack.graphml with the graph's ``name`` attribute, so a file names its template."""
    text = _graphml(nodes, name=name, **kwargs)
    text = text.replace('<key id="trigger"', '<key id="name" for="graph" attr.name="name" attr.type="string"/>'
                        '<key id="trigger"', 1)
    head, rest = text.split('<graph id="', 1)
    ident, tail = rest.split(">", 1)
    return f'{head}<graph id="{ident}><data key="name">{name}</data>{tail}'


def env_of(state: Path, **extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    environ.update(P3S_STATE_DIR=str(state), PYTHONPATH=str(ROOT), P3S_PILOT_HEARTBEAT_S="1",
                   P3S_PILOT_WORK_ROOT=str(state.parent / "work"), **extra)
    return environ


def p3s(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p3s", *args], env=env_of(state), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def p3s_json(state: Path, *args: str) -> Any:
    done = p3s(state, *args, "--json")
    assert done.returncode == EXIT_OK, done.stderr
    return json.loads(done.stdout)


def wait_for(what: str, predicate: Any, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    db.upgrade(load_settings(None, {"P3S_STATE_DIR": str(path)}).database_url)
    return path


@pytest.fixture
def engine(state: Path) -> Any:
    engine = db.make_engine(load_settings(None, {"P3S_STATE_DIR": str(state)}).database_url)
    yield engine
    engine.dispose()


def test_dag_import_of_several_files_unchanged_and_superseded(state: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.graphml", tmp_path / "b.graphml"
    a.write_text(graphml({"x": {"command": "true"}}, name="alpha"))
    b.write_text(graphml({"y": {"command": "true"}}, name="beta"))
    first = p3s(state, "dag", "import", str(a), str(b))
    assert first.returncode == EXIT_OK, first.stderr
    assert "template alpha version 1" in first.stdout and "template beta version 1" in first.stdout

    again = p3s(state, "dag", "import", str(a), str(b))
    assert again.returncode == EXIT_OK, again.stderr
    assert again.stdout.splitlines() == [
        "template alpha version 1: unchanged, no new version",
        "template beta version 1: unchanged, no new version",
    ]
    b.write_text(graphml({"y": {"command": "false"}}, name="beta"))
    changed = p3s(state, "dag", "import", str(a), str(b))
    assert "alpha version 1: unchanged" in changed.stdout and "template beta version 2: 1 node(s)" in changed.stdout

    rows = {(r["name"], r["version"]): r["state"] for r in p3s_json(state, "dag", "list", "--all")}
    assert rows == {("alpha", 1): "active", ("beta", 1): "superseded", ("beta", 2): "active"}
    assert [(r["name"], r["version"]) for r in p3s_json(state, "dag", "list")] == [("alpha", 1), ("beta", 2)]

    # One bad file among several: nothing stored, the file named.
    bad = tmp_path / "bad.graphml"
    bad.write_text("<graphml")
    refused = p3s(state, "dag", "import", str(a), str(bad))
    assert refused.returncode == 2 and str(bad) in refused.stderr
    assert len(p3s_json(state, "dag", "list", "--all")) == 3


def test_pilots_show_a_job_as_soon_as_its_running_report_is_in(engine: Any) -> None:
    now = time.time()
    with Session(engine) as s, s.begin():
        s.add(TemplateRecord(id=1, name="t", version=1, trigger="*", budget_s=60, spec={"nodes": []}, created_at=now))
        s.add(FileRecord(id=1, name="f", path="/f", stream="raw", seen_at=now, received_at=now, decision="accepted"))
        s.add(Workflow(id=1, file_id=1, template_id=1, template="t", state="running", seen_at=now, created_at=now,
                       deadline=now + 60))
        s.add(Job(id=7, workflow_id=1, template="t", node="n", state="running", queue="default", priority=0,
                  deadline=now + 60, wall_s=10, created_at=now, pilot_id="p1", started_at=now))
        # Its last heartbeat came before it took the job.
        s.add(Pilot(id="p1", host="h", pid=1, queues="default", state="idle", started_at=now, last_seen=now))
        s.add(Pilot(id="p2", host="h", pid=2, queues="default", state="idle", started_at=now, last_seen=now - 1))
    with Session(engine) as s:
        rows = {r["id"]: (r["state"], r["job_id"]) for r in admin.list_pilots(s)}
    assert rows == {"p1": ("busy", 7), "p2": ("idle", None)}


def test_status_warns_about_a_queue_no_pilot_serves(engine: Any, state: Path) -> None:
    from p3s.dagengine import parse_graphml

    settings = load_settings(None, {"P3S_STATE_DIR": str(state)})
    with Session(engine) as s, s.begin():
        admin.import_template(s, parse_graphml(graphml({"x": {"command": "true", "queue": "fast"}}), name="quick"))
        s.add(Pilot(id="p1", host="h", pid=1, queues="default", state="idle", started_at=1, last_seen=time.time()))
    with Session(engine) as s:
        data = status.collect(s, settings)
    assert {q["queue"]: q["pilots"] for q in data["queues"]} == {"default": 1, "fast": 0}
    (warning,) = data["warnings"]
    assert "queue fast" in warning and "quick" in warning and "--queues fast" in warning
    assert "WARNING: queue fast" in status.render(data)
    with Session(engine) as s, s.begin():
        s.add(Pilot(id="p2", host="h", pid=2, queues="default,fast", state="busy", started_at=1, last_seen=1))
    with Session(engine) as s:
        assert status.collect(s, settings)["warnings"] == []


def test_a_sources_report_round_trips_and_is_kept(engine: Any) -> None:
    from p3s.dispatcher.context import Context
    from p3s.dispatcher.sources import apply_sources_report

    report = SourcesReport(watcher_id="daq1-9", host="daq1", sources=[
        {"name": "eos", "kind": "xrootd", "location": "root://x//a", "stream": "raw", "fallback_for": "",
         "active": False, "healthy": False}])
    parsed = parse_status(encode(report))
    assert parsed == report
    settings = load_settings(None, {})
    with Session(engine) as s, s.begin():
        apply_sources_report(s, parsed, Context(settings, now=100.0))
    older = SourcesReport(watcher_id="daq1-9", host="daq1", sent_at=report.sent_at - 5, sources=[
        {**report.sources[0], "active": True, "healthy": True}])
    with Session(engine) as s, s.begin():
        apply_sources_report(s, older, Context(settings, now=101.0))
    with Session(engine) as s:
        (row,) = status.source_status(s, settings, 110.0)
    assert (row["name"], row["state"], row["host"]) == ("eos", "standby, unhealthy", "daq1")


def test_logs_of_a_job_whose_log_is_not_reachable(engine: Any, state: Path) -> None:
    now = time.time()
    with Session(engine) as s, s.begin():
        s.add(TemplateRecord(id=1, name="t", version=1, trigger="*", budget_s=60, spec={"nodes": []}, created_at=now))
        s.add(FileRecord(id=1, name="f", path="/f", stream="raw", seen_at=now, received_at=now, decision="accepted"))
        s.add(Workflow(id=1, file_id=1, template_id=1, template="t", state="finished", seen_at=now, created_at=now,
                       deadline=now + 60))
        for i, st, log in ((1, "finished", "/elsewhere/logs/1/1-n.log"), (2, "queued", "")):
            s.add(Job(id=i, workflow_id=1, template="t", node="n", state=st, queue="default", priority=0,
                      deadline=now + 60, wall_s=10, created_at=now, pilot_id="p1" if i == 1 else None, log=log))
        s.add(Pilot(id="p1", host="worker7", pid=1, queues="default", state="stopped", started_at=now, last_seen=now))
    done = p3s(state, "logs", "1")
    assert done.returncode == EXIT_FAILURE
    assert "not reachable from this host" in done.stderr and "/elsewhere/logs/1/1-n.log" in done.stderr
    assert "worker7" in done.stderr and "Traceback" not in done.stderr
    queued = p3s(state, "logs", "2")
    assert queued.returncode == EXIT_FAILURE and "job 2 is queued" in queued.stderr
    missing = p3s(state, "logs", "99")
    assert missing.returncode == 2 and "no job 99" in missing.stderr


def test_a_failed_jobs_reason_names_the_exit_code() -> None:
    assert exit_reason(3) == "exit code 3"
    assert exit_reason(-9) == "killed by signal SIGKILL"


def test_run_serves_the_templates_queues_and_leaves_no_pilot_idle(state: Path, tmp_path: Path) -> None:
    """One `p3s run`: its pilot serves the template's queue, the job fails with its exit code, its log
    is readable with `p3s logs`, `p3s status` shows the watcher's own word on its source, and after
    Ctrl-C no pilot is left `idle`."""
    tpl = tmp_path / "fast.graphml"
    tpl.write_text(graphml({"say": {"command": "/bin/sh -c 'echo hello-from-the-payload; exit 3'",
                                    "queue": "fast", "wall_s": "20"}}, trigger="*.dat", name="fast"))
    assert p3s(state, "dag", "import", str(tpl)).returncode == EXIT_OK
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    run = subprocess.Popen([sys.executable, "-m", "p3s", "run", "--watch", str(incoming), "--pilots", "1"],
                           env=env_of(state), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pilots = wait_for("the pilot", lambda: p3s_json(state, "pilots"))
        assert pilots[0]["queues"].split(",") == ["default", "fast"]
        (incoming / "run1.dat").write_text("data")
        job = wait_for("the job to fail", lambda: [j for j in p3s_json(state, "jobs") if j["state"] == "failed"])[0]
        assert job["reason"] == "exit code 3" and job["exit_code"] == 3
        logs = p3s(state, "logs", str(job["id"]))
        assert logs.returncode == EXIT_OK, logs.stderr
        assert "hello-from-the-payload" in logs.stdout
        sources = wait_for("the watcher's report", lambda: [
            r for r in p3s_json(state, "status")["sources"] if r["host"]])
        assert [(r["name"], r["state"]) for r in sources] == [("watch", "active")]
    finally:
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=60)
    assert run.returncode == EXIT_OK, out
    assert "No hostname was supplied" not in out
    states = [p["state"] for p in p3s_json(state, "pilots")]
    assert states == ["stopped"], out


def test_run_queues_option_wins(state: Path, tmp_path: Path) -> None:
    tpl = tmp_path / "fast.graphml"
    tpl.write_text(graphml({"say": {"command": "true", "queue": "fast"}}, name="fast"))
    assert p3s(state, "dag", "import", str(tpl)).returncode == EXIT_OK
    run = subprocess.Popen([sys.executable, "-m", "p3s", "run", "--pilots", "1", "--queues", "slow"],
                           env=env_of(state), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pilots = wait_for("the pilot", lambda: p3s_json(state, "pilots"))
        assert pilots[0]["queues"] == "slow"
        warnings = p3s_json(state, "status")["warnings"]
        assert any("queue fast" in w for w in warnings), warnings
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=60)
