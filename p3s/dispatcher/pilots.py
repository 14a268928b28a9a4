"""The pilot registry: registrations, heartbeats and goodbyes, as the dispatcher's clock sees them."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from p3s.db import Pilot
from p3s.dispatcher.context import Context
from p3s.errors import ReportRefused
from p3s.messages import PilotReport
from p3s.states import PilotState

log = logging.getLogger(__name__)


def preload(session: Session, pilot_ids: Iterable[str]) -> dict[str, Pilot]:
    """The records of ``pilot_ids`` that exist, by id, with one query: pass it to :func:`apply_pilot_report`.

    Without it each report costs two round trips in turn: ``session.get``
    flushes the previous report's change (autoflush), then selects its own
    row.  With a thousand pilots heartbeating, that is a hundred of each per
    second, paid at the database's latency.  With it, a batch of reports asks
    one query, and their updates and new pilots go out together at commit.
    """
    ids = sorted(set(pilot_ids))
    known: dict[str, Pilot] = {}
    for start in range(0, len(ids), 1000):
        known.update((p.id, p) for p in session.scalars(select(Pilot).where(Pilot.id.in_(ids[start:start + 1000]))))
    return known


def apply_pilot_report(session: Session, report: PilotReport, ctx: Context, user: str = "",
                       known: dict[str, Pilot] | None = None) -> None:
    """Create or refresh a pilot's record from its registration, heartbeat or goodbye.

    ``last_seen`` is the dispatcher's time of receipt: the reaper compares it
    with its own clock, and a worker node's clock may be off.  The pilot's own
    ``sent_at`` only orders its reports.  ``user`` is the broker account that
    sent the report (RabbitMQ's validated user_id): a pilot's reports must all
    come from the account it registered with.  ``known``: the batch's pilots
    from :func:`preload` (a pilot not in it has no record yet), kept up to date
    here.
    """
    pilot = session.get(Pilot, report.pilot_id) if known is None else known.get(report.pilot_id)
    state = PilotState.STOPPED if report.event == "stop" else PilotState(report.state)
    if pilot is None:
        pilot = Pilot(
            id=report.pilot_id,
            host=report.host,
            pid=report.pid,
            queues=",".join(report.queues),
            state=state,
            started_at=ctx.now,
            last_seen=ctx.now,
            last_sent_at=report.sent_at,
            job_id=report.job_id,
            jobs_done=report.jobs_done,
            problem=report.problem,
            user=user,
        )
        session.add(pilot)
        if known is not None:
            known[pilot.id] = pilot
        log.info("pilot %s: registered from %s pid %s, queues %s", pilot.id, report.host, report.pid, pilot.queues)
        return
    if not pilot.user:
        pilot.user = user  # recorded before accounts were, or by a deployment that does not stamp them
    elif pilot.user != user:
        raise ReportRefused(
            "account", f"pilot {pilot.id}: report from broker account {user!r}, it registered as {pilot.user!r}"
        )
    if pilot.last_sent_at is not None and report.sent_at < pilot.last_sent_at:
        return  # an older heartbeat overtaken by a newer one
    if pilot.state == PilotState.LOST:
        log.warning("pilot %s: heard from again after being declared lost", pilot.id)
    if pilot.state == PilotState.STOPPED and report.event != "stop":
        return
    if state == PilotState.BROKEN and report.problem != pilot.problem:
        log.error("pilot %s: takes no tasks: %s", pilot.id, report.problem)
    pilot.state = state
    pilot.last_seen = ctx.now
    pilot.last_sent_at = report.sent_at
    pilot.job_id = report.job_id
    pilot.jobs_done = report.jobs_done
    pilot.problem = report.problem
