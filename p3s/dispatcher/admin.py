"""Operators' reads and edits of the records: templates, priorities, listings.

These run from the ``p3s`` command on a host with database credentials, the
same credentials as the dispatcher's; pilots and watchers never call them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from p3s import rows as build
from p3s.db import FileRecord, Job, Pilot, StagePriority, TemplateRecord, Workflow
from p3s.errors import NotFound, TemplateError
from p3s.states import PilotState

if TYPE_CHECKING:
    # dagengine brings networkx: the listings, which never need it, start faster without.
    from p3s.dagengine import Template


def _canonical(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def import_template_if_changed(session: Session, tpl: Template) -> tuple[TemplateRecord, bool]:
    """Store ``tpl`` as a new version unless the newest active version says exactly the same.

    Returns the record (the new one, or the unchanged current one) and whether a version was made.
    """
    newest = session.scalars(
        select(TemplateRecord).where(TemplateRecord.name == tpl.name).order_by(TemplateRecord.version.desc()).limit(1)
    ).first()
    if newest is not None and newest.deleted_at is None and _canonical(newest.spec) == _canonical(tpl.to_dict()):
        return newest, False
    return import_template(session, tpl), True


def import_templates(session: Session, templates: list[Template]) -> list[str]:
    """Store each of ``templates`` unless unchanged (``p3s dag import`` and the web's upload); a line each."""
    lines = []
    for tpl in templates:
        record, changed = import_template_if_changed(session, tpl)
        if not changed:
            lines.append(f"template {record.name} version {record.version}: unchanged, no new version")
            continue
        lines.append(
            f"template {record.name} version {record.version}: {len(tpl.nodes)} node(s), "
            f"trigger {record.trigger!r}, budget {record.budget_s:g}s"
        )
    return lines


def import_template(session: Session, tpl: Template) -> TemplateRecord:
    """Store ``tpl`` as the next version of its name; running workflows keep theirs."""
    current = session.scalar(select(func.max(TemplateRecord.version)).where(TemplateRecord.name == tpl.name))
    record = TemplateRecord(
        name=tpl.name,
        version=(current or 0) + 1,
        trigger=tpl.trigger,
        budget_s=tpl.budget_s,
        spec=tpl.to_dict(),
        created_at=time.time(),
        deleted_at=None,
    )
    session.add(record)
    session.flush()
    return record


def find_template(session: Session, name: str, version: int | None = None) -> TemplateRecord:
    """The newest (or the given) version of a template, deleted or not."""
    query = select(TemplateRecord).where(TemplateRecord.name == name)
    if version is not None:
        query = query.where(TemplateRecord.version == version)
    record = session.scalars(query.order_by(TemplateRecord.version.desc()).limit(1)).first()
    if record is None:
        raise NotFound(f"no template named {name!r}" + (f" with version {version}" if version else ""))
    return record


def delete_template(session: Session, name: str) -> int:
    """Stop new workflows from ``name`` at once; its versions stay for the history."""
    records = session.scalars(
        select(TemplateRecord).where(TemplateRecord.name == name, TemplateRecord.deleted_at.is_(None))
    ).all()
    if not records:
        raise NotFound(f"no active template named {name!r}")
    now = time.time()
    for record in records:
        record.deleted_at = now
    return len(records)


def list_templates(session: Session, include_deleted: bool = False) -> list[dict[str, Any]]:
    query = select(*_columns(TemplateRecord, build.TEMPLATE_COLUMNS), TemplateRecord.spec).order_by(
        TemplateRecord.name, TemplateRecord.version
    )
    return build.template_rows(
        ({**r, "nodes": len(r["spec"].get("nodes", []))} for r in session.execute(query).mappings()), include_deleted
    )


def _columns(table: Any, names: tuple[str, ...]) -> list[Any]:
    """The columns of ``table`` that a listing of :mod:`p3s.rows` reads, by their names there."""
    return [getattr(table, name) for name in names]


def find_active_template(session: Session, name: str) -> TemplateRecord:
    """The newest version of ``name`` if it is not deleted; NotFound naming the active templates if not."""
    record = session.scalars(
        select(TemplateRecord).where(TemplateRecord.name == name).order_by(TemplateRecord.version.desc()).limit(1)
    ).first()
    if record is None or record.deleted_at is not None:
        names = [r["name"] for r in list_templates(session)]
        why = "no template" if record is None else "only a deleted template"
        raise NotFound(f"{why} named {name!r}; active templates: {', '.join(names) or 'none'}")
    return record


def template_queues(session: Session) -> dict[str, list[str]]:
    """Every task queue the active templates' stages use, with the templates using each."""
    queues: dict[str, list[str]] = {}
    for r in session.scalars(
        select(TemplateRecord).where(TemplateRecord.deleted_at.is_(None)).order_by(TemplateRecord.name)
    ):
        newest = session.scalar(select(func.max(TemplateRecord.version)).where(TemplateRecord.name == r.name))
        if r.version != newest:
            continue
        for node in r.spec.get("nodes", []):
            if node.get("noop"):
                continue  # runs nothing, on no queue
            users = queues.setdefault(str(node.get("queue") or "default"), [])
            if r.name not in users:
                users.append(r.name)
    return queues


def set_priority(session: Session, template: str, node: str, priority: int) -> None:
    """Give a stage a new priority for every task of it enqueued from now on."""
    from p3s.dagengine import Template

    if not 0 <= priority <= 9:
        raise TemplateError(f"priority must be from 0 to 9, got {priority}")
    record = find_template(session, template)
    tpl = Template.from_dict(record.spec)
    tpl.node(node)  # raises, naming the node, if the stage does not exist
    row = session.get(StagePriority, (template, node))
    if row is None:
        session.add(StagePriority(template=template, node=node, priority=priority, set_at=time.time()))
    else:
        row.priority = priority
        row.set_at = time.time()


def list_priorities(session: Session) -> list[dict[str, Any]]:
    """Every stage of every active template with its effective priority."""
    from p3s.dagengine import Template

    overrides = {(p.template, p.node): p for p in session.scalars(select(StagePriority))}
    out = []
    for entry in list_templates(session):
        tpl = Template.from_dict(find_template(session, entry["name"]).spec)
        for node in tpl.nodes:
            o = overrides.get((tpl.name, node.name))
            out.append(
                {
                    "template": tpl.name,
                    "node": node.name,
                    "priority": o.priority if o else node.priority,
                    "template_priority": node.priority,
                    "set_at": o.set_at if o else None,
                }
            )
    return out


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its own ``%``, ``_`` and ``\\`` taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def list_files(
    session: Session,
    limit: int = 100,
    name: str | None = None,
    decision: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> list[dict[str, Any]]:
    """Files, newest first; ``name`` matches part of the name, ``since``/``until`` the time received."""
    query = select(*_columns(FileRecord, build.FILE_COLUMNS))
    if name:
        query = query.where(FileRecord.name.like(_like(name), escape="\\"))
    if decision:
        query = query.where(FileRecord.decision == decision)
    if since is not None:
        query = query.where(FileRecord.received_at >= since)
    if until is not None:
        query = query.where(FileRecord.received_at < until)
    if since is None and until is None:
        order = [FileRecord.id.desc()]
    else:
        # Newest received first: a day weeks back is read from the time index, where by id PostgreSQL walked
        # the newer files first, not knowing that ids and times rise together (73 ms on four weeks of files).
        order = [FileRecord.received_at.desc(), FileRecord.id.desc()]
    rows = session.execute(query.order_by(*order).limit(limit)).mappings().all()
    # Workflows counted for the files shown only: never a whole table.
    counts: dict[int, int] = {}
    if rows:
        counts = dict(
            session.execute(
                select(Workflow.file_id, func.count())
                .where(Workflow.file_id.in_([f["id"] for f in rows]))
                .group_by(Workflow.file_id)
            ).all()
        )
    return [build.file_row(f, counts.get(f["id"], 0)) for f in rows]


def list_workflows(
    session: Session,
    limit: int = 100,
    state: str | None = None,
    template: str | None = None,
    workflow_id: int | None = None,
) -> list[dict[str, Any]]:
    query = select(*_columns(Workflow, build.WORKFLOW_COLUMNS), FileRecord.path).join(
        FileRecord, Workflow.file_id == FileRecord.id
    )
    if state:
        query = query.where(Workflow.state == state)
    if template:
        query = query.where(Workflow.template == template)
    if workflow_id is not None:
        query = query.where(Workflow.id == workflow_id)
    return [build.workflow_row(r) for r in session.execute(query.order_by(Workflow.id.desc()).limit(limit)).mappings()]


def list_jobs(
    session: Session,
    limit: int = 100,
    state: str | None = None,
    workflow_id: int | None = None,
    template: str | None = None,
    node: str | None = None,
    pilot_id: str | None = None,
    job_id: int | None = None,
) -> list[dict[str, Any]]:
    query = (
        select(*_columns(Job, build.JOB_COLUMNS), FileRecord.path, Workflow.seen_at)
        .join(Workflow, Job.workflow_id == Workflow.id)
        .join(FileRecord, Workflow.file_id == FileRecord.id)
    )
    if state:
        query = query.where(Job.state == state)
    if workflow_id is not None:
        query = query.where(Job.workflow_id == workflow_id)
    if template:
        query = query.where(Job.template == template)
    if node:
        query = query.where(Job.node == node)
    if pilot_id:
        query = query.where(Job.pilot_id == pilot_id)
    if job_id is not None:
        query = query.where(Job.id == job_id)
    return [build.job_row(r) for r in session.execute(query.order_by(Job.id.desc()).limit(limit)).mappings()]


def list_pilots(session: Session, limit: int = 100) -> list[dict[str, Any]]:
    """Pilots, newest heard from first; a pilot's job is the one it reported running.

    The running report of a job arrives the moment the pilot starts it, a
    heartbeat only some seconds later: the job is shown from the first.
    """
    rows = session.execute(
        select(Pilot.id, Pilot.host, Pilot.pid, Pilot.queues, Pilot.state, Pilot.job_id, Pilot.jobs_done,
               Pilot.started_at, Pilot.last_seen, Pilot.problem)
        .order_by(Pilot.last_seen.desc())
        .limit(limit)
    ).all()
    ids = [p.id for p in rows]
    running: dict[str, int] = {}
    if ids:
        for job_id, pilot_id in session.execute(
            select(Job.id, Job.pilot_id).where(Job.state == "running", Job.pilot_id.in_(ids)).order_by(Job.id)
        ):
            running[pilot_id] = job_id
    out = []
    for p in rows:
        live = p.state in (PilotState.IDLE, PilotState.BUSY)
        job_id = running.get(p.id) if live else None
        out.append(
            {
                "id": p.id,
                "host": p.host,
                "pid": p.pid,
                "queues": p.queues,
                "state": PilotState.BUSY.value if job_id is not None else p.state,
                "job_id": job_id if job_id is not None else (p.job_id if live else None),
                "jobs_done": p.jobs_done,
                "started_at": p.started_at,
                "last_seen": p.last_seen,
                "problem": p.problem,
            }
        )
    return out


def mark_pilots_stopped(session: Session, pilot_ids: list[str], now: float) -> int:
    """Record pilots known to have stopped (their process ended) as ``stopped``; how many changed."""
    result = session.execute(
        update(Pilot)
        .where(Pilot.id.in_(pilot_ids), Pilot.state.not_in([PilotState.STOPPED, PilotState.LOST]))
        .values(state=PilotState.STOPPED, job_id=None, last_seen=now)
    )
    return int(result.rowcount or 0)


def job_log_info(session: Session, job_id: int) -> dict[str, Any]:
    """What ``p3s logs`` needs of a job: its state, its recorded log path, its pilot's host."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    host = session.scalar(select(Pilot.host).where(Pilot.id == job.pilot_id)) if job.pilot_id else None
    return {
        "id": job.id,
        "workflow_id": job.workflow_id,
        "node": job.node,
        "state": job.state,
        "log": job.log,
        "pilot_id": job.pilot_id,
        "host": host or "",
    }


def log_candidates(job: dict[str, Any], log_root: Path) -> list[Path]:
    """Where a job's log may be read from here: the path its pilot recorded, then the same file under
    this host's ``log_root`` (the shared log root mounted elsewhere)."""
    out: list[Path] = []
    if job["log"]:
        out.append(Path(job["log"]))
    local = Path(log_root) / str(job["workflow_id"]) / f"{job['id']}-{job['node']}.log"
    if local not in out:
        out.append(local)
    return out
