"""What the web pages read: the CLI's listings (:mod:`p3s.dispatcher.admin`, :mod:`p3s.dispatcher.status`)
and the few figures only the overview shows.

Every query is bounded by a time window on an indexed column or by a LIMIT,
so a page costs the same on a year of history as on an hour of it: nothing
here counts a whole table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from p3s.config import Settings
from p3s.db import FileRecord, Job, Pilot, TemplateRecord, Workflow
from p3s.dispatcher import admin, status
from p3s.errors import NotFound
from p3s.states import Decision, JobState, PilotState

# The arrivals panel: files received in each of these last windows.
WINDOWS = (("1m", 60.0), ("10m", 600.0), ("1h", 3600.0), ("24h", 86400.0))
HOUR = 3600.0
# Rows read for the percentiles and the plot at most: the newest of the window.
SAMPLE_LIMIT = 20_000
FAILURES_LIMIT = 20
FAILED_STATES = (JobState.FAILED, JobState.TIMEOUT, JobState.EXPIRED, JobState.LOST)
# The latency plot: this many hours back, in buckets of this many seconds.
PLOT_HOURS = 3
PLOT_BUCKET_S = 300.0
LOG_TAIL_BYTES = 64 * 1024
LIVE_PILOTS = (PilotState.IDLE, PilotState.BUSY, PilotState.BROKEN, PilotState.DRAINING)


def arrivals(session: Session, now: float) -> dict[str, dict[str, int]]:
    """Files received in the last 1 min, 10 min, 1 h and 24 h, by decision (every decision listed)."""
    columns = [func.sum(case((FileRecord.received_at >= now - span, 1), else_=0)) for _, span in WINDOWS]
    rows = session.execute(
        select(FileRecord.decision, *columns)
        .where(FileRecord.received_at >= now - WINDOWS[-1][1])
        .group_by(FileRecord.decision)
    ).all()
    out = {name: {d.value: 0 for d in Decision} for name, _ in WINDOWS}
    for decision, *counts in rows:
        for (name, _), count in zip(WINDOWS, counts, strict=True):
            out[name][str(decision)] = int(count or 0)
    return out


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50_s": status.percentile(values, 50),
        "p95_s": status.percentile(values, 95),
        "max_s": max(values) if values else None,
    }


def hops(session: Session, now: float) -> list[dict[str, Any]]:
    """Latency percentiles per hop over the last hour (jobs and workflows made in it, newest first)."""
    since = now - HOUR
    seen_dispatched: list[float] = []
    seen_complete: list[float] = []
    for seen, created, ended in session.execute(
        select(Workflow.seen_at, Workflow.created_at, Workflow.ended_at)
        .where(Workflow.created_at >= since)
        .order_by(Workflow.created_at.desc())
        .limit(SAMPLE_LIMIT)
    ):
        seen_dispatched.append(max(0.0, created - seen))
        if ended is not None:
            seen_complete.append(max(0.0, ended - seen))
    seen_started: list[float] = []
    queued_started: list[float] = []
    started_ended: list[float] = []
    for seen, queued, started, ended in session.execute(
        select(Workflow.seen_at, Job.queued_at, Job.started_at, Job.ended_at)
        .join(Workflow, Job.workflow_id == Workflow.id)
        # A job is made with its workflow, both stamped with the same time: bounding the workflows
        # too lets PostgreSQL join two index ranges instead of reading every workflow.
        .where(Job.created_at >= since, Workflow.created_at >= since, Job.started_at.is_not(None))
        .order_by(Job.created_at.desc())
        .limit(SAMPLE_LIMIT)
    ):
        seen_started.append(max(0.0, started - seen))
        if queued is not None:
            queued_started.append(max(0.0, started - queued))
        if ended is not None:
            started_ended.append(max(0.0, ended - started))
    return [
        {"hop": "seen_to_dispatched", **_summary(seen_dispatched)},
        {"hop": "queued_to_started", **_summary(queued_started)},
        {"hop": "seen_to_started", **_summary(seen_started)},
        {"hop": "started_to_ended", **_summary(started_ended)},
        {"hop": "seen_to_complete", **_summary(seen_complete)},
    ]


def verdict(ok: bool, warn: bool) -> str:
    return "OK" if ok else ("WARN" if warn else "FAIL")


def pilots_check(session: Session, now: float, nominal: int) -> list[dict[str, Any]]:
    """Alive, busy and lost-in-the-last-hour pilots, each judged OK, WARN or FAIL against ``nominal``.

    alive: OK at the nominal count (any, if none is set), WARN from half of it, FAIL below.
    busy: OK while an alive pilot is free, WARN when every one is busy, FAIL with none alive.
    lost: OK with none, WARN while fewer than half the reference count, FAIL from there.
    """
    alive = busy = 0
    for state, count in session.execute(
        select(Pilot.state, func.count()).where(Pilot.state.in_(LIVE_PILOTS)).group_by(Pilot.state)
    ):
        alive += int(count)
        if state == PilotState.BUSY:
            busy = int(count)
    # A pilot whose running report came before its heartbeat is busy already (as p3s pilots shows it).
    running = session.scalar(
        select(func.count(func.distinct(Job.pilot_id)))
        .join(Pilot, Pilot.id == Job.pilot_id)
        .where(Job.state == JobState.RUNNING, Pilot.state.in_(LIVE_PILOTS))
    )
    busy = min(alive, max(busy, int(running or 0)))
    lost = int(
        session.scalar(
            select(func.count()).select_from(Pilot).where(Pilot.state == PilotState.LOST, Pilot.last_seen >= now - HOUR)
        )
        or 0
    )
    reference = nominal or alive
    return [
        {"check": "alive", "value": alive, "nominal": nominal or None,
         "verdict": verdict(alive >= max(nominal, 1), alive >= max((nominal + 1) // 2, 1))},
        {"check": "busy", "value": busy, "nominal": alive, "verdict": verdict(busy < alive, alive > 0)},
        {"check": "lost", "value": lost, "nominal": 0,
         "verdict": verdict(lost == 0, lost < max(2, (reference + 1) // 2))},
    ]


def failures(session: Session, now: float, limit: int = FAILURES_LIMIT) -> list[dict[str, Any]]:
    """The newest jobs of the last day that failed, timed out, expired or were lost, with their reasons."""
    rows = session.execute(
        select(Job.id, Job.workflow_id, Job.template, Job.node, Job.state, Job.exit_code, Job.reason,
               Job.pilot_id, Job.ended_at)
        .where(Job.created_at >= now - 24 * HOUR, Job.state.in_(FAILED_STATES))
        # Newest by the time made, which PostgreSQL reads backwards from ix_jobs_created_at and stops at
        # the limit; by id it read the whole day's jobs, expecting the failures spread over the table.
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
    ).all()
    return [
        {"id": r.id, "workflow_id": r.workflow_id, "template": r.template, "node": r.node, "state": r.state,
         "exit_code": r.exit_code, "reason": r.reason, "pilot_id": r.pilot_id, "ended_at": r.ended_at}
        for r in rows
    ]


def latency_series(session: Session, now: float) -> dict[str, Any]:
    """The latency plot's data: per bucket of the last hours, the median file seen → job started
    and file seen → workflow complete."""
    t0 = now - PLOT_HOURS * HOUR
    nbuckets = int(PLOT_HOURS * HOUR / PLOT_BUCKET_S)

    def bucketed(rows: Any) -> list[list[float]]:
        buckets: list[list[float]] = [[] for _ in range(nbuckets)]
        for at, latency in rows:
            index = int((at - t0) // PLOT_BUCKET_S)
            if 0 <= index < nbuckets and latency is not None:
                buckets[index].append(max(0.0, float(latency)))
        return buckets

    started = bucketed(session.execute(
        select(Job.started_at, Job.started_at - Workflow.seen_at)
        .join(Workflow, Job.workflow_id == Workflow.id)
        .where(Job.created_at >= t0, Workflow.created_at >= t0, Job.started_at.is_not(None))  # as in hops()
        .order_by(Job.created_at.desc())
        .limit(SAMPLE_LIMIT)
    ))
    complete = bucketed(session.execute(
        select(Workflow.ended_at, Workflow.ended_at - Workflow.seen_at)
        .where(Workflow.created_at >= t0, Workflow.ended_at.is_not(None))
        .order_by(Workflow.created_at.desc())
        .limit(SAMPLE_LIMIT)
    ))

    def line(buckets: list[list[float]]) -> list[list[float]]:
        return [[t0 + (i + 0.5) * PLOT_BUCKET_S, status.percentile(b, 50) or 0.0]
                for i, b in enumerate(buckets) if b]

    return {"from": t0, "to": now, "bucket_s": PLOT_BUCKET_S,
            "seen_to_started": line(started), "seen_to_complete": line(complete)}


def overview(session: Session, settings: Settings, now: float, ask_broker: bool = True) -> dict[str, Any]:
    """Everything the overview shows, as one JSON-able object (``status`` is ``p3s status --json``)."""
    data = status.collect(session, settings, now, ask_broker=ask_broker)
    return {
        "at": now,
        "arrivals": arrivals(session, now),
        "on_time": data["on_time"],
        "hops": hops(session, now),
        "pilots_check": pilots_check(session, now, settings.web.nominal_pilots),
        "queues": data["queues"],
        "queues_note": data["queues_note"],
        "broker_unreachable": data["broker_unreachable"],
        "failures": failures(session, now),
        "latency_plot": latency_series(session, now),
        "status": data,
    }


class Cached:
    """A value computed at most once per ``max_age_s`` and shared by every caller.

    One caller computes while the others wait for its result, so fifty clients
    arriving together cost one computation, not fifty.
    """

    def __init__(self, compute: Callable[[], Any], max_age_s: float) -> None:
        self._compute = compute
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._value: Any = None
        self._at = -float("inf")

    def get(self, compute: Callable[[], Any] | None = None) -> Any:
        """The shared value, computed by ``compute`` (default: the constructor's) if it is older than
        ``max_age_s``."""
        if self.fresh:
            return self._value
        with self._lock:
            if not self.fresh:
                self._value = (compute or self._compute)()
                self._at = time.monotonic()
            return self._value

    def expire(self) -> None:
        """Compute again at the next :meth:`get`."""
        self._at = -float("inf")

    @property
    def fresh(self) -> bool:
        """Computed less than ``max_age_s`` ago."""
        return time.monotonic() - self._at < self._max_age_s


class Shared:
    """Values by key, each a :class:`Cached` of ``max_age_s``: the answers to the same request shared.

    At most ``max_entries`` keys are kept; past that the stale ones are
    dropped, and if every one is fresh, all of them (a flood of distinct
    queries costs what it would without this, never memory without bound).
    ``max_age_s`` 0 shares nothing.
    """

    def __init__(self, max_age_s: float, max_entries: int = 256) -> None:
        self.max_age_s = max_age_s
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[Any, Cached] = {}

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        if self.max_age_s <= 0:
            return compute()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if len(self._entries) >= self._max_entries:
                    self._entries = {k: e for k, e in self._entries.items() if e.fresh}
                    if len(self._entries) >= self._max_entries:
                        self._entries.clear()
                entry = self._entries[key] = Cached(compute, self.max_age_s)
        return entry.get(compute)

    def clear(self) -> None:
        """Forget every value (after an operator's action, so that its effect shows at once)."""
        with self._lock:
            self._entries.clear()


# -- one workflow, one job, templates ---------------------------------------------------


def workflow(session: Session, workflow_id: int) -> dict[str, Any]:
    """``p3s workflows --json``'s row of one workflow, with its jobs (``p3s jobs --workflow ID --json``)."""
    rows = admin.list_workflows(session, limit=1, workflow_id=workflow_id)
    if not rows:
        raise NotFound(f"no workflow {workflow_id}")
    jobs = admin.list_jobs(session, limit=100_000, workflow_id=workflow_id)
    return {**rows[0], "jobs": jobs}


def workflow_template(session: Session, workflow_id: int) -> Any:
    """The template snapshot a workflow was made from (a :class:`p3s.dagengine.Template`)."""
    from p3s.dagengine import Template

    spec = session.scalar(
        select(TemplateRecord.spec).join(Workflow, Workflow.template_id == TemplateRecord.id)
        .where(Workflow.id == workflow_id)
    )
    if spec is None:
        raise NotFound(f"no workflow {workflow_id}")
    return Template.from_dict(spec)


def read_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> tuple[str, bool]:
    """The last ``limit`` bytes of a file as text (undecodable bytes replaced), and whether it was cut."""
    with path.open("rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - limit))
        data = fh.read(limit)
    return data.decode("utf-8", "replace"), size > limit


def log_tail(session: Session, settings: Settings, job_id: int) -> dict[str, Any]:
    """The tail of a job's log, found where ``p3s logs`` looks for it, or why there is none."""
    info = admin.job_log_info(session, job_id)
    # Only files under the log root: the recorded path comes from a pilot's report, and a page anybody may
    # open must not show whatever file it names (this service's own secrets, say).
    root = settings.log_path.resolve()
    candidates = [c for c in admin.log_candidates(info, settings.log_path) if c.resolve().is_relative_to(root)]
    for path in candidates:
        try:
            text, cut = read_tail(path)
        except OSError:
            continue
        return {"path": str(path), "text": text, "truncated": cut, "note": ""}
    if info["state"] in (JobState.PENDING, JobState.QUEUED) or not info["log"] and info["state"] in (
        JobState.EXPIRED, JobState.DROPPED
    ):
        note = f"job {job_id} is {info['state']}: it never ran, so it has no log"
    else:
        note = (f"the log is not reachable from this host (tried {', '.join(str(c) for c in candidates)}); "
                f"read it on the pilot's host {info['host'] or '?'}")
    return {"path": None, "text": "", "truncated": False, "note": note}


def job(session: Session, settings: Settings, job_id: int) -> dict[str, Any]:
    """``p3s jobs --json``'s row of one job, with its argv, its environment's names, timestamps and log tail."""
    from p3s.dagengine.placeholders import expand
    from p3s.dispatcher.context import Context

    rows = admin.list_jobs(session, limit=1, job_id=job_id)
    if not rows:
        raise NotFound(f"no job {job_id}")
    row = rows[0]
    record = session.get(Job, job_id)
    assert record is not None
    tpl = workflow_template(session, row["workflow_id"])
    node = tpl.node(row["node"])
    file = session.scalar(
        select(FileRecord).join(Workflow, Workflow.file_id == FileRecord.id).where(Workflow.id == row["workflow_id"])
    )
    ctx = Context(settings)
    values = {
        "input": file.path if file else "",
        "input_name": file.name if file else "",
        "job_id": str(job_id),
        "workflow_id": str(row["workflow_id"]),
        "outdir": ctx.outdir(row["workflow_id"], node.name),
        "parent_outdirs": [ctx.outdir(row["workflow_id"], p) for p in tpl.parents(node.name)],
    }
    return {
        **row,
        "argv": expand(node.argv, values),
        # Names only: a value may be a secret.
        "env": sorted(node.env),
        "wall_s": record.wall_s,
        "created_at": record.created_at,
        "published_at": record.published_at,
        "log_tail": log_tail(session, settings, job_id),
    }


def pilot_rows(session: Session, now: float, limit: int = 100) -> list[dict[str, Any]]:
    """``p3s pilots --json`` rows, each with the seconds since it was last heard from."""
    return [{**p, "last_seen_s_ago": max(0.0, now - p["last_seen"])} for p in admin.list_pilots(session, limit)]


def template_detail(session: Session, name: str) -> dict[str, Any]:
    """A template's versions (``p3s dag list --all`` rows of it), its newest spec, its stages' priorities."""
    from p3s.dagengine import Template

    record = admin.find_template(session, name)
    versions = [r for r in admin.list_templates(session, include_deleted=True) if r["name"] == name]
    priorities = [p for p in admin.list_priorities(session) if p["template"] == name]
    return {"name": name, "versions": versions, "template": Template.from_dict(record.spec),
            "priorities": priorities, "deleted": record.deleted_at is not None}


def sampling(session: Session, settings: Settings, now: float) -> dict[str, Any]:
    """Per stream: the configured fraction and, over the last hour, the share of files accepted."""
    rows = session.execute(
        select(FileRecord.stream, FileRecord.decision, func.count())
        .where(FileRecord.received_at >= now - HOUR)
        .group_by(FileRecord.stream, FileRecord.decision)
    ).all()
    seen: dict[str, dict[str, int]] = {}
    for stream, decision, count in rows:
        seen.setdefault(str(stream), {})[str(decision)] = int(count)
    out = []
    for stream in sorted(set(seen) | {k for k in settings.sampling if "*" not in k and "?" not in k}):
        counts = seen.get(stream, {})
        sampled = counts.get(Decision.ACCEPTED, 0) + counts.get(Decision.SAMPLED_OUT, 0)
        out.append({
            "stream": stream,
            "configured": settings.sampling.get(stream, 1.0),
            "accepted": counts.get(Decision.ACCEPTED, 0),
            "sampled_out": counts.get(Decision.SAMPLED_OUT, 0),
            "files": sum(counts.values()),
            "observed": (counts.get(Decision.ACCEPTED, 0) / sampled) if sampled else None,
        })
    # Globs on file names apply to files of any stream without an entry of its own.
    patterns = [{"pattern": k, "configured": v} for k, v in settings.sampling.items() if "*" in k or "?" in k]
    return {"window_s": HOUR, "streams": out, "patterns": patterns}
