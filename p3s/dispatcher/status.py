"""``p3s status`` and ``p3s top``: the whole picture on one screen.

The numbers come from the database (pilots, files, jobs, latencies, and what
each watcher last reported of its sources) and from the broker (task queue
depths and consumers).  A queue that an active template uses and that no
pilot serves is called out: its tasks would wait until they expire.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import kombu.exceptions
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from p3s.config import Settings
from p3s.db import FileRecord, Job, Pilot, Workflow, WatcherSource
from p3s.errors import BrokerUnavailable
from p3s.states import WorkflowState
from p3s.tables import safe

log = logging.getLogger(__name__)

WINDOW_S = 3600.0
# A watcher reports its sources every 15 s (p3s/watcher/report.py): silent for this long, it is not believed.
SOURCES_STALE_S = 60.0


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
    from p3s.dispatcher.admin import template_queues

    return sorted(set(settings.pilot.queues) | set(template_queues(session)))


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
    """Depth and consumers of each task queue, or a note saying why they cannot be known."""
    names = list(names)
    out: dict[str, Any] = {
        "note": "",
        "unreachable": False,
        "queues": [{"queue": n, "depth": None, "consumers": None} for n in names],
    }
    if settings.broker.embedded:
        out["note"] = "embedded broker: queue depths are visible only inside the process running it"
        return out
    from p3s import topology
    from p3s.broker import connect, ensure_connected, queue_counts

    connection = connect(settings.broker, heartbeat=0)
    try:
        ensure_connected(connection, max_retries=0)
        for row in out["queues"]:
            row["depth"], row["consumers"] = queue_counts(connection, topology.task_queue(row["queue"]))
    except (BrokerUnavailable, kombu.exceptions.OperationalError) as exc:
        # broker.ensure_connected lets kombu's OperationalError (a refused
        # connection, re-raised by kombu) through; both mean the same here.
        out["note"] = f"broker unreachable: {exc}"
        out["unreachable"] = True
        for row in out["queues"]:
            row["depth"] = row["consumers"] = None
    finally:
        connection.release()
    return out


def queue_warnings(
    session: Session, queues: list[dict[str, Any]], used: dict[str, list[str]]
) -> list[str]:
    """Queues an active template uses that no pilot serves, each said in a line.

    Pilots are counted from the broker's consumers where the broker answers,
    else from the records of live pilots.
    """
    live: dict[str, int] = {}
    for names, state in session.execute(select(Pilot.queues, Pilot.state)):
        if state in ("stopped", "lost"):
            continue
        for name in (names or "").split(","):
            if name:
                live[name] = live.get(name, 0) + 1
    out = []
    for row in queues:
        row["pilots"] = live.get(row["queue"], 0)
        templates = used.get(row["queue"])
        if not templates:
            continue
        served = row["consumers"] if row["consumers"] is not None else row["pilots"]
        if not served:
            out.append(
                f"queue {row['queue']} is used by template(s) {', '.join(templates)} but no pilot serves it: "
                f"its tasks wait until they expire (start pilots with --queues {row['queue']})"
            )
    return out


def source_status(session: Session, settings: Settings, now: float) -> list[dict[str, Any]]:
    """Each source as its watcher last reported it (active or standby, healthy or not, or silent),
    then the configured sources no watcher reported."""
    rows = []
    reported = set()
    for r in session.scalars(select(WatcherSource).order_by(WatcherSource.host, WatcherSource.name)):
        reported.add(r.name)
        age = max(0.0, now - r.reported_at)
        if age > SOURCES_STALE_S:
            state = f"silent for {age:.0f}s (was {'active' if r.active else 'standby'})"
        else:
            state = ("active" if r.active else "standby") + ("" if r.healthy else ", unhealthy")
        rows.append(
            {
                "name": r.name,
                "kind": r.kind,
                "location": r.location,
                "stream": r.stream,
                "fallback_for": r.fallback_for,
                "state": state,
                "host": r.host,
                "reported_s_ago": age,
            }
        )
    for src in settings.sources:
        if src.name in reported:
            continue
        rows.append(
            {
                "name": src.name,
                "kind": src.kind,
                "location": src.location,
                "stream": src.stream,
                "fallback_for": src.fallback_for,
                "state": "configured, no watcher reports it",
                "host": None,
                "reported_s_ago": None,
            }
        )
    return rows


def collect(
    session: Session,
    settings: Settings,
    now: float | None = None,
    watcher_metrics: str | None = None,
    ask_broker: bool = True,
) -> dict[str, Any]:
    """Everything ``p3s status`` shows, as one JSON-able object.

    ``watcher_metrics`` is ignored: the sources come from what the watchers report.
    ``ask_broker`` false leaves the queue depths and consumers unknown, saying so.
    """
    from p3s.dispatcher.admin import template_queues

    now = time.time() if now is None else now
    data = database_status(session, now)
    used = template_queues(session)
    names = sorted(set(settings.pilot.queues) | set(used))
    if ask_broker:
        queues = queue_status(settings, names)
    else:
        queues = {"note": "the broker was not asked", "unreachable": False,
                  "queues": [{"queue": n, "depth": None, "consumers": None} for n in names]}
    return {
        "at": now,
        "queues": queues["queues"],
        "queues_note": queues["note"],
        "broker_unreachable": queues["unreachable"],
        "warnings": queue_warnings(session, queues["queues"], used),
        **{k: data[k] for k in ("pilots", "files", "jobs", "latency", "on_time", "window_s")},
        "sources": source_status(session, settings, now),
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
    lines += _table(status["queues"], ["queue", "depth", "consumers", "pilots"])
    if status["queues_note"]:
        lines.append(f"  ({status['queues_note']})")
    lines += [f"  WARNING: {w}" for w in status.get("warnings", [])]
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
        lines += _table(status["sources"], ["name", "kind", "stream", "fallback_for", "state", "host", "location"])
    else:
        lines.append("  none reported or configured")
    return "\n".join(lines)
