"""The operator's cancel, drain and stop: the database side, and the orders to pilots on ``p3s.control``.

Cancelling ends a workflow's (or a job's and its descendants') pending and
queued jobs ``dropped`` with the reason ``cancelled by operator``, in one
transaction that holds the workflow row, as the dispatcher does when it
moves a workflow on.  A running job is not ended here: its pilot is told to
end the payload, and its report (carrying the task's token, like every
report) ends the job, so the record says when and how the payload stopped.
A running job whose pilot is no longer alive has nobody to report it, and
is ended here.  Everything is idempotent: a second cancel finds nothing
active, or tells the same pilot again, which then has nothing to do.

Orders to pilots are published after the commit, with the operator's
(dispatcher's) broker account: only it may write to ``p3s.control``.  A pilot
that is not alive is refused, not sent an order it would never read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from p3s import topology
from p3s.broker import Outgoing, Publisher
from p3s.config import Settings
from p3s.db import Job, Pilot, Workflow
from p3s.dispatcher.context import Context
from p3s.dispatcher.jobs import end_workflow, finish_job
from p3s.dispatcher.reaper import LIVE_PILOT_STATES
from p3s.errors import ConfigError, NotFound, P3SError
from p3s.messages import Control, encode
from p3s.states import JobState, PilotState

log = logging.getLogger(__name__)

CANCELLED = "cancelled by operator"
ACTIONS = ("drain", "stop", "stop_now")


class NotAlive(P3SError):
    """The pilots named are not alive: there is nobody to give the order to."""


@dataclass
class Cancellation:
    """What a cancel did: jobs ended now, running jobs whose pilots are told, and jobs already over."""

    what: str  # "workflow 12" or "job 34"
    dropped: list[int] = field(default_factory=list)
    told: list[tuple[int, str]] = field(default_factory=list)  # (job id, pilot id)
    over: list[tuple[int, str]] = field(default_factory=list)  # (job id, its terminal state)
    controls: list[Control] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"job {j}: dropped ({CANCELLED})" for j in self.dropped]
        out += [f"job {j}: running on pilot {p}: told to end its payload; its pilot reports it" for j, p in self.told]
        if not self.dropped and not self.told:
            out.append(f"{self.what}: nothing left to cancel" + (
                f" ({', '.join(f'job {j} {s}' for j, s in self.over)})" if self.over else ""))
        return out


def _locked_workflow(session: Session, workflow_id: int) -> Workflow:
    return session.scalars(
        select(Workflow).where(Workflow.id == workflow_id).with_for_update().execution_options(populate_existing=True)
    ).one()


def _locked_jobs(session: Session, workflow_id: int) -> dict[str, Job]:
    # Locked, so a `running` report committed meanwhile is not overwritten by a drop:
    # the dispatcher's conditional UPDATE waits, then finds the job no longer queued.
    rows = session.scalars(
        select(Job).where(Job.workflow_id == workflow_id).order_by(Job.id).with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    return {j.node: j for j in rows}


def _descendants(ctx: Context, session: Session, wf: Workflow, node: str) -> set[str]:
    tpl = ctx.catalogue.snapshot(session, wf.template_id)
    children: dict[str, list[str]] = {}
    for child, parents in tpl.parents_map().items():
        for parent in parents:
            children.setdefault(parent, []).append(child)
    found: set[str] = set()
    todo = list(children.get(node, []))
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(children.get(name, []))
    return found


def _cancel(session: Session, ctx: Context, wf: Workflow, jobs: dict[str, Job], nodes: Iterable[str],
            result: Cancellation) -> None:
    live = {p.id for p in session.scalars(select(Pilot).where(Pilot.state.in_(LIVE_PILOT_STATES)))}
    for node in nodes:
        job = jobs[node]
        state = JobState(job.state)
        if state.terminal:
            result.over.append((job.id, state.value))
        elif state == JobState.RUNNING and job.pilot_id in live:
            result.told.append((job.id, job.pilot_id))
            result.controls.append(Control("cancel_job", job.pilot_id, job_id=job.id))
        else:
            reason = CANCELLED if state != JobState.RUNNING else f"{CANCELLED} (its pilot {job.pilot_id} is not alive)"
            finish_job(job, JobState.DROPPED, ctx, reason)
            result.dropped.append(job.id)
            job_id = job.id
            ctx.later(lambda job_id=job_id, reason=reason: log.info("job %s: dropped, %s", job_id, reason))
    if result.dropped:
        end_workflow(wf, jobs.values(), ctx)


def cancel_workflow(session: Session, ctx: Context, workflow_id: int) -> Cancellation:
    """Cancel every active job of a workflow; the caller commits, then calls :func:`send`."""
    if session.get(Workflow, workflow_id) is None:
        raise NotFound(f"no workflow {workflow_id}")
    wf = _locked_workflow(session, workflow_id)
    jobs = _locked_jobs(session, workflow_id)
    result = Cancellation(f"workflow {workflow_id}")
    _cancel(session, ctx, wf, jobs, list(jobs), result)
    return result


def cancel_job(session: Session, ctx: Context, job_id: int) -> Cancellation:
    """Cancel a job and its descendants; the caller commits, then calls :func:`send`."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    wf = _locked_workflow(session, job.workflow_id)
    jobs = _locked_jobs(session, job.workflow_id)
    result = Cancellation(f"job {job_id}")
    job = jobs[job.node]
    if JobState(job.state).terminal:
        # Over already: its descendants are the dispatcher's to settle, not this cancel's.
        result.over.append((job.id, job.state))
        return result
    below = _descendants(ctx, session, wf, job.node)
    _cancel(session, ctx, wf, jobs, [job.node, *sorted(below, key=lambda n: jobs[n].id)], result)
    return result


def cancel_and_tell(session: Session, settings: Settings, what: str, ident: int,
                    in_process: bool = False) -> Cancellation:
    """Cancel a workflow or a job (``what``) in one transaction, then tell the pilots of its running jobs.

    ``p3s cancel`` and the web's cancel buttons both come here; ``in_process``: see :func:`send`.
    """
    if what not in ("workflow", "job"):
        raise ValueError(f"cancel a workflow or a job, not {what!r}")
    ctx = Context(settings)
    with session, session.begin():
        result = (cancel_workflow if what == "workflow" else cancel_job)(session, ctx, ident)
    ctx.committed()
    # After the commit: a pilot told to end a payload must find its job still on record as running.
    send(settings, result.controls, in_process)
    return result


def pilot_orders(session: Session, action: str, pilot_id: str | None = None, host: str | None = None
                 ) -> tuple[list[Control], list[str]]:
    """The orders for the live pilots named (by id or host), and a line for each one not alive.

    NotFound if no pilot of that id or host is on record; NotAlive if none of them is alive.
    """
    if action not in ACTIONS:
        raise ValueError(f"not a pilot order: {action!r}")
    if (pilot_id is None) == (host is None):
        raise ValueError("name a pilot id or a host, one of them")
    where = Pilot.id == pilot_id if pilot_id is not None else Pilot.host == host
    pilots = session.scalars(select(Pilot).where(where).order_by(Pilot.id)).all()
    named = f"pilot {pilot_id}" if pilot_id is not None else f"host {host}"
    if not pilots:
        raise NotFound(f"no {named} on record (see p3s pilots)")
    alive = [p for p in pilots if p.state in LIVE_PILOT_STATES]
    gone = [f"pilot {p.id}: not alive ({_shown_state(p)}); nothing sent" for p in pilots if p not in alive]
    if not alive:
        if pilot_id is not None:
            raise NotAlive(f"pilot {pilot_id} is not alive ({_shown_state(pilots[0])}); nothing sent")
        raise NotAlive(f"host {host}: no pilot alive there ({len(pilots)} on record, none alive); nothing sent")
    orders = [Control(action, p.id, host=host or "") for p in alive]
    return orders, gone


def _shown_state(pilot: Pilot) -> str:
    if pilot.state == PilotState.STOPPED and pilot.problem:
        return f"{pilot.state}, {pilot.problem}"
    return str(pilot.state)


def send(settings: Settings, controls: list[Control], in_process: bool = False) -> int:
    """Publish ``controls`` to p3s.control, confirmed; how many were sent.

    On the embedded broker only a caller in the pipeline's own process
    (``in_process``: the web monitor of ``p3s run --web``) reaches the pilots.
    """
    if not controls:
        return 0
    if settings.broker.embedded and not in_process:
        raise ConfigError(
            "pilots on the embedded broker can be told nothing from another process: "
            "set P3S_BROKER_URL to the broker the pilots use"
        )
    publisher = Publisher(settings.broker, exchanges=[topology.control_exchange], keepalive=False)
    try:
        sent = publisher.publish(
            Outgoing(topology.control_exchange, topology.control_routing_key(c.pilot_id), encode(c))
            for c in controls
        )
    finally:
        publisher.close()
    for c in controls:
        log.info("pilot %s: told to %s%s", c.pilot_id, c.action, f" job {c.job_id}" if c.job_id else "")
    return sent
