"""The reaper: jobs past their deadline, pilots whose heartbeats stopped, freed stage slots."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from p3s.db import Job, Pilot
from p3s.dispatcher.context import Context
from p3s.dispatcher.jobs import NOT_PUBLISHED, lock_in_order, move_job, release_held
from p3s.messages import Task
from p3s.states import JobState, PilotState

log = logging.getLogger(__name__)

LIVE_PILOT_STATES = (PilotState.IDLE, PilotState.BUSY, PilotState.BROKEN, PilotState.DRAINING)


def reap(session: Session, ctx: Context) -> list[Task]:
    """Expire jobs past their deadline, declare silent pilots lost, fill freed stage slots."""
    tasks: list[Task] = []
    settings = ctx.settings
    grace_s = settings.dispatcher.reap_grace_s
    late = session.execute(
        select(Job.id, Job.state, Job.published_at)
        .where(Job.state.in_([JobState.PENDING, JobState.QUEUED]), Job.deadline < ctx.now - grace_s)
        .order_by(Job.id)
        .limit(1000)
    ).all()
    silent = session.scalars(
        select(Pilot).where(
            Pilot.state.in_(LIVE_PILOT_STATES),
            Pilot.last_seen < ctx.now - settings.dispatcher.heartbeat_timeout_s,
        )
    ).all()
    running = session.execute(
        select(Job.pilot_id, Job.id).where(Job.pilot_id.in_([p.id for p in silent]), Job.state == JobState.RUNNING)
    ).all() if silent else []
    # In the order every dispatcher takes them (workflows, jobs, then pilots), so that
    # this never deadlocks with another dispatcher's batch of reports.
    ending = [job_id for job_id, _s, _p in late] + [job_id for _pilot, job_id in running]
    lock_in_order(session, ending, ending)
    for job_id, state, published_at in late:
        if state == JobState.QUEUED and published_at is None:
            reason = f"{NOT_PUBLISHED}: the broker never confirmed its task before its deadline"
        else:
            reason = "deadline passed before it started"
        moved, more = move_job(session, job_id, JobState.EXPIRED, ctx, reason=reason)
        if moved:
            log.info("job %s: expired by the reaper (%s)", job_id, reason)
        tasks.extend(more)
    for pilot in silent:
        for job_id in sorted(job_id for pilot_id, job_id in running if pilot_id == pilot.id):
            _moved, more = move_job(session, job_id, JobState.LOST, ctx, reason=f"pilot {pilot.id} lost")
            tasks.extend(more)
    for pilot in sorted(silent, key=lambda p: p.id):
        pilot.state = PilotState.LOST
        log.warning("pilot %s: lost, no heartbeat for %.0fs", pilot.id, ctx.now - pilot.last_seen)
    tasks.extend(release_held(session, ctx))
    return tasks
