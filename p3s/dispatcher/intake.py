"""Intake: one decision per data event, and the workflows and root tasks of accepted files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from fnmatch import fnmatchcase
from types import SimpleNamespace
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session

from p3s import metrics
from p3s.config import Settings
from p3s.dagengine import Template
from p3s.db import FileRecord, Job, Workflow
from p3s.dispatcher.catalogue import TemplateRef
from p3s.dispatcher.context import Context
from p3s.dispatcher.jobs import advance, complete_noop, has_slot, make_task, unpublished_tasks
from p3s.dispatcher.sampling import fraction_for, keep
from p3s.messages import DataEvent, Task, new_token, token_hash
from p3s.states import Decision, JobState, WorkflowState

log = logging.getLogger(__name__)

_INSERTS = {model: insert(model.__table__) for model in (FileRecord, Workflow, Job)}
_FILES_BY_NAME = select(FileRecord.id, FileRecord.name, FileRecord.dedup_key, FileRecord.seen_at,
                        FileRecord.source).where(FileRecord.name.in_(bindparam("names", expanding=True)))


def roots_by_stream(settings: Settings) -> dict[str, tuple[str, ...]]:
    """Where each stream's files may be: the locations (and URL prefixes) of its configured sources."""
    roots: dict[str, list[str]] = {}
    for src in settings.sources:
        for root in (src.location, src.url_prefix):
            if root:
                roots.setdefault(src.stream, []).append(root.rstrip("/") or "/")
    return {stream: tuple(r) for stream, r in roots.items()}


def outside_roots(path: str, roots: Sequence[str]) -> bool:
    """True unless ``path`` lies under one of ``roots`` without any ``.``/``..`` step to leave it."""
    parts = path.split("://", 1)[-1].split("/")
    if any(p in (".", "..") for p in parts):
        return True
    return not any(path == root or path.startswith(root if root.endswith("/") else root + "/") for root in roots)


def record_events(
    session: Session, events: Sequence[DataEvent], ctx: Context, refusals: Sequence[str] = ()
) -> list[Task]:
    """Record one decision per event, make the workflows of accepted files, return root tasks.

    ``refusals``, where given, holds for each event the reason it cannot be
    carried (a file name that is not text, say), or "": such a file is
    recorded as ``refused`` with that reason and nothing is made for it.

    An event already recorded (same name, seen_at and source: a redelivery after
    a lost ack) is not counted again; the tasks of its workflows that never
    reached the broker are returned instead, so a dispatcher killed between its
    commit and its publish loses nothing.
    """
    active = ctx.catalogue.active(session)
    roots = roots_by_stream(ctx.settings)
    names = {e.name for e in events}
    known: set[str] = set()
    recorded: dict[tuple[str, float, str], int] = {}
    for file_id, name, dedup_key, seen_at, source in session.connection().execute(
        _FILES_BY_NAME, {"names": list(names)}
    ):
        recorded[(name, seen_at, source)] = file_id
        if dedup_key is not None:
            known.add(dedup_key)

    # First pass: one decision per event, and the templates of accepted files.
    decided: list[tuple[DataEvent, str, bool, str, list[tuple[TemplateRef, Template]]]] = []
    again: set[int] = set()
    for i, ev in enumerate(events):
        key = (ev.name, ev.seen_at, ev.source)
        if key in recorded:
            if recorded[key]:
                again.add(recorded[key])
            log.info("file %s: event delivered again, already recorded", ev.name)
            continue
        recorded[key] = 0
        refusal = refusals[i] if i < len(refusals) else ""
        if not refusal and ev.stream in roots and outside_roots(ev.path, roots[ev.stream]):
            refusal = f"path outside the roots of stream {ev.stream!r}"
        first = ev.name not in known and not refusal
        reason = ""
        matching: list[tuple[TemplateRef, Template]] = []
        if refusal:
            decision, reason = Decision.REFUSED, refusal
        elif not first and not ev.force:
            decision = Decision.DUPLICATE
        elif not ev.force and not keep(ev.name, fraction_for(ctx.settings.sampling, ev.stream, ev.name)):
            decision = Decision.SAMPLED_OUT
        elif ctx.overloaded and not ev.force:
            decision, reason = Decision.SHED, "overload"
        else:
            decision = Decision.ACCEPTED
            matching = [
                (ref, tpl)
                for ref, tpl in active.templates
                if (tpl.name == ev.template if ev.template else fnmatchcase(ev.name, tpl.trigger))
            ]
            if not matching:
                reason = f"template {ev.template!r} not found" if ev.template else "no template matches"
        if first:
            known.add(ev.name)
        decided.append((ev, decision, first, reason, matching))
        ctx.later(metrics.FILES.labels(ev.stream, decision).inc)
        if decision != Decision.ACCEPTED or reason:
            ctx.later(_announce(ev.name, decision, reason))

    # Second pass: plain rows with their ids, roots already in their final state.
    # Plain dicts, not ORM objects: building thousands of instances per batch
    # cost more than the database did.
    allocated = ctx.ids.take(
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
    queued: list[tuple[Template, Any, Any, Any, str]] = []
    advancing: list[int] = []  # workflows with a root no-op: their children may be ready at once
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
            noop_root = False
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
                    "published_at": None,
                    "token_hash": None,
                    "started_at": None,
                    "ended_at": None,
                }
                if node.name in roots and node.noop:
                    finished = SimpleNamespace(**job)
                    complete_noop(finished, ctx)
                    job.update(vars(finished))
                    noop_root = True
                elif node.name in roots:
                    if has_slot(session, tpl, node.name, taken):
                        token = new_token()
                        job.update(
                            state=JobState.QUEUED.value,
                            queued_at=ctx.now,
                            priority=active.priority(tpl, node.name),
                            token_hash=token_hash(token),
                        )
                        queued.append(
                            (tpl, SimpleNamespace(**wf), SimpleNamespace(**job), SimpleNamespace(**file), token)
                        )
                    else:
                        job["held"] = True
                job_rows.append(job)
            if noop_root:
                advancing.append(wf["id"])
            waited = max(0.0, ctx.now - ev.seen_at)
            ctx.later(lambda name=tpl.name, waited=waited: metrics.SEEN_TO_CREATED.labels(name).observe(waited))
    # Core executemany, one per table, parents before children for the foreign keys.
    conn = session.connection()
    for model, rows in ((FileRecord, file_rows), (Workflow, wf_rows), (Job, job_rows)):
        if rows:
            conn.execute(_INSERTS[model], rows)
    tasks = [make_task(session, ctx, tpl, wf, job, file, token) for tpl, wf, job, file, token in queued]
    # Made in this transaction, these workflows are seen by no one else yet: no lock needed.
    for wf_id in advancing:
        wf_row = session.get(Workflow, wf_id)
        assert wf_row is not None
        tasks.extend(advance(session, wf_row, ctx, active))
    if again:
        workflows = set(session.scalars(select(Workflow.id).where(Workflow.file_id.in_(sorted(again)))).all())
        tasks.extend(unpublished_tasks(session, ctx, workflows))
    return tasks


def _announce(name: str, decision: Decision, reason: str) -> Any:
    if decision == Decision.ACCEPTED:
        return lambda: log.warning("file %s: accepted, but %s", name, reason)
    if decision == Decision.REFUSED:
        return lambda: log.warning("file %s: refused, %s", name, reason)
    return lambda: log.info("file %s: %s", name, decision)
