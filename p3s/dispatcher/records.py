"""What the dispatcher writes: data functions that take a session and return tasks to publish.

Each function runs inside the caller's transaction; the caller commits, then
publishes the tasks it was given, then acks the messages.  Every state change
is a conditional move checked by :func:`p3s.dagengine.can_transition`, so a
report that arrives twice, late, or through a second dispatcher changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import SimpleNamespace
from typing import Any

from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session

from p3s import metrics
from p3s.config import Settings
from p3s.dagengine import Template, can_transition, plan, workflow_state
from p3s.db import FileRecord, Job, Pilot, StagePriority, TemplateRecord, Workflow
from p3s.dispatcher.sampling import fraction_for, keep
from p3s.messages import DataEvent, JobReport, PilotReport, Task
from p3s.states import TERMINAL_JOB_STATES, Decision, JobState, PilotState, WorkflowState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TemplateRef:
    id: int
    name: str
    version: int


@dataclass
class Catalogue:
    """The templates new workflows may be made from, and the operators' stage priorities.

    Read once per batch, so an imported or deleted template and a changed
    priority take effect with the next batch, without a restart.
    """

    active: list[tuple[_TemplateRef, Template]]
    priorities: dict[tuple[str, str], int]
    by_id: dict[int, Template] = field(default_factory=dict)


_SNAPSHOTS: dict[tuple[str, int], Template] = {}


def snapshot(session: Session, template_id: int) -> Template:
    """The template version a workflow was made from; versions never change, so cache them."""
    key = (str(session.get_bind().url), template_id)
    tpl = _SNAPSHOTS.get(key)
    if tpl is None:
        record = session.get(TemplateRecord, template_id)
        assert record is not None, f"template {template_id} vanished"
        tpl = _SNAPSHOTS[key] = Template.from_dict(record.spec)
    return tpl


_CATALOGUES: dict[str, tuple[tuple[object, ...], Catalogue]] = {}

# Built once: constructing and hashing these statements cost more than running them.
_FINGERPRINT = select(
    select(func.max(TemplateRecord.id)).scalar_subquery(),
    select(func.max(TemplateRecord.deleted_at)).scalar_subquery(),
    select(func.count()).select_from(TemplateRecord).where(TemplateRecord.deleted_at.is_not(None)).scalar_subquery(),
    select(func.max(StagePriority.set_at)).scalar_subquery(),
    select(func.count()).select_from(StagePriority).scalar_subquery(),
)
_INSERTS = {model: insert(model.__table__) for model in (FileRecord, Workflow, Job)}
_FILES_BY_NAME = select(FileRecord.name, FileRecord.dedup_key, FileRecord.seen_at, FileRecord.source).where(
    FileRecord.name.in_(bindparam("names", expanding=True))
)


def load_catalogue(session: Session) -> Catalogue:
    """The active templates and stage priorities, re-read only when either changed.

    One small statement tells whether anything changed since the last batch (a
    new version has a higher id; a deletion sets deleted_at; a priority change
    sets set_at), so the usual batch pays one query instead of two joins.
    """
    fingerprint = tuple(session.connection().execute(_FINGERPRINT).one())
    key = str(session.get_bind().url)
    cached = _CATALOGUES.get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    catalogue = _read_catalogue(session)
    _CATALOGUES[key] = (fingerprint, catalogue)
    return catalogue


def _read_catalogue(session: Session) -> Catalogue:
    latest = (
        select(TemplateRecord.name, func.max(TemplateRecord.version).label("version"))
        .group_by(TemplateRecord.name)
        .subquery()
    )
    records = session.scalars(
        select(TemplateRecord)
        .join(latest, (TemplateRecord.name == latest.c.name) & (TemplateRecord.version == latest.c.version))
        .where(TemplateRecord.deleted_at.is_(None))
        .order_by(TemplateRecord.name)
    ).all()
    # Detached copies: the catalogue outlives this session.
    active = [(_TemplateRef(r.id, r.name, r.version), snapshot(session, r.id)) for r in records]
    priorities = {(p.template, p.node): p.priority for p in session.scalars(select(StagePriority))}
    return Catalogue(active=active, priorities=priorities)


@dataclass
class Context:
    """What the record functions need besides the session."""

    settings: Settings
    now: float = field(default_factory=time.time)
    # Set by the dispatcher when queues are past their limit: new files are shed.
    overloaded: bool = False
    output_root: str = ""

    def __post_init__(self) -> None:
        self.output_root = str(self.settings.output_path)


def _outdir(ctx: Context, workflow_id: int, node: str) -> str:
    return f"{ctx.output_root}/{workflow_id}/{node}"


_EXPECTED: dict[tuple[str, str, str], tuple[float, float]] = {}
EXPECTED_REFRESH_S = 30.0


def expected_run_time(session: Session, ctx: Context, template: str, node: str) -> float:
    """The p95 run time of a stage's recent finished jobs (0 with fewer than 5), cached a while.

    Used when a node gives no ``expected_s``, so pilots can refuse a task that
    could no longer finish before its deadline.
    """
    key = (str(session.get_bind().url), template, node)
    cached = _EXPECTED.get(key)
    if cached is not None and ctx.now - cached[1] < EXPECTED_REFRESH_S:
        return cached[0]
    times = sorted(stage_run_times(session, template, node, ctx.settings.dispatcher.expected_sample))
    p95 = times[min(len(times) - 1, int(0.95 * len(times)))] if len(times) >= 5 else 0.0
    _EXPECTED[key] = (p95, ctx.now)
    return p95


def _make_task(
    session: Session, ctx: Context, cat: Catalogue, tpl: Template, wf: Workflow, job: Job, file: FileRecord
) -> Task:
    node = tpl.node(job.node)
    expected = node.expected_s if node.expected_s is not None else expected_run_time(session, ctx, tpl.name, node.name)
    priority = cat.priorities.get((tpl.name, node.name), node.priority)
    return Task(
        job_id=job.id,
        workflow_id=wf.id,
        template=tpl.name,
        node=node.name,
        argv=list(node.argv),
        values={
            "input": file.path,
            "input_name": file.name,
            "job_id": str(job.id),
            "workflow_id": str(wf.id),
            "outdir": _outdir(ctx, wf.id, node.name),
            "parent_outdirs": [_outdir(ctx, wf.id, p) for p in tpl.parents(node.name)],
        },
        env=dict(node.env),
        queue=node.queue,
        priority=priority,
        wall_s=node.wall_s,
        deadline=job.deadline,
        seen_at=wf.seen_at,
        enqueued_at=ctx.now,
        expected_s=expected,
        stage_in=node.stage_in,
    )


def _slots(session: Session, tpl: Template, node: str, cap: int | None, taken: dict[tuple[str, str], int]) -> bool:
    """True if one more job of this stage may be enqueued now under its max_running."""
    if cap is None:
        return True
    key = (tpl.name, node)
    if key not in taken:
        taken[key] = (
            session.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.template == tpl.name,
                    Job.node == node,
                    Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
                )
            )
            or 0
        )
    if taken[key] >= cap:
        return False
    taken[key] += 1
    return True


def _enqueue(job: Job, ctx: Context, priority: int) -> None:
    job.state = JobState.QUEUED
    job.held = False
    job.queued_at = ctx.now
    job.priority = priority


ID_BLOCK = 200
_ID_POOLS: dict[tuple[str, str], deque[int]] = {}


def _allocate_ids(session: Session, counts: Sequence[tuple[Any, int]]) -> list[list[int]]:
    """Fresh primary keys, ``count`` for each table, taken before the rows are inserted.

    Knowing the ids up front lets a batch be inserted with one cached
    executemany per table instead of ORM flushes with INSERT ... RETURNING,
    which are several times slower.  PostgreSQL hands out its sequences in
    blocks kept here (one statement for all tables when a block runs out), so
    two dispatchers never collide and a one-file batch usually costs no round
    trip for its ids; ids lost with a stopped dispatcher are gaps, nothing more.
    SQLite (the embedded default, one dispatcher) continues after the largest id.
    """
    if session.get_bind().dialect.name != "postgresql":
        out = []
        for table, n in counts:
            start = (session.scalar(select(func.max(table.c.id))) or 0) + 1 if n else 0
            out.append(list(range(start, start + n)))
        return out
    url = str(session.get_bind().url)
    pools = [_ID_POOLS.setdefault((url, table.name), deque()) for table, _n in counts]
    short = [(table, max(ID_BLOCK, n)) for (table, n), pool in zip(counts, pools, strict=True) if len(pool) < n]
    if short:
        columns = ", ".join(
            f"(SELECT array_agg(nextval('{table.name}_id_seq')) FROM generate_series(1, {int(n)}))"
            for table, n in short
        )
        row = session.execute(text(f"SELECT {columns}")).one()
        for (table, _n), ids in zip(short, row, strict=True):
            _ID_POOLS[(url, table.name)].extend(ids)
    return [[pool.popleft() for _ in range(n)] for (_table, n), pool in zip(counts, pools, strict=True)]


def record_events(session: Session, events: Sequence[DataEvent], ctx: Context) -> list[Task]:
    """Record one decision per event, make the workflows of accepted files, return root tasks.

    An event already recorded (same name, seen_at and source: a redelivery after
    a lost ack) is skipped, so a file is counted once however often it arrives.
    """
    cat = load_catalogue(session)
    names = {e.name for e in events}
    known: set[str] = set()
    recorded: set[tuple[str, float, str]] = set()
    for name, dedup_key, seen_at, source in session.connection().execute(_FILES_BY_NAME, {"names": list(names)}):
        recorded.add((name, seen_at, source))
        if dedup_key is not None:
            known.add(dedup_key)

    # First pass: one decision per event, and the templates of accepted files.
    decided: list[tuple[DataEvent, str, bool, str, list[tuple[_TemplateRef, Template]]]] = []
    for ev in events:
        if (ev.name, ev.seen_at, ev.source) in recorded:
            log.info("file %s: event delivered again, already recorded", ev.name)
            continue
        recorded.add((ev.name, ev.seen_at, ev.source))
        first = ev.name not in known
        known.add(ev.name)
        reason = ""
        matching: list[tuple[_TemplateRef, Template]] = []
        if not first and not ev.force:
            decision = Decision.DUPLICATE
        elif not ev.force and not keep(ev.name, fraction_for(ctx.settings.sampling, ev.stream, ev.name)):
            decision = Decision.SAMPLED_OUT
        elif ctx.overloaded and not ev.force:
            decision, reason = Decision.SHED, "overload"
        else:
            decision = Decision.ACCEPTED
            matching = [
                (ref, tpl)
                for ref, tpl in cat.active
                if (tpl.name == ev.template if ev.template else fnmatchcase(ev.name, tpl.trigger))
            ]
            if not matching:
                reason = f"template {ev.template!r} not found" if ev.template else "no template matches"
                log.warning("file %s: accepted, but %s", ev.name, reason)
        if decision != Decision.ACCEPTED:
            log.info("file %s: %s", ev.name, decision)
        metrics.FILES.labels(ev.stream, decision).inc()
        decided.append((ev, decision, first, reason, matching))

    # Second pass: plain rows with their ids, roots already in their final state.
    # Plain dicts, not ORM objects: building thousands of instances per batch
    # cost more than the database did.
    allocated = _allocate_ids(
        session,
        [
            (FileRecord.__table__, len(decided)),
            (Workflow.__table__, sum(len(d[4]) for d in decided)),
            (Job.__table__, sum(len(t.nodes) for d in decided for _r, t in d[4])),
        ],
    )
    file_ids, wf_ids, job_ids = (iter(ids) for ids in allocated)
    file_rows: list[dict[str, Any]] = []
    wf_rows: list[dict[str, Any]] = []
    job_rows: list[dict[str, Any]] = []
    queued: list[tuple[Template, Any, Any, Any]] = []
    taken: dict[tuple[str, str], int] = {}
    for ev, decision, first, reason, matching in decided:
        file = {
            "id": next(file_ids),
            "name": ev.name,
            "dedup_key": ev.name if first else None,
            "path": ev.path,
            "stream": ev.stream,
            "source": ev.source,
            "size": ev.size,
            "seen_at": ev.seen_at,
            "received_at": ctx.now,
            "decision": decision.value,
            "by_hand": ev.by_hand,
            "forced": ev.force,
            "reason": reason,
        }
        file_rows.append(file)
        for ref, tpl in matching:
            wf_deadline = ev.seen_at + tpl.budget_s
            wf = {
                "id": next(wf_ids),
                "file_id": file["id"],
                "template_id": ref.id,
                "template": tpl.name,
                "state": WorkflowState.RUNNING.value,
                "seen_at": ev.seen_at,
                "created_at": ctx.now,
                "deadline": wf_deadline,
                "ended_at": None,
            }
            wf_rows.append(wf)
            roots = set(tpl.roots())
            for node in tpl.nodes:
                job = {
                    "id": next(job_ids),
                    "workflow_id": wf["id"],
                    "template": tpl.name,
                    "node": node.name,
                    "state": JobState.PENDING.value,
                    "held": False,
                    "queue": node.queue,
                    "priority": node.priority,
                    "deadline": min(wf_deadline, ev.seen_at + node.budget_s) if node.budget_s else wf_deadline,
                    "wall_s": node.wall_s,
                    "pilot_id": None,
                    "exit_code": None,
                    "log": "",
                    "reason": "",
                    "created_at": ctx.now,
                    "queued_at": None,
                    "started_at": None,
                    "ended_at": None,
                }
                if node.name in roots:
                    if _slots(session, tpl, node.name, node.max_running, taken):
                        job.update(
                            state=JobState.QUEUED.value,
                            queued_at=ctx.now,
                            priority=cat.priorities.get((tpl.name, node.name), node.priority),
                        )
                        queued.append((tpl, SimpleNamespace(**wf), SimpleNamespace(**job), SimpleNamespace(**file)))
                    else:
                        job["held"] = True
                job_rows.append(job)
            metrics.SEEN_TO_CREATED.labels(tpl.name).observe(max(0.0, ctx.now - ev.seen_at))
    # Core executemany, one per table, parents before children for the foreign keys.
    conn = session.connection()
    for model, rows in ((FileRecord, file_rows), (Workflow, wf_rows), (Job, job_rows)):
        if rows:
            conn.execute(_INSERTS[model], rows)
    return [_make_task(session, ctx, cat, tpl, wf, job, file) for tpl, wf, job, file in queued]


def _finish_job(job: Job, state: JobState, now: float, reason: str = "") -> None:
    job.state = state
    job.held = False
    job.ended_at = job.ended_at or now
    if reason:
        job.reason = reason
    metrics.JOBS.labels(job.template, job.node, state).inc()
    if job.started_at is not None and state in (JobState.FINISHED, JobState.FAILED, JobState.TIMEOUT):
        metrics.RUN_TIME.labels(job.template, job.node).observe(max(0.0, job.ended_at - job.started_at))


def advance(session: Session, wf: Workflow, ctx: Context, cat: Catalogue | None = None) -> list[Task]:
    """Move a workflow on after one of its jobs changed: enqueue ready jobs, drop doomed ones.

    The caller holds the workflow row locked, so two dispatchers handling the
    reports of two parents cannot both miss that the join is complete.
    """
    tpl = snapshot(session, wf.template_id)
    jobs = {j.node: j for j in session.scalars(select(Job).where(Job.workflow_id == wf.id))}
    states = {n: JobState(j.state) for n, j in jobs.items()}
    step = plan(tpl.parents_map(), states)
    tasks: list[Task] = []
    for node, reason in step.dropped.items():
        _finish_job(jobs[node], JobState.DROPPED, ctx.now, _name_jobs(reason, jobs))
        log.info("job %s: dropped, %s", jobs[node].id, jobs[node].reason)
    if step.ready:
        cat = cat or load_catalogue(session)
        file = session.get(FileRecord, wf.file_id)
        assert file is not None
        taken: dict[tuple[str, str], int] = {}
        for node_name in step.ready:
            job, node = jobs[node_name], tpl.node(node_name)
            if job.deadline <= ctx.now:
                _finish_job(job, JobState.EXPIRED, ctx.now, "deadline passed before its parents finished")
                tasks.extend(advance(session, wf, ctx, cat))
                return tasks
            if _slots(session, tpl, node_name, node.max_running, taken):
                _enqueue(job, ctx, cat.priorities.get((tpl.name, node_name), node.priority))
                tasks.append(_make_task(session, ctx, cat, tpl, wf, job, file))
            else:
                job.held = True
    states = {n: JobState(j.state) for n, j in jobs.items()}
    state = workflow_state(states.values())
    if state != WorkflowState.RUNNING and wf.state == WorkflowState.RUNNING:
        wf.state = state
        wf.ended_at = max((j.ended_at or ctx.now) for j in jobs.values())
        metrics.WORKFLOWS.labels(wf.template, state).inc()
        metrics.SEEN_TO_DONE.labels(wf.template, state).observe(max(0.0, wf.ended_at - wf.seen_at))
        log.info("workflow %s: %s", wf.id, state)
    return tasks


def _name_jobs(reason: str, jobs: Mapping[str, Job]) -> str:
    """Add the job id to the node the engine named as the cause ("parent 'reco' ...")."""
    for node, job in jobs.items():
        quoted = f"'{node}'"
        if quoted in reason:
            return reason.replace(quoted, f"{quoted} (job {job.id})", 1)
    return reason


def _locked_workflow(session: Session, workflow_id: int) -> Workflow:
    wf = session.scalars(
        select(Workflow).where(Workflow.id == workflow_id).with_for_update().execution_options(populate_existing=True)
    ).one()
    return wf


def move_job(session: Session, job_id: int, new: JobState, ctx: Context, **fields: object) -> tuple[bool, list[Task]]:
    """Move one job to ``new`` if that is a legal move; advance its workflow if it ended.

    Returns whether the job moved, and the tasks of jobs that became ready.
    """
    job = session.get(Job, job_id)
    if job is None:
        log.warning("job %s: report for an unknown job ignored", job_id)
        return False, []
    wf = _locked_workflow(session, job.workflow_id)
    session.refresh(job)
    old = JobState(job.state)
    if not can_transition(old, new):
        return False, []
    for key, value in fields.items():
        if value is not None:
            setattr(job, key, value)
    if new in TERMINAL_JOB_STATES:
        _finish_job(job, new, ctx.now)
        return True, advance(session, wf, ctx)
    job.state = new
    return True, []


def apply_job_report(session: Session, report: JobReport, ctx: Context) -> list[Task]:
    """Record what a pilot said about a job; a terminal state is never left."""
    new = JobState(report.state)
    if new == JobState.RUNNING:
        return _job_started(session, report)
    job = session.get(Job, report.job_id)
    if job is not None and JobState(job.state).terminal:
        level = logging.WARNING if job.state == JobState.LOST else logging.DEBUG
        log.log(
            level,
            "job %s: %s report from pilot %s ignored, job is already %s",
            report.job_id,
            new,
            report.pilot_id,
            job.state,
        )
        return []
    fields: dict[str, object] = {
        "pilot_id": report.pilot_id,
        "started_at": report.started_at,
        "exit_code": report.exit_code,
        "log": report.log or None,
        "reason": report.reason or None,
        "ended_at": report.ended_at,
    }
    _moved, tasks = move_job(session, report.job_id, new, ctx, **fields)
    return tasks


def _job_started(session: Session, report: JobReport) -> list[Task]:
    """A job started: one conditional UPDATE; nothing else moves, so the workflow is not locked."""
    row = session.execute(
        update(Job)
        .where(Job.id == report.job_id, Job.state.in_([JobState.PENDING, JobState.QUEUED]))
        .values(state=JobState.RUNNING, pilot_id=report.pilot_id, started_at=report.started_at, log=report.log)
        .returning(Job.template, Job.node, Job.queued_at)
    ).first()
    if row is None:
        log.debug(
            "job %s: running report from pilot %s ignored, job unknown or moved on", report.job_id, report.pilot_id
        )
        return []
    template, node, queued_at = row
    if report.started_at and queued_at:
        metrics.QUEUED_TO_STARTED.labels(template, node).observe(max(0.0, report.started_at - queued_at))
    return []


def apply_pilot_report(session: Session, report: PilotReport, ctx: Context) -> None:
    """Create or refresh a pilot's record from its registration, heartbeat or goodbye."""
    pilot = session.get(Pilot, report.pilot_id)
    state = PilotState.STOPPED if report.event == "stop" else PilotState(report.state)
    if pilot is None:
        pilot = Pilot(
            id=report.pilot_id,
            host=report.host,
            pid=report.pid,
            queues=",".join(report.queues),
            state=state,
            started_at=report.sent_at,
            last_seen=report.sent_at,
            job_id=report.job_id,
            jobs_done=report.jobs_done,
        )
        session.add(pilot)
        log.info("pilot %s: registered from %s pid %s, queues %s", pilot.id, report.host, report.pid, pilot.queues)
        return
    if report.sent_at < pilot.last_seen:
        return  # an older heartbeat overtaken by a newer one
    if pilot.state == PilotState.LOST:
        log.warning("pilot %s: heard from again after being declared lost", pilot.id)
    if pilot.state == PilotState.STOPPED and report.event != "stop":
        return
    pilot.state = state
    pilot.last_seen = report.sent_at
    pilot.job_id = report.job_id
    pilot.jobs_done = report.jobs_done


def expire_task(session: Session, task: Task, reason: str, ctx: Context) -> list[Task]:
    """A task dead-lettered by RabbitMQ: its TTL ran out, or a full queue pushed it out."""
    if reason == "maxlen":
        moved, tasks = move_job(session, task.job_id, JobState.DROPPED, ctx, reason="overload")
    else:
        moved, tasks = move_job(
            session, task.job_id, JobState.EXPIRED, ctx, reason=f"dead-lettered by the broker ({reason})"
        )
    if moved:
        log.info("job %s: %s by the broker (%s)", task.job_id, "dropped" if reason == "maxlen" else "expired", reason)
    return tasks


def reap(session: Session, ctx: Context) -> list[Task]:
    """Expire jobs past their deadline, declare silent pilots lost, fill freed stage slots."""
    tasks: list[Task] = []
    settings = ctx.settings
    grace_s = settings.dispatcher.reap_grace_s
    late = session.scalars(
        select(Job.id)
        .where(Job.state.in_([JobState.PENDING, JobState.QUEUED]), Job.deadline < ctx.now - grace_s)
        .order_by(Job.id)
        .limit(1000)
    ).all()
    for job_id in late:
        moved, more = move_job(session, job_id, JobState.EXPIRED, ctx, reason="deadline passed before it started")
        if moved:
            log.info("job %s: expired by the reaper", job_id)
        tasks.extend(more)
    silent = session.scalars(
        select(Pilot).where(
            Pilot.state.in_([PilotState.IDLE, PilotState.BUSY]),
            Pilot.last_seen < ctx.now - settings.dispatcher.heartbeat_timeout_s,
        )
    ).all()
    for pilot in silent:
        pilot.state = PilotState.LOST
        log.warning("pilot %s: lost, no heartbeat for %.0fs", pilot.id, ctx.now - pilot.last_seen)
        running = session.scalars(select(Job.id).where(Job.pilot_id == pilot.id, Job.state == JobState.RUNNING)).all()
        for job_id in running:
            moved, more = move_job(session, job_id, JobState.LOST, ctx, reason=f"pilot {pilot.id} lost")
            tasks.extend(more)
    tasks.extend(release_held(session, ctx))
    return tasks


def release_held(session: Session, ctx: Context) -> list[Task]:
    """Enqueue jobs that waited for a slot of their stage, oldest first, as slots free."""
    held = session.scalars(
        select(Job).where(Job.held.is_(True), Job.state == JobState.PENDING).order_by(Job.id).limit(1000)
    ).all()
    if not held:
        return []
    cat = load_catalogue(session)
    taken: dict[tuple[str, str], int] = {}
    tasks: list[Task] = []
    for job in held:
        wf = session.get(Workflow, job.workflow_id)
        assert wf is not None
        tpl = snapshot(session, wf.template_id)
        node = tpl.node(job.node)
        if not _slots(session, tpl, job.node, node.max_running, taken):
            continue
        file = session.get(FileRecord, wf.file_id)
        assert file is not None
        _enqueue(job, ctx, cat.priorities.get((tpl.name, node.name), node.priority))
        tasks.append(_make_task(session, ctx, cat, tpl, wf, job, file))
    return tasks


def stage_run_times(session: Session, template: str, node: str, limit: int = 100) -> Iterable[float]:
    rows = session.execute(
        select(Job.ended_at - Job.started_at)
        .where(Job.template == template, Job.node == node, Job.state == JobState.FINISHED)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    return [r[0] for r in rows if r[0] is not None]
