"""The pilot registry on SQLite: a batch of many pilots' reports costs one query, whatever the pilots."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from p3s import db
from p3s.dispatcher import pilots
from p3s.dispatcher.context import Context
from p3s.messages import PilotReport
from p3s.states import PilotState
from tests.stack import make_settings


@pytest.fixture
def engine(tmp_path: Path) -> Iterator:
    """A fresh SQLite database at the current schema."""
    db.upgrade(url := f"sqlite:///{tmp_path / 'p3s.db'}")
    yield (eng := db.make_engine(url))
    eng.dispose()


def report(pilot_id: str, event_name: str = "heartbeat", sent_at: float = 1000.0, jobs_done: int = 0) -> PilotReport:
    return PilotReport(pilot_id=pilot_id, event=event_name, host="wn01", pid=1, queues=["default"],
                       state=PilotState.IDLE, sent_at=sent_at, jobs_done=jobs_done)


def apply_batch(engine, reports: list[PilotReport], ctx: Context) -> list[str]:
    """Apply ``reports`` in one transaction as the dispatcher does; the SQL statements it sent."""
    statements: list[str] = []

    def note(_conn, _cursor, statement, _params, _context, _many) -> None:
        statements.append(statement.split()[0].upper())

    event.listen(engine, "before_cursor_execute", note)
    try:
        with Session(engine) as s, s.begin():
            known = pilots.preload(s, [r.pilot_id for r in reports])
            for r in reports:
                pilots.apply_pilot_report(s, r, ctx, known=known)
            pilots.write(s, known)
    finally:
        event.remove(engine, "before_cursor_execute", note)
    return statements


def test_a_batch_of_heartbeats_selects_once_and_updates_together(engine, tmp_path: Path) -> None:
    ctx = Context(make_settings(tmp_path))
    ids = [f"pilot-{i:03d}" for i in range(50)]
    registered = apply_batch(engine, [report(p, "register") for p in ids], ctx)
    sent = apply_batch(engine, [report(p, sent_at=2000.0, jobs_done=3) for p in ids], ctx)
    # One SELECT for each batch, not one per report, and nothing flushed between reports.
    assert registered.count("SELECT") == 1 and set(registered) == {"SELECT", "INSERT"}, registered
    assert sent.count("SELECT") == 1 and set(sent) == {"SELECT", "UPDATE"}, sent
    with Session(engine) as s:
        rows = s.scalars(select(db.Pilot).order_by(db.Pilot.id)).all()
    assert [(p.id, p.last_sent_at, p.jobs_done) for p in rows] == [(p, 2000.0, 3) for p in ids]


def test_a_new_pilot_registering_and_beating_in_one_batch_is_one_record(engine, tmp_path: Path) -> None:
    ctx = Context(make_settings(tmp_path))
    apply_batch(engine, [report("fresh", "register", 1.0), report("fresh", sent_at=2.0, jobs_done=1)], ctx)
    with Session(engine) as s:
        (pilot,) = s.scalars(select(db.Pilot)).all()
    assert (pilot.id, pilot.last_sent_at, pilot.jobs_done, pilot.state) == ("fresh", 2.0, 1, PilotState.IDLE)
