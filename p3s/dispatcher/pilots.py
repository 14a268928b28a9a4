"""The pilot registry: registrations, heartbeats and goodbyes, as the dispatcher's clock sees them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from p3s.db import Pilot
from p3s.dispatcher.context import Context
from p3s.errors import ReportRefused
from p3s.messages import PilotReport
from p3s.states import PilotState

log = logging.getLogger(__name__)


# What a batch needs to know of a pilot it hears from, and the statements, built once: the
# registry is the dispatcher's busiest table (a thousand pilots heartbeat a hundred times a
# second), and through ORM objects a heartbeat cost it several times the CPU (bench/RESULTS.md,
# section 8).
_PILOTS = Pilot.__table__
_KNOWN = select(_PILOTS.c.id, _PILOTS.c.user, _PILOTS.c.state, _PILOTS.c.last_sent_at, _PILOTS.c.problem).where(
    _PILOTS.c.id.in_(bindparam("ids", expanding=True))
)
_REFRESHED = ("user", "state", "last_seen", "last_sent_at", "job_id", "jobs_done", "problem")
_REFRESH = (
    update(_PILOTS)
    .where(_PILOTS.c.id == bindparam("pilot"))
    .values({name: bindparam(f"new_{name}") for name in _REFRESHED})
)


@dataclass
class Registry:
    """The pilots a batch of reports speaks of, as the batch leaves them; :func:`write` records it."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    new: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)


def preload(session: Session, pilot_ids: Iterable[str]) -> Registry:
    """The records of ``pilot_ids`` that exist, with one query: pass it to :func:`apply_pilot_report`.

    Without it each report costs two round trips in turn (the previous
    report's change, then its own row).  With a thousand pilots
    heartbeating, that is a hundred of each per second, paid at the
    database's latency.  With it, a batch of reports asks one query, and
    :func:`write` sends their updates and new pilots together.
    """
    ids = sorted(set(pilot_ids))
    registry = Registry()
    connection = session.connection()
    for start in range(0, len(ids), 1000):
        for row in connection.execute(_KNOWN, {"ids": ids[start:start + 1000]}).mappings():
            registry.rows[row["id"]] = dict(row)
    return registry


def write(session: Session, registry: Registry) -> None:
    """Record what the batch's reports changed: one statement for the new pilots, one for the others."""
    connection = session.connection()
    if registry.new:
        connection.execute(insert(_PILOTS), [registry.rows[i] for i in sorted(registry.new)])
    refreshed = sorted(registry.changed - registry.new)
    if refreshed:
        connection.execute(
            _REFRESH, [{"pilot": i, **{f"new_{n}": registry.rows[i][n] for n in _REFRESHED}} for i in refreshed]
        )
    registry.new.clear()
    registry.changed.clear()


def apply_pilot_report(session: Session, report: PilotReport, ctx: Context, user: str = "",
                       known: Registry | None = None) -> None:
    """Create or refresh a pilot's record from its registration, heartbeat or goodbye.

    ``last_seen`` is the dispatcher's time of receipt: the reaper compares it
    with its own clock, and a worker node's clock may be off.  The pilot's own
    ``sent_at`` only orders its reports.  ``user`` is the broker account that
    sent the report (RabbitMQ's validated user_id): a pilot's reports must all
    come from the account it registered with.  ``known``: the batch's pilots
    from :func:`preload`, kept up to date here and recorded by the caller
    with :func:`write`; without it, this one report is recorded at once.
    """
    registry = known if known is not None else preload(session, [report.pilot_id])
    apply_to(registry, report, ctx, user)
    if known is None:
        write(session, registry)


def apply_to(registry: Registry, report: PilotReport, ctx: Context, user: str) -> None:
    pilot = registry.rows.get(report.pilot_id)
    state = PilotState.STOPPED if report.event == "stop" else PilotState(report.state)
    if pilot is None:
        pilot = registry.rows[report.pilot_id] = {
            "id": report.pilot_id,
            "host": report.host,
            "pid": report.pid,
            "queues": ",".join(report.queues),
            "state": state,
            "started_at": ctx.now,
            "last_seen": ctx.now,
            "last_sent_at": report.sent_at,
            "job_id": report.job_id,
            "jobs_done": report.jobs_done,
            "problem": report.problem,
            "user": user,
        }
        registry.new.add(report.pilot_id)
        log.info("pilot %s: registered from %s pid %s, queues %s", report.pilot_id, report.host, report.pid,
                 pilot["queues"])
        return
    if not pilot["user"]:
        pilot["user"] = user  # recorded before accounts were, or by a deployment that does not stamp them
        registry.changed.add(report.pilot_id)
    elif pilot["user"] != user:
        raise ReportRefused(
            "account", f"pilot {report.pilot_id}: report from broker account {user!r}, "
                       f"it registered as {pilot['user']!r}"
        )
    if pilot["last_sent_at"] is not None and report.sent_at < pilot["last_sent_at"]:
        return  # an older heartbeat overtaken by a newer one
    if pilot["state"] == PilotState.LOST:
        log.warning("pilot %s: heard from again after being declared lost", report.pilot_id)
    if pilot["state"] == PilotState.STOPPED and report.event != "stop":
        return
    if state == PilotState.BROKEN and report.problem != pilot["problem"]:
        log.error("pilot %s: takes no tasks: %s", report.pilot_id, report.problem)
    registry.changed.add(report.pilot_id)
    pilot.update(state=state, last_seen=ctx.now, last_sent_at=report.sent_at, job_id=report.job_id,
                 jobs_done=report.jobs_done, problem=report.problem)
