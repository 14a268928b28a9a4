"""The job state machine: tasks made from jobs, pilots' reports, dead letters, workflows moving on.

Every state change is a conditional move checked by
:func:`p3s.dagengine.can_transition`, so a report that arrives twice, late, or
through a second dispatcher changes nothing.  Each function runs inside the
caller's transaction and returns the tasks to publish once it has committed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from p3s import metrics
from p3s.dagengine import Template, can_transition, plan, workflow_state
from p3s.dagengine.placeholders import OUTDIR_OF
from p3s.db import FileRecord, Job, Workflow
from p3s.dispatcher.catalogue import Active
from p3s.dispatcher.context import Context
from p3s.errors import ReportRefused
from p3s.messages import Control, JobReport, Task, new_token, token_hash
from p3s.results.record import record_result
from p3s.states import TERMINAL_JOB_STATES, JobState, WorkflowState

log = logging.getLogger(__name__)

NOT_PUBLISHED = "not published"

# The statements of every report, built once: building an SQLAlchemy statement
# costs more CPU than running it (bench/RESULTS.md, section 8).  Those that
# load no objects go through the session's connection, not the ORM.
_JOBS_OF_WORKFLOW = select(Job).where(Job.workflow_id == bindparam("workflow_id"))
_LOCK_WORKFLOW = (
    select(Workflow).where(Workflow.id == bindparam("workflow_id")).with_for_update()
    .execution_options(populate_existing=True)
)
_LOCK_WORKFLOWS_OF_JOBS = (
    select(Workflow)
    .where(Workflow.id.in_(select(Job.workflow_id).where(Job.id.in_(bindparam("job_ids", expanding=True)))))
    .order_by(Workflow.id).with_for_update().execution_options(populate_existing=True)
)
_LOCK_JOBS = (
    select(Job).where(Job.id.in_(bindparam("job_ids", expanding=True))).order_by(Job.id).with_for_update()
    .execution_options(populate_existing=True)
)
_JOBS = Job.__table__
_START_JOB = (
    update(_JOBS)
    .where(
        _JOBS.c.id == bindparam("job_id"),
        _JOBS.c.state.in_([JobState.PENDING, JobState.QUEUED]),
        or_(_JOBS.c.token_hash == bindparam("proof"), _JOBS.c.token_hash.is_(None)),
    )
    .values(state=JobState.RUNNING, pilot_id=bindparam("by"), started_at=bindparam("at"), log=bindparam("log_path"))
    .returning(_JOBS.c.template, _JOBS.c.node, _JOBS.c.queued_at)
)
_MARK_PUBLISHED = (
    update(_JOBS)
    .where(_JOBS.c.id.in_(bindparam("job_ids", expanding=True)), _JOBS.c.published_at.is_(None))
    .values(published_at=bindparam("at"))
)
#: The ends only a payload's pilot reports: a job in one of them ran to its end on that pilot.
PILOT_ENDS = (JobState.FINISHED, JobState.FAILED, JobState.TIMEOUT)


def check_report(job: Job, report: JobReport, holder: bool = True) -> None:
    """Raise ReportRefused unless ``report`` proves it comes from the pilot that took ``job``'s task.

    ``holder``: also require the pilot to be the one whose ``running`` report was accepted.
    """
    if job.token_hash is not None and (not report.token or token_hash(report.token) != job.token_hash):
        raise ReportRefused("token", f"job {job.id}: report from pilot {report.pilot_id} without the job's token")
    if holder and job.pilot_id is not None and job.pilot_id != report.pilot_id and not report.redelivered:
        raise ReportRefused(
            "pilot", f"job {job.id}: report from pilot {report.pilot_id}, but pilot {job.pilot_id} took the job"
        )


def make_task(
    session: Session, ctx: Context, tpl: Template, wf: Any, job: Any, file: Any, token: str | None = None
) -> Task:
    """The task message of a queued job (``wf``, ``job`` and ``file`` are rows or look-alikes).

    Each task gets a new secret token, and the job keeps its hash: only the
    pilot that took this very task can report on the job.  ``token`` is given
    where the caller already stored its hash (rows inserted in bulk).
    """
    if token is None:
        token = new_token()
        job.token_hash = token_hash(token)
    node = tpl.node(job.node)
    outdirs = {f"{OUTDIR_OF}{ref}": ctx.outdir(wf.id, ref) for ref in sorted(node.outdir_refs)}
    expected = node.expected_s
    if expected is None:
        expected = ctx.catalogue.expected_run_time(
            session, tpl.name, node.name, ctx.now, ctx.settings.dispatcher.expected_sample
        )
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
            "outdir": ctx.outdir(wf.id, node.name),
            "parent_outdirs": [ctx.outdir(wf.id, p) for p in tpl.parents(node.name)],
            **outdirs,
        },
        env=dict(node.env),
        queue=node.queue,
        priority=job.priority,
        wall_s=node.wall_s,
        deadline=job.deadline,
        seen_at=wf.seen_at,
        enqueued_at=ctx.now,
        expected_s=expected,
        stage_in=node.stage_in,
        token=token,
    )


def has_slot(session: Session, tpl: Template, node: str, taken: dict[tuple[str, str], int]) -> bool:
    """True if one more job of this stage may be enqueued now under its max_running."""
    cap = tpl.node(node).max_running
    if cap is None:
        return True
    key = (tpl.name, node)
    if key not in taken:
        taken[key] = (
            session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.template == tpl.name, Job.node == node, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
            )
            or 0
        )
    if taken[key] >= cap:
        return False
    taken[key] += 1
    return True


def enqueue(job: Job, ctx: Context, priority: int) -> None:
    job.state = JobState.QUEUED
    job.held = False
    job.queued_at = ctx.now
    job.published_at = None
    job.priority = priority


def finish_job(job: Job, state: JobState, ctx: Context, reason: str = "") -> None:
    job.state = state
    job.held = False
    job.ended_at = job.ended_at or ctx.now
    if reason:
        job.reason = reason
    template, node = job.template, job.node
    ctx.later(metrics.JOBS.labels(template, node, state).inc)
    if job.started_at is not None and state in (JobState.FINISHED, JobState.FAILED, JobState.TIMEOUT):
        run_time = max(0.0, job.ended_at - job.started_at)
        ctx.later(lambda: metrics.RUN_TIME.labels(template, node).observe(run_time))


NOOP_REASON = "no-op: nothing to run"


def complete_noop(job: Any, ctx: Context) -> None:
    """Finish a ready no-op job at once, in the caller's transaction: no task, no pilot, no slot.

    ``job`` is a row or a look-alike.  The caller then advances the workflow
    (intake does so once the rows are inserted), so the children become ready
    in the same transaction.
    """
    finish_job(job, JobState.FINISHED, ctx, NOOP_REASON)
    job_id = job.id
    ctx.later(lambda: log.info("job %s: no-op, finished without a task", job_id))


def advance(session: Session, wf: Workflow, ctx: Context, active: Active | None = None) -> list[Task]:
    """Move a workflow on after one of its jobs changed: enqueue ready jobs, drop doomed ones.

    The caller holds the workflow row locked, so two dispatchers handling the
    reports of two parents cannot both miss that the join is complete.
    """
    tpl = ctx.catalogue.snapshot(session, wf.template_id)
    jobs = {j.node: j for j in session.scalars(_JOBS_OF_WORKFLOW, {"workflow_id": wf.id})}
    states = {n: JobState(j.state) for n, j in jobs.items()}
    step = plan(tpl.parents_map(), states)
    tasks: list[Task] = []
    for node, reason in step.dropped.items():
        finish_job(jobs[node], JobState.DROPPED, ctx, _name_jobs(reason, jobs))
        log.info("job %s: dropped, %s", jobs[node].id, jobs[node].reason)
    if step.ready:
        active = active or ctx.catalogue.active(session)
        file = session.get(FileRecord, wf.file_id)
        assert file is not None
        taken: dict[tuple[str, str], int] = {}
        for node_name in step.ready:
            job = jobs[node_name]
            if job.deadline <= ctx.now:
                finish_job(job, JobState.EXPIRED, ctx, "deadline passed before its parents finished")
                tasks.extend(advance(session, wf, ctx, active))
                return tasks
            if tpl.node(node_name).noop:
                # Its children may be ready now; the next round sees them (and the
                # rest of this round's ready jobs, which are still pending).
                complete_noop(job, ctx)
                tasks.extend(advance(session, wf, ctx, active))
                return tasks
            if has_slot(session, tpl, node_name, taken):
                enqueue(job, ctx, active.priority(tpl, node_name))
                tasks.append(make_task(session, ctx, tpl, wf, job, file))
            else:
                job.held = True
    end_workflow(wf, jobs.values(), ctx)
    return tasks


def end_workflow(wf: Workflow, jobs: Iterable[Job], ctx: Context) -> None:
    """End a running workflow whose jobs are all terminal, counting it once the transaction commits."""
    jobs = list(jobs)
    state = workflow_state(JobState(j.state) for j in jobs)
    if state == WorkflowState.RUNNING or wf.state != WorkflowState.RUNNING:
        return
    wf.state = state
    wf.ended_at = max((j.ended_at or ctx.now) for j in jobs)
    template, latency, wf_id = wf.template, max(0.0, wf.ended_at - wf.seen_at), wf.id
    ctx.later(metrics.WORKFLOWS.labels(template, state).inc)
    if state == WorkflowState.FINISHED and wf.ended_at <= wf.deadline:
        ctx.later(metrics.WORKFLOWS_ON_TIME.labels(template).inc)
    ctx.later(lambda: metrics.SEEN_TO_DONE.labels(template, state).observe(latency))
    ctx.later(lambda: log.info("workflow %s: %s", wf_id, state))


def _name_jobs(reason: str, jobs: Mapping[str, Job]) -> str:
    """Add the job id to the node the engine named as the cause ("parent 'reco' ...")."""
    for node, job in jobs.items():
        quoted = f"'{node}'"
        if quoted in reason:
            return reason.replace(quoted, f"{quoted} (job {job.id})", 1)
    return reason


def _locked_workflow(session: Session, workflow_id: int) -> Workflow:
    return session.scalars(_LOCK_WORKFLOW, {"workflow_id": workflow_id}).one()


# session.info key: the transaction, and the rows lock_in_order locked and loaded in it.
LOCKED = "p3s_locked"


def _locked_rows(session: Session) -> dict[tuple[type, int], Any]:
    """The rows lock_in_order locked in the session's current transaction (none in a new one).

    Kept here, not only in the session: its identity map holds an unchanged
    row only while something else refers to it.
    """
    transaction = session.get_transaction()
    held = session.info.get(LOCKED)
    if held is None or held[0] is not transaction:
        held = session.info[LOCKED] = (transaction, {})
    return held[1]


def locked_job(session: Session, job_id: int) -> Job | None:
    """The job, from the rows lock_in_order loaded if it is one of them, else from the session or the database."""
    job = _locked_rows(session).get((Job, job_id))
    return job if job is not None else session.get(Job, job_id)


def lock_in_order(session: Session, ended: Collection[int], reported: Collection[int]) -> None:
    """Lock, before a batch of reports changes anything, the workflows and jobs it will change.

    The workflows of the jobs in ``ended`` (their joins are decided), then the
    jobs in ``reported``, each by id.  Two dispatchers taking the same rows in
    the orders their batches happen to have would deadlock (PostgreSQL breaks
    the tie only after its ``deadlock_timeout``, a second, by failing one
    batch); taken in one order, the second batch waits for the first to
    commit, then sees its changes.

    The rows are loaded as they are once locked, and remembered in the
    session, so :func:`move_job` neither locks nor reads them again.
    """
    locked = _locked_rows(session)
    if ended:
        workflows = session.scalars(_LOCK_WORKFLOWS_OF_JOBS, {"job_ids": sorted(set(ended))}).all()
        locked.update(((Workflow, w.id), w) for w in workflows)
    if reported and (ended or len(set(reported)) > 1):
        # (One job that only starts needs no lock taken ahead: its one UPDATE takes it.)
        rows = session.scalars(_LOCK_JOBS, {"job_ids": sorted(set(reported))}).all()
        locked.update(((Job, j.id), j) for j in rows)


def move_job(session: Session, job_id: int, new: JobState, ctx: Context, **fields: object) -> tuple[bool, list[Task]]:
    """Move one job to ``new`` if that is a legal move; advance its workflow if it ended.

    Returns whether the job moved, and the tasks of jobs that became ready.
    """
    job = locked_job(session, job_id)
    if job is None:
        log.warning("job %s: report for an unknown job ignored", job_id)
        return False, []
    locked = _locked_rows(session)
    wf = locked.get((Workflow, job.workflow_id))
    if wf is None or (Job, job_id) not in locked:
        # Not locked ahead by lock_in_order in this transaction (which locks and
        # reads the workflow first, then the job): lock the workflow, read the job again.
        wf = _locked_workflow(session, job.workflow_id)
        session.refresh(job)
    old = JobState(job.state)
    if not can_transition(old, new):
        return False, []
    for key, value in fields.items():
        if value is not None:
            setattr(job, key, value)
    if new in TERMINAL_JOB_STATES:
        finish_job(job, new, ctx)
        if ctx.catalogue.snapshot(session, wf.template_id).node(job.node).max_running is not None:
            ctx.slots_freed = True
        return True, advance(session, wf, ctx)
    job.state = new
    return True, []


def apply_job_report(session: Session, report: JobReport, ctx: Context) -> list[Task]:
    """Record what a pilot said about a job; a terminal state is never left.

    Raises ReportRefused, before changing anything, for a report that does
    not prove it comes from the pilot that took the job's task.
    """
    new = JobState(report.state)
    if new == JobState.RUNNING:
        return _job_started(session, report, ctx)
    job = locked_job(session, report.job_id)
    if job is None:
        log.warning("job %s: report for an unknown job ignored", report.job_id)
        return []
    if report.redelivered and job.state != JobState.QUEUED:
        # Believed only while the job still waits: if it is running or ended,
        # the first delivery's pilot has it, and its reports rule.
        log.info("job %s: pilot %s refused a redelivered copy; the job is %s", report.job_id, report.pilot_id,
                 job.state)
        return []
    check_report(job, report)
    if JobState(job.state).terminal:
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
    moved, tasks = move_job(session, report.job_id, new, ctx, **fields)
    if moved and new == JobState.FINISHED and report.results is not None:
        # In the transaction that ends the job: its results are recorded with its end, or neither is.
        record_result(session, report.job_id, report.results, ctx)
    return tasks


def _job_started(session: Session, report: JobReport, ctx: Context) -> list[Task]:
    """A job started: one conditional UPDATE; nothing else moves, so the workflow is not locked."""
    proof = token_hash(report.token) if report.token else ""
    row = session.connection().execute(
        _START_JOB, {"job_id": report.job_id, "proof": proof, "by": report.pilot_id, "at": report.started_at,
                     "log_path": report.log}
    ).first()
    if row is None:
        job = locked_job(session, report.job_id)
        if job is None:
            log.debug("job %s: running report from pilot %s for an unknown job ignored", report.job_id,
                      report.pilot_id)
            return []
        check_report(job, report, holder=False)
        if job.state in PILOT_ENDS and job.pilot_id == report.pilot_id:
            # This pilot's own end report overtook its start (two dispatchers took
            # one each): the job ended as the pilot said; nothing to stop.
            log.debug("job %s: running report from pilot %s after its end report, job is %s", job.id,
                      report.pilot_id, job.state)
        elif JobState(job.state).terminal:
            # Its task was still in a queue when the job ended (cancelled by the
            # operator, say): the payload now runs for nothing, so stop it.
            ctx.orders.append(Control("cancel_job", report.pilot_id, job_id=job.id))
            log.info("job %s: pilot %s started it after it ended %s; telling the pilot to stop it",
                     job.id, report.pilot_id, job.state)
        elif job.state == JobState.RUNNING and job.pilot_id != report.pilot_id:
            ctx.later(metrics.DUPLICATE_STARTS.inc)
            log.error("job %s: pilot %s started it while pilot %s runs it", report.job_id, report.pilot_id,
                      job.pilot_id)
        else:
            log.debug("job %s: running report from pilot %s ignored, job is %s", report.job_id, report.pilot_id,
                      job.state)
        return []
    # Past the ORM: a row this session already holds (an earlier report of the batch) is told.
    held = session.identity_map.get(identity_key(Job, report.job_id))
    if held is not None:
        for key, value in (("state", JobState.RUNNING.value), ("pilot_id", report.pilot_id),
                           ("started_at", report.started_at), ("log", report.log)):
            set_committed_value(held, key, value)
    template, node, queued_at = row
    if report.started_at and queued_at:
        waited = max(0.0, report.started_at - queued_at)
        ctx.later(lambda: metrics.QUEUED_TO_STARTED.labels(template, node).observe(waited))
    return []


def expire_task(session: Session, task: Task, reason: str, ctx: Context) -> list[Task]:
    """A task dead-lettered by RabbitMQ: its TTL ran out, a full queue pushed it out, or a pilot handed it back."""
    if reason == "rejected":
        return _handed_back(session, task, ctx)
    if reason == "maxlen":
        moved, tasks = move_job(session, task.job_id, JobState.DROPPED, ctx, reason="overload")
    else:
        moved, tasks = move_job(
            session, task.job_id, JobState.EXPIRED, ctx, reason=f"dead-lettered by the broker ({reason})"
        )
    if moved:
        log.info("job %s: %s by the broker (%s)", task.job_id, "dropped" if reason == "maxlen" else "expired", reason)
    return tasks


def _handed_back(session: Session, task: Task, ctx: Context) -> list[Task]:
    """A pilot without the lifetime left to run it rejected the task: publish a fresh copy while there is time."""
    job = session.get(Job, task.job_id)
    if job is None or job.state != JobState.QUEUED:
        return []
    if job.deadline <= ctx.now:
        _moved, tasks = move_job(session, job.id, JobState.EXPIRED, ctx,
                                 reason="deadline passed after a pilot handed it back")
        return tasks
    job.published_at = None
    job.queued_at = ctx.now
    log.info("job %s: handed back by a pilot, published again", job.id)
    return [dataclasses.replace(task, enqueued_at=ctx.now)]


def release_held(session: Session, ctx: Context) -> list[Task]:
    """Enqueue jobs that waited for a slot of their stage, oldest first, as slots free."""
    held = session.scalars(
        select(Job).where(Job.held.is_(True), Job.state == JobState.PENDING).order_by(Job.id).limit(1000)
    ).all()
    if not held:
        return []
    active = ctx.catalogue.active(session)
    taken: dict[tuple[str, str], int] = {}
    tasks: list[Task] = []
    for job in held:
        wf = session.get(Workflow, job.workflow_id)
        assert wf is not None
        tpl = ctx.catalogue.snapshot(session, wf.template_id)
        if tpl.node(job.node).noop:
            # A no-op takes no slot, so it is never held by intake or advance; should one be, it ends here.
            wf = _locked_workflow(session, wf.id)
            session.refresh(job)
            if job.state == JobState.PENDING:
                complete_noop(job, ctx)
                tasks.extend(advance(session, wf, ctx, active))
            continue
        if not has_slot(session, tpl, job.node, taken):
            continue
        file = session.get(FileRecord, wf.file_id)
        assert file is not None
        enqueue(job, ctx, active.priority(tpl, job.node))
        tasks.append(make_task(session, ctx, tpl, wf, job, file))
    return tasks


def unpublished_tasks(session: Session, ctx: Context, workflow_ids: Collection[int]) -> list[Task]:
    """Tasks of these workflows' queued jobs that the broker never confirmed: again, or ended if too late.

    Called for messages the broker delivered again, whose first handling may
    have committed without its tasks reaching the broker (a dispatcher killed
    between its commit and its publish, or a publish that failed).
    """
    if not workflow_ids:
        return []
    tasks: list[Task] = []
    jobs = session.scalars(
        select(Job)
        .where(
            Job.workflow_id.in_(sorted(workflow_ids)),
            Job.state == JobState.QUEUED,
            Job.published_at.is_(None),
            # Not those this very transaction queued: their tasks are on their way.
            Job.queued_at < ctx.now,
        )
        .order_by(Job.id)
    ).all()
    for job in jobs:
        if job.deadline <= ctx.now:
            _moved, more = move_job(session, job.id, JobState.EXPIRED, ctx,
                                    reason=f"{NOT_PUBLISHED}: its deadline passed before the broker took its task")
            tasks.extend(more)
            continue
        wf = session.get(Workflow, job.workflow_id)
        assert wf is not None
        file = session.get(FileRecord, wf.file_id)
        assert file is not None
        tpl = ctx.catalogue.snapshot(session, wf.template_id)
        job_id = job.id
        ctx.later(lambda job_id=job_id: log.warning("job %s: its task never reached the broker; publishing it now",
                                                    job_id))
        tasks.append(make_task(session, ctx, tpl, wf, job, file))
    return tasks


def workflows_of_jobs(session: Session, job_ids: Collection[int]) -> set[int]:
    if not job_ids:
        return set()
    return set(session.scalars(select(Job.workflow_id).where(Job.id.in_(sorted(job_ids)))).all())


def mark_published(connection: Connection, job_ids: Collection[int], now: float) -> None:
    """The broker confirmed these jobs' tasks: one UPDATE, atomic by itself (autocommit will do)."""
    if job_ids:
        connection.execute(_MARK_PUBLISHED, {"job_ids": sorted(job_ids), "at": now})
