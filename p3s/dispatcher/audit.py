"""``p3s audit``: prove the books balance, or say exactly where they do not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from p3s.db import FileRecord, Job, Pilot, Workflow
from p3s.states import ACTIVE_JOB_STATES, TERMINAL_JOB_STATES, Decision, JobState, PilotState, WorkflowState

MAX_LISTED = 20  # problems of one kind listed by name; the rest are counted


@dataclass
class Audit:
    """Counts per stream and the problems found; ``ok`` when there are none."""

    streams: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def _problem(self, kind: str, items: list[str]) -> None:
        if not items:
            return
        shown = items[:MAX_LISTED]
        more = f" (and {len(items) - len(shown)} more)" if len(items) > len(shown) else ""
        self.problems.append(f"{kind}: {len(items)}{more}: " + "; ".join(shown))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "streams": self.streams, "jobs": self.jobs, "problems": self.problems}


def run_audit(session: Session, now: float, grace_s: float) -> Audit:
    """Check every invariant p3s promises about its records."""
    report = Audit()
    decisions = [d.value for d in Decision]

    # Every file seen has exactly one of the four decisions.
    by_stream: dict[str, dict[str, int]] = {}
    for stream, decision, count in session.execute(
        select(FileRecord.stream, FileRecord.decision, func.count()).group_by(FileRecord.stream, FileRecord.decision)
    ):
        by_stream.setdefault(stream, {})[decision] = count
    for stream, counts in sorted(by_stream.items()):
        seen = sum(counts.values())
        row = {"stream": stream, "seen": seen, **{d: counts.get(d, 0) for d in decisions}}
        report.streams.append(row)
        unknown = sorted(set(counts) - set(decisions))
        if unknown or seen != sum(row[d] for d in decisions):
            report._problem(f"stream {stream}: files without one of the {len(decisions)} decisions", unknown)

    # An accepted file has a workflow, or says why not.
    orphans = session.scalars(
        select(FileRecord.name)
        .outerjoin(Workflow, Workflow.file_id == FileRecord.id)
        .where(FileRecord.decision == Decision.ACCEPTED, Workflow.id.is_(None), FileRecord.reason == "")
        .limit(1000)
    ).all()
    report._problem("accepted files with no workflow and no reason", list(orphans))

    for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        report.jobs[state] = count
    unknown_states = sorted(set(report.jobs) - {s.value for s in JobState})
    report._problem("jobs in an unknown state", unknown_states)

    # No job outside a terminal state past its deadline plus the grace.
    stale = session.execute(
        select(Job.id, Job.node, Job.state, Job.deadline)
        .where(Job.state.in_([s.value for s in ACTIVE_JOB_STATES]), Job.deadline < now - grace_s)
        .order_by(Job.id)
        .limit(1000)
    ).all()
    report._problem(
        f"jobs still active more than {grace_s:g}s past their deadline",
        [f"job {i} ({node}) {state} {now - dl:.0f}s late" for i, node, state, dl in stale],
    )

    # A deadline is a time: a NaN or an infinity would never be reaped.  (PostgreSQL
    # sorts NaN above infinity; SQLite stores NaN as NULL.)
    endless = session.scalars(
        select(Job.id)
        .where(or_(Job.deadline.is_(None), Job.deadline >= float("inf"), Job.deadline <= float("-inf")))
        .order_by(Job.id)
        .limit(1000)
    ).all()
    report._problem("jobs with a deadline that is not a finite time", [f"job {i}" for i in endless])

    # A queued job's task reached the broker, or the job will end saying it did not.
    unconfirmed = session.scalars(
        select(Job.id)
        .where(Job.state == JobState.QUEUED, Job.published_at.is_(None), Job.queued_at < now - grace_s)
        .order_by(Job.id)
        .limit(1000)
    ).all()
    report._problem(
        f"jobs queued more than {grace_s:g}s ago whose task the broker never confirmed",
        [f"job {i}" for i in unconfirmed],
    )

    # A terminal job says when it ended; a dropped one says why.
    no_end = session.scalars(
        select(Job.id).where(Job.state.in_([s.value for s in TERMINAL_JOB_STATES]), Job.ended_at.is_(None)).limit(1000)
    ).all()
    report._problem("terminal jobs with no end time", [f"job {i}" for i in no_end])
    no_reason = session.scalars(
        select(Job.id).where(Job.state == JobState.DROPPED, Job.reason == "").limit(1000)
    ).all()
    report._problem("dropped jobs with no reason", [f"job {i}" for i in no_reason])

    # A job still running on a pilot declared lost would never end.
    on_lost = session.scalars(
        select(Job.id)
        .join(Pilot, Pilot.id == Job.pilot_id)
        .where(Job.state == JobState.RUNNING, Pilot.state == PilotState.LOST)
        .limit(1000)
    ).all()
    report._problem("jobs running on a lost pilot", [f"job {i}" for i in on_lost])

    # A workflow's state agrees with its jobs.
    active = case((Job.state.in_([s.value for s in ACTIVE_JOB_STATES]), 1), else_=0)
    finished = case((Job.state == JobState.FINISHED, 1), else_=0)
    rows = session.execute(
        select(Workflow.id, Workflow.state, func.count(Job.id), func.sum(active), func.sum(finished))
        .outerjoin(Job, Job.workflow_id == Workflow.id)
        .group_by(Workflow.id, Workflow.state)
    ).all()
    wrong = []
    for wf_id, state, total, n_active, n_finished in rows:
        if total == 0:
            wrong.append(f"workflow {wf_id} has no jobs")
            continue
        expected = (
            WorkflowState.RUNNING
            if n_active
            else WorkflowState.FINISHED
            if n_finished == total
            else WorkflowState.INCOMPLETE
        )
        if state != expected:
            wrong.append(f"workflow {wf_id} is {state} but its jobs say {expected}")
    report._problem("workflows whose state disagrees with their jobs", wrong)
    return report
