"""What watchers say of their sources: the newest report of each source, kept for ``p3s status``."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from p3s.db import WatcherSource
from p3s.dispatcher.context import Context
from p3s.messages import SourcesReport

log = logging.getLogger(__name__)


def apply_sources_report(session: Session, report: SourcesReport, ctx: Context) -> None:
    """Record each source of ``report``; an older report overtaken by a newer one changes nothing.

    ``reported_at`` is the dispatcher's clock, so ``p3s status`` can tell a
    silent watcher from a live one whatever the watcher host's clock says.
    """
    for src in report.sources:
        row = session.get(WatcherSource, (report.host, src["name"]))
        if row is None:
            row = WatcherSource(host=report.host, name=src["name"])
            session.add(row)
            log.info("watcher %s: source %s reported, %s", report.watcher_id, src["name"],
                     "active" if src["active"] else "standby")
        elif row.watcher_id == report.watcher_id and report.sent_at < row.sent_at:
            continue
        elif row.active != src["active"]:
            log.info("watcher %s: source %s now %s", report.watcher_id, src["name"],
                     "active" if src["active"] else "standby")
        row.watcher_id = report.watcher_id
        row.kind = src["kind"]
        row.location = src["location"]
        row.stream = src["stream"]
        row.fallback_for = src["fallback_for"]
        row.active = src["active"]
        row.healthy = src["healthy"]
        row.sent_at = report.sent_at
        row.reported_at = ctx.now
