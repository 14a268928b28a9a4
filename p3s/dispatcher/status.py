"""``p3s status`` and ``p3s top``: the whole picture on one screen.

The numbers come from the database (pilots, files, jobs, latencies), from the
broker (task queue depths) and from the configuration (watcher sources).  The
dispatcher cannot see the watcher, so which source is active is read from the
watcher's ``p3s_watcher_source_active`` metric when it can be reached.
"""

from __future__ import annotations

import logging
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

import kombu.exceptions
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from p3s.config import Settings
from p3s.db import FileRecord, Job, Pilot, TemplateRecord, Workflow
from p3s.errors import BrokerUnavailable
from p3s.states import WorkflowState
from p3s.tables import safe

log = logging.getLogger(__name__)

WINDOW_S = 3600.0
METRICS_TIMEOUT_S = 0.5
_ACTIVE_SAMPLE_RE = re.compile(r'^p3s_watcher_source_active\{[^}]*source="([^"]*)"[^}]*\}\s+(\S+)', re.MULTILINE)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly between ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def task_queue_names(session: Session, settings: Settings) -> list[str]:
    """The queues of active templates' stages and the pilots' configured queues."""
    names = set(settings.pilot.queues)
    for spec in session.scalars(select(TemplateRecord.spec).where(TemplateRecord.deleted_at.is_(None))):
        names.update(str(n.get("queue") or "default") for n in spec.get("nodes", []))
    return sorted(names)


def database_status(session: Session, now: float, window_s: float = WINDOW_S) -> dict[str, Any]:
    """Pilots by state; files, jobs and workflow latencies of the last ``window_s`` seconds."""
    since = now - window_s
    pilots = dict(session.execute(select(Pilot.state, func.count()).group_by(Pilot.state)).all())
    files = dict(
        session.execute(
            select(FileRecord.decision, func.count())
            .where(FileRecord.received_at >= since)
            .group_by(FileRecord.decision)
        ).all()
    )
    jobs = dict(
        session.execute(select(Job.state, func.count()).where(Job.created_at >= since).group_by(Job.state)).all()
    )
    by_template: dict[str, list[float]] = {}
    rows = session.execute(
        select(Workflow.template, Workflow.ended_at - Workflow.seen_at).where(
            Workflow.ended_at.is_not(None), Workflow.ended_at >= since
        )
    )
    for template, latency in rows:
        by_template.setdefault(template, []).append(max(0.0, float(latency)))
    latency = [
        {
            "template": name,
            "workflows": len(values),
            "p50_s": percentile(values, 50),
            "p95_s": percentile(values, 95),
        }
        for name, values in sorted(by_template.items())
    ]
    return {
        "window_s": window_s,
        "pilots": {str(k): int(v) for k, v in sorted(pilots.items())},
        "files": {str(k): int(v) for k, v in sorted(files.items())},
        "jobs": {str(k): int(v) for k, v in sorted(jobs.items())},
        "latency": latency,
        "on_time": on_time_status(session, since),
    }


def on_time_status(session: Session, since: float) -> list[dict[str, Any]]:
    """Per template, of the workflows that ended since ``since``: how many finished within their deadline."""
    on_time = case((and_(Workflow.state == WorkflowState.FINISHED, Workflow.ended_at <= Workflow.deadline), 1),
                   else_=0)
    rows = session.execute(
        select(Workflow.template, func.count(), func.sum(on_time))
        .where(Workflow.ended_at.is_not(None), Workflow.ended_at >= since)
        .group_by(Workflow.template)
        .order_by(Workflow.template)
    ).all()
    return [
        {"template": name, "ended": int(ended), "on_time": int(good or 0),
         "share": (int(good or 0) / int(ended)) if ended else None}
        for name, ended, good in rows
    ]


def queue_status(settings: Settings, names: Iterable[str]) -> dict[str, Any]:
    """Depth of each task queue, or a note saying why it cannot be known."""
    names = list(names)
    out: dict[str, Any] = {"note": "", "queues": [{"queue": n, "depth": None} for n in names]}
    if settings.broker.embedded:
        out["note"] = "embedded broker: queue depths are visible only inside the process running it"
        return out
    from p3s import topology
    from p3s.broker import connect, ensure_connected, queue_depth

    connection = connect(settings.broker, heartbeat=0)
    try:
        ensure_connected(connection, max_retries=0)
        for row in out["queues"]:
            row["depth"] = queue_depth(connection, topology.task_queue(row["queue"]))
    except (BrokerUnavailable, kombu.exceptions.OperationalError) as exc:
        # broker.ensure_connected lets kombu's OperationalError (a refused
        # connection, re-raised by kombu) through; both mean the same here.
        out["note"] = f"broker unreachable: {exc}"
        for row in out["queues"]:
            row["depth"] = None
    finally:
        connection.release()
    return out


def _active_sources(url: str) -> dict[str, bool] | None:
    """``p3s_watcher_source_active`` by source from a /metrics page, or None if it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:  # noqa: S310 (an operator's URL)
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.debug("status: no watcher metrics at %s: %s", url, exc)
        return None
    return {m.group(1): float(m.group(2)) > 0 for m in _ACTIVE_SAMPLE_RE.finditer(text)}


def metrics_url(settings: Settings) -> str:
    """Where a watcher on this host with these settings serves its metrics; empty if off."""
    if not settings.metrics.port:
        return ""
    return f"http://{settings.metrics.address}:{settings.metrics.port}/metrics"


def source_status(settings: Settings, watcher_metrics: str | None = None) -> list[dict[str, Any]]:
    """The configured watcher sources, each ``active``, ``standby`` or just ``configured``."""
    url = metrics_url(settings) if watcher_metrics is None else watcher_metrics
    active = _active_sources(url) if url and settings.sources else None
    rows = []
    for src in settings.sources:
        state = "configured"
        if active is not None and src.name in active:
            state = "active" if active[src.name] else "standby"
        rows.append(
            {
                "name": src.name,
                "kind": src.kind,
                "location": src.location,
                "stream": src.stream,
                # Fallback sources are newer than some configurations.
                "fallback_for": getattr(src, "fallback_for", "") or "",
                "state": state,
            }
        )
    return rows


def collect(
    session: Session, settings: Settings, now: float | None = None, watcher_metrics: str | None = None
) -> dict[str, Any]:
    """Everything ``p3s status`` shows, as one JSON-able object."""
    now = time.time() if now is None else now
    data = database_status(session, now)
    queues = queue_status(settings, task_queue_names(session, settings))
    return {
        "at": now,
        "queues": queues["queues"],
        "queues_note": queues["note"],
        **{k: data[k] for k in ("pilots", "files", "jobs", "latency", "on_time", "window_s")},
        "sources": source_status(settings, watcher_metrics),
    }


# -- text -------------------------------------------------------------------------------


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return safe(str(v))

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  " + "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return lines


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (total {sum(counts.values())})"


def render(status: dict[str, Any]) -> str:
    """The status as a screenful of text."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(status["at"]))
    minutes = status["window_s"] / 60
    lines = [f"p3s status at {when} UTC", "", "task queues:"]
    lines += _table(status["queues"], ["queue", "depth"])
    if status["queues_note"]:
        lines.append(f"  ({status['queues_note']})")
    lines += ["", f"pilots: {_counts(status['pilots'])}"]
    lines += [f"files, last {minutes:g} min: {_counts(status['files'])}"]
    lines += [f"jobs, last {minutes:g} min: {_counts(status['jobs'])}"]
    lines += ["", f"latency, file seen -> workflow done, last {minutes:g} min:"]
    lines += _table(status["latency"], ["template", "workflows", "p50_s", "p95_s"]) if status["latency"] else ["  none"]
    lines += ["", f"on time, workflows finished within their deadline of all ended, last {minutes:g} min:"]
    shares = [{**row, "share": "-" if row["share"] is None else f"{100 * row['share']:.1f}%"}
              for row in status.get("on_time", [])]
    lines += _table(shares, ["template", "ended", "on_time", "share"]) if shares else ["  none"]
    lines += ["", "watcher sources:"]
    if status["sources"]:
        lines += _table(status["sources"], ["name", "kind", "stream", "fallback_for", "state", "location"])
    else:
        lines.append("  none configured")
    return "\n".join(lines)
