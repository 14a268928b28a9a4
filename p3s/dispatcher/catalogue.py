"""The templates a dispatcher works from: snapshots by id, the active set, stage run times.

One :class:`Catalogue` belongs to one dispatcher and lives as long as it does,
so two dispatchers in one process (or a test's databases) never share a cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from p3s.dagengine import Template
from p3s.db import Job, StagePriority, TemplateRecord
from p3s.states import JobState

EXPECTED_REFRESH_S = 30.0

# Built once: constructing and hashing these statements cost more than running them.
_FINGERPRINT = select(
    select(func.max(TemplateRecord.id)).scalar_subquery(),
    select(func.max(TemplateRecord.deleted_at)).scalar_subquery(),
    select(func.count()).select_from(TemplateRecord).where(TemplateRecord.deleted_at.is_not(None)).scalar_subquery(),
    select(func.max(StagePriority.set_at)).scalar_subquery(),
    select(func.count()).select_from(StagePriority).scalar_subquery(),
)


@dataclass(frozen=True)
class TemplateRef:
    id: int
    name: str
    version: int


@dataclass
class Active:
    """The templates new workflows may be made from, and the operators' stage priorities."""

    templates: list[tuple[TemplateRef, Template]]
    priorities: dict[tuple[str, str], int]

    def priority(self, tpl: Template, node: str) -> int:
        return self.priorities.get((tpl.name, node), tpl.node(node).priority)


class Catalogue:
    """What a dispatcher knows of the templates in its database, read as rarely as possible."""

    def __init__(self) -> None:
        self._snapshots: dict[int, Template] = {}
        self._active: tuple[tuple[object, ...], Active] | None = None
        self._expected: dict[tuple[str, str], tuple[float, float]] = {}

    def snapshot(self, session: Session, template_id: int) -> Template:
        """The template version a workflow was made from; versions never change, so they are kept."""
        tpl = self._snapshots.get(template_id)
        if tpl is None:
            record = session.get(TemplateRecord, template_id)
            if record is None:
                raise LookupError(f"template {template_id} vanished")
            tpl = self._snapshots[template_id] = Template.from_dict(record.spec)
        return tpl

    def active(self, session: Session) -> Active:
        """The active templates and stage priorities, re-read only when either changed.

        One small statement tells whether anything changed since the last batch (a
        new version has a higher id; a deletion sets deleted_at; a priority change
        sets set_at), so the usual batch pays one query instead of two joins.  An
        imported or deleted template and a changed priority take effect with the
        next batch, without a restart.
        """
        fingerprint = tuple(session.connection().execute(_FINGERPRINT).one())
        if self._active is not None and self._active[0] == fingerprint:
            return self._active[1]
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
        active = Active(
            templates=[(TemplateRef(r.id, r.name, r.version), self.snapshot(session, r.id)) for r in records],
            priorities={(p.template, p.node): p.priority for p in session.scalars(select(StagePriority))},
        )
        self._active = (fingerprint, active)
        return active

    def expected_run_time(self, session: Session, template: str, node: str, now: float, sample: int) -> float:
        """The p95 run time of a stage's recent finished jobs (0 with fewer than 5), kept a while.

        Used when a node gives no ``expected_s``, so pilots can refuse a task that
        could no longer finish before its deadline.
        """
        key = (template, node)
        cached = self._expected.get(key)
        if cached is not None and now - cached[1] < EXPECTED_REFRESH_S:
            return cached[0]
        times = sorted(stage_run_times(session, template, node, sample))
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))] if len(times) >= 5 else 0.0
        self._expected[key] = (p95, now)
        return p95


def stage_run_times(session: Session, template: str, node: str, limit: int = 100) -> Iterable[float]:
    rows = session.execute(
        select(Job.ended_at - Job.started_at)
        .where(Job.template == template, Job.node == node, Job.state == JobState.FINISHED)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    return [r[0] for r in rows if r[0] is not None]
