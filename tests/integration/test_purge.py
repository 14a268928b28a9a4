"""``p3s purge`` on PostgreSQL: 100 000 old jobs go in batches while the dispatcher keeps working."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from p3s.db import FileRecord, Job, TemplateRecord, Workflow
from tests.stack import Stack, env_for, graphml, make_settings, probe_command, terminal_jobs, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

DAY = 86400.0
JOBS_PER_WORKFLOW = 4
OLD_WORKFLOWS = 25_000  # 100 000 old jobs
RECENT_WORKFLOWS = 250  # 1 000 recent jobs
NEW_FILES = 20
BATCH = 5000
CHUNK = 10_000  # rows per bulk INSERT statement


def bulk_workflows(engine: Engine, prefix: str, count: int, at: float, template_id: int) -> None:
    """``count`` ended workflows of ``JOBS_PER_WORKFLOW`` jobs each, their files received at ``at``."""
    for start in range(0, count, CHUNK // JOBS_PER_WORKFLOW):
        n = min(CHUNK // JOBS_PER_WORKFLOW, count - start)
        with Session(engine) as s, s.begin():
            names = [f"{prefix}-{start + i:06d}" for i in range(n)]
            file_ids = s.scalars(
                insert(FileRecord).returning(FileRecord.id, sort_by_parameter_order=True),
                [
                    {"name": nm, "dedup_key": nm, "path": f"/data/{nm}", "stream": "raw", "seen_at": at,
                     "received_at": at, "decision": "accepted"}
                    for nm in names
                ],
            ).all()
            wf_ids = s.scalars(
                insert(Workflow).returning(Workflow.id, sort_by_parameter_order=True),
                [
                    {"file_id": fid, "template_id": template_id, "template": "probe", "state": "finished",
                     "seen_at": at, "created_at": at, "deadline": at + 60, "ended_at": at + 5}
                    for fid in file_ids
                ],
            ).all()
            s.execute(
                insert(Job),
                [
                    {"workflow_id": wid, "template": "probe", "node": f"n{k}", "state": "finished",
                     "queue": "default", "priority": 0, "deadline": at + 60, "wall_s": 30, "created_at": at,
                     "ended_at": at + 5}
                    for wid in wf_ids
                    for k in range(JOBS_PER_WORKFLOW)
                ],
            )


def counts(engine: Engine, prefix: str) -> dict[str, int]:
    like = FileRecord.name.like(f"{prefix}-%")
    with Session(engine) as s:
        return {
            "files": s.scalar(select(func.count()).select_from(FileRecord).where(like)) or 0,
            "workflows": s.scalar(select(func.count(Workflow.id)).join(FileRecord).where(like)) or 0,
            "jobs": s.scalar(
                select(func.count(Job.id)).join(Workflow, Job.workflow_id == Workflow.id).join(FileRecord).where(like)
            )
            or 0,
        }


def test_purge_in_batches_while_dispatcher_works(tmp_path: Path, broker_url: str, database_url: str) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = make_settings(tmp_path, broker_url, database_url)
    stack = Stack(settings, watch=watch, pilots=1)
    purge: subprocess.Popen[str] | None = None
    try:
        stack.import_template(graphml({"probe": {"command": probe_command("{input}")}}))
        tid = stack.query(lambda s: s.scalar(select(TemplateRecord.id)))
        t0 = time.monotonic()
        now = time.time()
        bulk_workflows(stack.engine, "old", OLD_WORKFLOWS, now - 40 * DAY, tid)
        bulk_workflows(stack.engine, "recent", RECENT_WORKFLOWS, now - 3600, tid)
        insert_s = time.monotonic() - t0
        assert counts(stack.engine, "old") == {"files": 25_000, "workflows": 25_000, "jobs": 100_000}
        assert counts(stack.engine, "recent")["jobs"] == 1_000

        stack.start()
        wait_for(lambda: stack.pilots(), what="the pilot to register")

        env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
        env.update(env_for(settings))
        purge_start = time.time()
        purge = subprocess.Popen(
            [sys.executable, "-m", "p3s", "purge", "--older-than", "30d", "--batch-size", str(BATCH)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        progress: list[tuple[float, str]] = []
        stderr: list[str] = []

        def read_stderr() -> None:
            assert purge.stderr is not None
            for line in purge.stderr:
                stderr.append(line)
                if "purge: " in line and " batch " in line:
                    progress.append((time.time(), line))

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        # New files arrive while the purge runs: the first once it has begun deleting.
        wait_for(lambda: progress or purge.poll() is not None, timeout=60, what="the purge's first batch")
        written_during = 0
        for i in range(NEW_FILES):
            (watch / f"new-{i:03d}.dat").write_bytes(b"x")
            written_during += purge.poll() is None
            time.sleep(0.1)
        # Not communicate(): it would read stderr too, taking lines from the reader thread.
        assert purge.stdout is not None
        out = purge.stdout.read()
        purge.wait(timeout=120)
        reader.join(10)
        purge_end = time.time()
        assert purge.returncode == 0, "".join(stderr)

        jobs = wait_for(lambda: terminal_jobs(stack, 1_000 + NEW_FILES), timeout=60, what="the new files' jobs to end")
        new_jobs = [j for j in jobs if Path(j["file"]).name.startswith("new-")]
        assert len(new_jobs) == NEW_FILES
        assert {j["state"] for j in new_jobs} == {"finished"}

        # Only the old are gone: exactly the 100 000 old jobs; the 1 000 recent and the new ones stay.
        assert counts(stack.engine, "old") == {"files": 0, "workflows": 0, "jobs": 0}
        assert counts(stack.engine, "recent") == {"files": 250, "workflows": 250, "jobs": 1_000}
        assert counts(stack.engine, "new") == {"files": NEW_FILES, "workflows": NEW_FILES, "jobs": NEW_FILES}
        summary = re.search(r"deleted (\d+) files, (\d+) workflows, (\d+) jobs", out)
        assert summary and summary.groups() == ("25000", "25000", "100000"), out

        # In batches: one progress line per batch of 5 000 files, counting up to the total.
        assert len(progress) == OLD_WORKFLOWS // BATCH, "".join(stderr)
        assert "100000/100000 jobs" in progress[-1][1]

        # The dispatcher was not blocked: files written while the purge ran were recorded,
        # and workflows finished, before it ended.
        assert written_during >= 1, "the purge ended before any new file was written"
        with Session(stack.engine) as s:
            new = s.execute(
                select(FileRecord.received_at, Workflow.created_at, Workflow.seen_at, Workflow.ended_at)
                .join(Workflow, Workflow.file_id == FileRecord.id)
                .where(FileRecord.name.like("new-%"))
            ).all()
        assert sum(1 for received, *_ in new if received < purge_end) >= 1
        assert sum(1 for *_, ended in new if ended is not None and ended < purge_end) >= 1
        assert max(created - seen for _, created, seen, _ in new) < 10.0
        report: dict[str, Any] = {
            "insert_s": round(insert_s, 1),
            "purge_s": round(purge_end - purge_start, 1),
            "recorded_during_purge": sum(1 for received, *_ in new if received < purge_end),
            "ended_during_purge": sum(1 for *_, ended in new if ended is not None and ended < purge_end),
        }
        print(report)
        assert stack.audit().ok

        # p3s status on the real servers: a depth for each task queue, the last hour's numbers.
        status = subprocess.run([sys.executable, "-m", "p3s", "status", "--json"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["queues"] == [{"queue": "default", "depth": 0, "consumers": 1, "pilots": 1}]
        assert data["queues_note"] == ""
        assert data["jobs"] == {"finished": NEW_FILES}  # the recent ones were created an hour ago
        assert data["files"] == {"accepted": NEW_FILES}
        assert [row["template"] for row in data["latency"]] == ["probe"]
        assert data["latency"][0]["workflows"] == NEW_FILES
    finally:
        if purge is not None and purge.poll() is None:
            purge.kill()
            purge.wait(10)
        stack.stop()
