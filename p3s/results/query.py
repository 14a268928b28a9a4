"""Reading results back: plain dicts for ``p3s results --json`` and the web service's pages.

Every function takes a session and returns JSON-ready data (no ORM rows), so
the command line and a web page show the same objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from p3s.db import Alarm, ResultFile, ResultMetric, ResultRecord
from p3s.results.manifest import resolve_entry

IN_CHUNK = 1000


def chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    """``ids`` in slices that keep an IN list under every database's limit on bind parameters."""
    for i in range(0, len(ids), IN_CHUNK):
        yield ids[i : i + IN_CHUNK]


def metric_dict(m: ResultMetric) -> dict[str, Any]:
    return {"name": m.name, "value": m.value, "unit": m.unit, "lo": m.lo, "hi": m.hi, "in_range": m.in_range,
            "alarm": m.in_range is False}


def file_dict(f: ResultFile) -> dict[str, Any]:
    return {"id": f.id, "kind": f.kind, "path": f.path, "category": f.category, "caption": f.caption,
            "size": f.size, "sha256": f.sha256}


def result_dict(r: ResultRecord, metrics: Sequence[ResultMetric] = (), files: Sequence[ResultFile] = ()
                ) -> dict[str, Any]:
    return {
        "id": r.id, "job_id": r.job_id, "workflow_id": r.workflow_id, "template": r.template, "node": r.node,
        "file": r.file_name, "stream": r.stream, "run": r.run, "subrun": r.subrun, "seen_at": r.seen_at,
        "recorded_at": r.recorded_at, "age_s": r.age_s, "budget_s": r.budget_s, "on_time": r.on_time,
        "outdir": r.outdir, "labels": dict(r.labels or {}),
        "warnings": [w for w in r.warnings.split("\n") if w],
        "metrics": [metric_dict(m) for m in metrics], "files": [file_dict(f) for f in files],
    }


def _with_parts(session: Session, records: Sequence[ResultRecord]) -> list[dict[str, Any]]:
    """The records as dicts with their metrics and files, in two queries per thousand records."""
    ids = [r.id for r in records]
    metrics: dict[int, list[ResultMetric]] = {i: [] for i in ids}
    files: dict[int, list[ResultFile]] = {i: [] for i in ids}
    for chunk in chunks(ids):
        for m in session.scalars(select(ResultMetric).where(ResultMetric.result_id.in_(chunk))
                                 .order_by(ResultMetric.id)):
            metrics[m.result_id].append(m)
        for f in session.scalars(select(ResultFile).where(ResultFile.result_id.in_(chunk)).order_by(ResultFile.id)):
            files[f.result_id].append(f)
    return [result_dict(r, metrics[r.id], files[r.id]) for r in records]


def list_results(session: Session, template: str | None = None, run: int | None = None,
                 subrun: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Results newest first, each with its metrics and files; only a template's, a run's, a subrun's if given."""
    query = select(ResultRecord)
    if template is not None:
        query = query.where(ResultRecord.template == template)
    if run is not None:
        query = query.where(ResultRecord.run == run)
    if subrun is not None:
        query = query.where(ResultRecord.subrun == subrun)
    records = session.scalars(query.order_by(ResultRecord.id.desc()).limit(limit)).all()
    return _with_parts(session, records)


def get_result(session: Session, result_id: int) -> dict[str, Any] | None:
    record = session.get(ResultRecord, result_id)
    return None if record is None else _with_parts(session, [record])[0]


def list_alarms(session: Session, template: str | None = None, raised_only: bool = True) -> list[dict[str, Any]]:
    """Alarms by template and metric: those raised now, or (``raised_only=False``) every one ever judged."""
    query = select(Alarm)
    if raised_only:
        query = query.where(Alarm.raised.is_(True))
    if template is not None:
        query = query.where(Alarm.template == template)
    return [
        {"template": a.template, "metric": a.metric, "raised": a.raised, "value": a.value, "lo": a.lo, "hi": a.hi,
         "result_id": a.result_id, "raised_at": a.raised_at, "cleared_at": a.cleared_at}
        for a in session.scalars(query.order_by(Alarm.template, Alarm.metric))
    ]


def runs(session: Session, template: str) -> list[dict[str, Any]]:
    """The runs and subruns of a template's results, newest run first, with how many results each has."""
    rows = session.execute(
        select(ResultRecord.run, ResultRecord.subrun, func.count(), func.max(ResultRecord.recorded_at))
        .where(ResultRecord.template == template, ResultRecord.run.is_not(None))
        .group_by(ResultRecord.run, ResultRecord.subrun)
        .order_by(ResultRecord.run.desc(), ResultRecord.subrun.desc())
    ).all()
    return [{"run": r, "subrun": s, "results": n, "recorded_at": t} for r, s, n, t in rows]


def newest_by_category(session: Session, template: str, run: int | None = None) -> list[dict[str, Any]]:
    """For each category of a template's plots and files, the newest result's entry (of ``run``, if given).

    Each item: the file's dict plus the result's id, run, subrun, file name,
    seen and recorded times, age and whether it was on time.
    """
    newest = select(ResultFile.category, func.max(ResultFile.result_id).label("result_id")).where(
        ResultFile.template == template)
    if run is not None:
        newest = newest.join(ResultRecord, ResultRecord.id == ResultFile.result_id).where(ResultRecord.run == run)
    newest_q = newest.group_by(ResultFile.category).subquery()
    rows = session.execute(
        select(ResultFile, ResultRecord)
        .join(newest_q, (ResultFile.category == newest_q.c.category) & (ResultFile.result_id == newest_q.c.result_id))
        .join(ResultRecord, ResultRecord.id == ResultFile.result_id)
        .where(ResultFile.template == template)
        .order_by(ResultFile.category, ResultFile.id)
    ).all()
    out = []
    for f, r in rows:
        item = file_dict(f)
        item.update({"result_id": r.id, "run": r.run, "subrun": r.subrun, "file": r.file_name, "seen_at": r.seen_at,
                     "recorded_at": r.recorded_at, "age_s": r.age_s, "on_time": r.on_time})
        out.append(item)
    return out


def metric_history(session: Session, template: str, metric: str, limit: int = 1000) -> list[dict[str, Any]]:
    """A metric's values across a template's results, oldest first (the newest ``limit``), with their ranges."""
    rows = session.execute(
        select(ResultMetric, ResultRecord)
        .join(ResultRecord, ResultRecord.id == ResultMetric.result_id)
        .where(ResultMetric.template == template, ResultMetric.name == metric)
        .order_by(ResultMetric.result_id.desc())
        .limit(limit)
    ).all()
    return [{**metric_dict(m), "result_id": r.id, "run": r.run, "subrun": r.subrun, "recorded_at": r.recorded_at,
             "seen_at": r.seen_at} for m, r in reversed(rows)]


def metric_names(session: Session, template: str) -> list[str]:
    return list(session.scalars(select(ResultMetric.name).where(ResultMetric.template == template)
                                .distinct().order_by(ResultMetric.name)))


def file_on_disk(session: Session, file_id: int) -> Path | None:
    """Where a result's plot or file is, if it is still a regular file inside its result's output directory.

    For whoever serves the files (the web service): the path recorded is
    judged again now, so a symlink put in since, or a path that leaves the
    output directory, serves nothing.
    """
    row = session.execute(
        select(ResultFile.path, ResultRecord.outdir).join(ResultRecord, ResultRecord.id == ResultFile.result_id)
        .where(ResultFile.id == file_id)
    ).first()
    if row is None:
        return None
    path, outdir = row
    if not os.path.isdir(outdir):
        return None
    real, _why = resolve_entry(outdir, path)
    return real
