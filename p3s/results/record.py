"""What the dispatcher records of a finished job's results, and the alarms they raise or clear.

Runs inside the transaction that ends the job (STYLE 7): the result, its
metrics, its files and the alarms are committed with the job's end or not at
all, and the alarm gauge and log lines follow the commit (STYLE 16).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from p3s import metrics
from p3s.db import Alarm, FileRecord, Job, ResultFile, ResultMetric, ResultRecord, Workflow
from p3s.results.runs import RunPatterns

log = logging.getLogger(__name__)

REASON_MAX = 65536  # jobs.reason is text; a job's reason stays readable


def effective_range(ranges: Mapping[str, Mapping[str, Any]], template: str, metric: Mapping[str, Any]
                    ) -> tuple[float | None, float | None]:
    """The range a metric is judged by: the config's for this template and metric, else the manifest's."""
    configured = ranges.get(template, {}).get(metric["name"])
    if configured is not None:
        lo, hi = (float(b) for b in configured)
        return (None if lo == float("-inf") else lo), (None if hi == float("inf") else hi)
    return metric.get("lo"), metric.get("hi")


def in_range(value: float, lo: float | None, hi: float | None) -> bool | None:
    """Whether ``value`` lies within [lo, hi]; None where there is no range to judge by."""
    if lo is None and hi is None:
        return None
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def record_result(session: Session, job_id: int, results: Mapping[str, Any], ctx: Any) -> ResultRecord | None:
    """Record the results a finished job's report carried (checked already at the edge); the new result or None.

    A manifest with warnings puts them in the job's reason; one refused whole
    records nothing else.  A second report of the same job records nothing.
    """
    job = session.get(Job, job_id)
    if job is None:
        return None
    if session.scalar(select(ResultRecord.id).where(ResultRecord.job_id == job_id)) is not None:
        return None  # recorded already: its warnings and counts too
    warnings = list(results.get("warnings", []))
    accepted = results.get("accepted", True)
    if warnings:
        note = "results: " + "; ".join(warnings)
        job.reason = (f"{job.reason}; {note}" if job.reason else note)[:REASON_MAX]
        template = job.template
        ctx.later(lambda: log.warning("job %s: results manifest: %s", job_id, "; ".join(warnings)))
        entries = sum(" refused: " in w for w in warnings)  # not "no checksum": that entry is kept
        if accepted and entries:
            ctx.later(lambda: metrics.RESULTS_REFUSED.labels(template, "entry").inc(entries))
        elif not accepted:
            ctx.later(metrics.RESULTS_REFUSED.labels(template, "manifest").inc)
    if not accepted:
        return None
    wf = session.get(Workflow, job.workflow_id)
    assert wf is not None
    file = session.get(FileRecord, wf.file_id)
    assert file is not None
    settings = ctx.settings.results
    run = RunPatterns(settings.run_patterns).parse(file.stream, file.name)
    budget = max(0.0, wf.deadline - wf.seen_at)
    age = max(0.0, ctx.now - wf.seen_at)
    record = ResultRecord(
        job_id=job_id, workflow_id=wf.id, template=job.template, node=job.node, file_name=file.name,
        stream=file.stream, run=run.run, subrun=run.subrun, seen_at=wf.seen_at, recorded_at=ctx.now, age_s=age,
        budget_s=budget, on_time=age <= budget, outdir=ctx.outdir(wf.id, job.node),
        labels=dict(results.get("labels", {})), warnings="\n".join(warnings),
    )
    session.add(record)
    session.flush()  # its id, for the rows below
    judged = []
    for metric in results.get("metrics", []):
        lo, hi = effective_range(settings.ranges, job.template, metric)
        ok = in_range(metric["value"], lo, hi)
        session.add(ResultMetric(result_id=record.id, template=job.template, name=metric["name"],
                                 value=metric["value"], unit=metric.get("unit", ""), lo=lo, hi=hi, in_range=ok))
        if ok is not None:
            judged.append((metric["name"], metric["value"], lo, hi, ok))
    session.add_all(
        ResultFile(result_id=record.id, template=job.template, kind=f["kind"], path=f["path"], category=f["category"],
                   caption=f.get("caption", ""), size=f["size"], sha256=f.get("sha256", ""))
        for f in results.get("files", [])
    )
    for name, value, lo, hi, ok in judged:
        _judge(session, record, name, value, lo, hi, ok, ctx)
    rid, template, run_no = record.id, record.template, record.run
    ctx.later(lambda: log.info("job %s: result %s of %s recorded (run %s)", job_id, rid, template, run_no))
    return record


def _judge(session: Session, record: ResultRecord, name: str, value: float, lo: float | None, hi: float | None,
           ok: bool, ctx: Any) -> None:
    """Raise or clear the alarm of ``record.template``/``name`` by this value, unless a newer file decided it.

    The row is locked, so two dispatchers judging the same metric take turns;
    two inserting its first alarm at once collide on the key, and the batch
    is tried again (the dispatcher retries an IntegrityError).
    """
    template, rid, run, seen_at = record.template, record.id, record.run, record.seen_at
    alarm = session.scalars(
        select(Alarm).where(Alarm.template == template, Alarm.metric == name).with_for_update()
    ).first()
    if alarm is None:
        if ok:
            return  # nothing to clear
        alarm = Alarm(template=template, metric=name, raised=False, value=value, result_id=rid, seen_at=seen_at)
        session.add(alarm)
    elif seen_at < alarm.seen_at:
        return  # the result of an older file, arriving late: the newer one stands
    was = alarm.raised
    alarm.value, alarm.lo, alarm.hi, alarm.result_id, alarm.seen_at = value, lo, hi, rid, seen_at
    alarm.raised = not ok
    if alarm.raised and not was:
        alarm.raised_at, alarm.cleared_at = ctx.now, None
        ctx.later(lambda: log.warning("alarm: %s %s = %g out of range [%s, %s] (result %s, run %s)", template, name,
                                      value, _bound(lo), _bound(hi), rid, run))
    elif was and not alarm.raised:
        alarm.cleared_at = ctx.now
        ctx.later(lambda: log.warning("alarm cleared: %s %s = %g back in range (result %s, run %s)", template, name,
                                      value, rid, run))
    raised = alarm.raised
    ctx.later(lambda: metrics.DQM_ALARM.labels(template, name).set(1 if raised else 0))


def _bound(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def export_alarms(session: Session) -> None:
    """Set the alarm gauge from the table: what another dispatcher decided, or this one before a restart."""
    for template, name, raised in session.execute(select(Alarm.template, Alarm.metric, Alarm.raised)):
        metrics.DQM_ALARM.labels(template, name).set(1 if raised else 0)
