"""The embedded default's sqlite3 listings give exactly what the SQLAlchemy listings give, or step aside."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from p3s import db, listings
from p3s.config import load_settings
from p3s.dagengine import parse_graphml
from p3s.db import FileRecord, Job, Workflow
from p3s.demo import DEMO_TEMPLATE
from p3s.dispatcher import admin
from p3s.errors import DatabaseUnavailable


def url_of(state: Path) -> str:
    return load_settings(None, {"P3S_STATE_DIR": str(state)}).database_url


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database with every shape a listing shows: NULLs, booleans, states, versions, a deleted template."""
    url = url_of(tmp_path_factory.mktemp("listings") / "state")
    db.upgrade(url)
    engine = db.make_engine(url)
    now = time.time()
    states = ["queued", "running", "finished", "failed", "expired", "dropped", "lost"]
    with Session(engine) as s, s.begin():
        first = admin.import_template(s, parse_graphml(DEMO_TEMPLATE, name="demo"))
        tpl = admin.import_template(s, parse_graphml(DEMO_TEMPLATE.replace("checksum", "sum2"), name="demo"))
        gone = admin.import_template(s, parse_graphml(DEMO_TEMPLATE, name="gone"))
        for i in range(40):
            f = FileRecord(name=f"<b>run{i}</b>.raw", path=f"/data/r{i}.raw", stream="raw", seen_at=now - i,
                           received_at=now - i, decision="accepted" if i % 3 else "sampled_out",
                           by_hand=i % 5 == 0, forced=i % 7 == 0, reason="" if i % 3 else "fraction 0.1")
            s.add(f)
            s.flush()
            for k in range(i % 3):  # files with no, one and two workflows
                ended = now - i + 2 if i % 2 else None
                w = Workflow(file_id=f.id, template_id=(tpl if k else first).id, template="demo",
                             state="finished" if ended else "running", seen_at=now - i, created_at=now - i,
                             deadline=now - i + 60, ended_at=ended)
                s.add(w)
                s.flush()
                state = states[(i + k) % len(states)]
                started = now - i + 0.1 if state != "queued" else None
                s.add(Job(workflow_id=w.id, template="demo", node="checksum", state=state, queue="default",
                          priority=i % 10, deadline=now - i + 60, wall_s=30, created_at=now - i,
                          started_at=started, ended_at=None if state in ("queued", "running") else now - i + 1,
                          exit_code=None if state != "failed" else 3, reason="" if state != "failed" else "exit code 3",
                          pilot_id=None if started is None else f"pilot-{i % 4}"))
        admin.delete_template(s, gone.name)
    engine.dispose()
    return url


def orm(url: str, name: str, **filters: Any) -> list[dict[str, Any]]:
    engine = db.make_engine(url)
    try:
        with Session(engine) as s:
            return getattr(admin, f"list_{name}")(s, **filters)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("name", "filters"),
    [
        ("files", {"limit": 100}),
        ("files", {"limit": 7}),
        ("files", {"limit": -1}),
        ("workflows", {"limit": 100, "state": None}),
        ("workflows", {"limit": 5, "state": "finished"}),
        ("workflows", {"limit": 100, "state": "running"}),
        ("jobs", {"limit": 100, "state": None, "workflow_id": None}),
        ("jobs", {"limit": 100, "state": "failed", "workflow_id": None}),
        ("jobs", {"limit": 3, "state": None, "workflow_id": 2}),
        ("jobs", {"limit": 100, "state": "bogus", "workflow_id": None}),
        ("templates", {"include_deleted": False}),
        ("templates", {"include_deleted": True}),
    ],
)
def test_the_same_rows_as_the_orm(history: str, name: str, filters: dict[str, Any]) -> None:
    fast = listings.read(history, name, **filters)
    assert fast is not None
    assert fast == orm(history, name, **filters)
    # Same values and same types: the JSON output is the same text.
    assert [{k: type(v) for k, v in row.items()} for row in fast] == [
        {k: type(v) for k, v in row.items()} for row in orm(history, name, **filters)
    ]


def test_the_fixture_covers_what_it_claims(history: str) -> None:
    """A comparison over rows without NULLs or booleans would prove little."""
    files = orm(history, "files", limit=-1)
    assert {f["by_hand"] for f in files} == {True, False} and {f["workflows"] for f in files} == {0, 1, 2}
    jobs = orm(history, "jobs", limit=-1)
    assert any(j["latency_s"] is None for j in jobs) and any(j["latency_s"] is not None for j in jobs)
    assert {t["state"] for t in orm(history, "templates", include_deleted=True)} == {"active", "superseded", "deleted"}


def test_other_databases_and_unknown_filters_take_the_general_path(history: str) -> None:
    assert listings.read("postgresql://localhost/test", "jobs", limit=10) is None
    assert listings.read("sqlite://", "jobs", limit=10) is None
    assert listings.read(history + "?timeout=5", "jobs", limit=10) is None
    assert listings.read(history, "pilots", limit=10) is None
    assert listings.read(history, "jobs", limit=10, template="demo") is None
    # A filter given as None is no filter: the fast path still serves it.
    assert listings.read(history, "jobs", limit=10, template=None) == orm(history, "jobs", limit=10)


def test_a_missing_file_is_not_created(tmp_path: Path) -> None:
    url = url_of(tmp_path / "nowhere")
    with pytest.raises(DatabaseUnavailable, match="does not exist yet: run p3s db upgrade"):
        listings.read(url, "jobs", limit=10)
    assert not (tmp_path / "nowhere").exists()


def test_an_empty_or_outdated_schema_says_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "p3s.db"
    sqlite3.connect(path).close()
    url = f"sqlite:///{path}"
    with pytest.raises(DatabaseUnavailable, match="has no p3s schema: run p3s db upgrade"):
        listings.read(url, "files", limit=10)
    db.upgrade(url, "0002")
    with pytest.raises(DatabaseUnavailable, match="is at schema revision 0002, this p3s needs .*run p3s db upgrade"):
        listings.read(url, "files", limit=10)


def test_reading_changes_nothing(history: str) -> None:
    path = listings.sqlite_file(history)
    assert path is not None
    before = path.stat().st_mtime_ns, path.read_bytes()
    listings.read(history, "jobs", limit=100)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
