"""What one batch of reports does in its one transaction.

Several reports on one job see each other's changes: a job's ``running``
report is one UPDATE sent past the ORM; its ``finished`` report, in the same
batch, reads the job the session holds.  If the session were not told of the
first, the second would find the job still queued, never started: its run
time would go unmeasured.

A job that ends frees its stage's slot in the transaction that records its
end, not at the next reap: the dispatcher looks for jobs held back by
``max_running`` when a job of a stage with such a limit ended.  The reaper is
held off here (its turn comes once an hour), so only the report itself can
release the held job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from prometheus_client import REGISTRY

from p3s import db
from p3s.dagengine import parse_graphml
from p3s.dispatcher import admin
from p3s.messages import JobReport
from p3s.states import JobState, WorkflowState
from tests.stack import graphml
from tests.unit.test_dispatcher_linger import Driven, data_event, job_report, take_task


@pytest.fixture
def driven(tmp_path: Path) -> Iterator[Driven]:
    d = Driven(tmp_path, "0")
    try:
        yield d
    finally:
        d.close()


def run_times(template: str, node: str) -> tuple[float, float]:
    """How many run times p3s_run_seconds observed for this stage, and their sum."""
    labels = {"template": template, "node": node}
    return (REGISTRY.get_sample_value("p3s_run_seconds_count", labels) or 0.0,
            REGISTRY.get_sample_value("p3s_run_seconds_sum", labels) or 0.0)


def ended(driven: Driven, job_id: int) -> bool:
    with Session(driven.engine) as s:
        job = s.get(db.Job, job_id)
        return job is not None and JobState(job.state).terminal


def test_a_start_and_an_end_in_one_batch(driven: Driven) -> None:
    with Session(driven.engine) as s, s.begin():
        admin.import_template(s, parse_graphml(graphml({"reco": {"command": "/bin/true"},
                                                        "plots": {"command": "/bin/true"}}, [("reco", "plots")]),
                                               name="two"))
    driven.send(data_event("np04_raw_run000005_0000.dat"))
    driven.turn(2)
    task = take_task(driven.settings)
    driven.commits = 0
    runs = run_times(task.template, task.node)

    driven.send(job_report(JobReport(task.job_id, JobState.RUNNING, "pilot-00", token=task.token, started_at=1001.0,
                                     log="/work/reco.log")),
                job_report(JobReport(task.job_id, JobState.FINISHED, "pilot-00", token=task.token,
                                     ended_at=1002.5, exit_code=0)))
    driven.until(lambda: ended(driven, task.job_id), "the job recorded as ended")
    child = take_task(driven.settings)
    # One transaction for both reports (marking the child's task published is one statement of
    # its own, committed by itself).
    assert driven.commits == 1
    with Session(driven.engine) as s:
        job = s.get(db.Job, task.job_id)
        assert job is not None
        assert (job.state, job.pilot_id, job.started_at, job.ended_at, job.log) == (
            JobState.FINISHED, "pilot-00", 1001.0, 1002.5, "/work/reco.log")
        assert child.node == "plots" and s.get(db.Job, child.job_id).state == JobState.QUEUED
        workflow = s.get(db.Workflow, job.workflow_id)
        assert workflow is not None and workflow.state == WorkflowState.RUNNING
    assert run_times(task.template, task.node) == (runs[0] + 1, runs[1] + 1.5)


def held(driven: Driven) -> list[int]:
    with Session(driven.engine) as s:
        return list(s.scalars(select(db.Job.id).where(db.Job.held.is_(True)).order_by(db.Job.id)))


@pytest.mark.parametrize("end", [JobState.FINISHED, JobState.FAILED])
def test_the_end_of_a_job_of_a_serial_stage_releases_the_one_held_behind_it(driven: Driven, end: JobState) -> None:
    with Session(driven.engine) as s, s.begin():
        admin.import_template(s, parse_graphml(graphml({"dqm": {"command": "/bin/true", "max_running": "1"}}),
                                               name="serial"))
    for n in range(2):
        driven.send(data_event(f"np04_raw_run000003_{n:04d}.dat"))
    driven.until(lambda: len(held(driven)) == 1, "the second file's job held for the stage's one slot")
    first = take_task(driven.settings)
    [waiting] = held(driven)
    assert waiting != first.job_id

    driven.send(job_report(JobReport(first.job_id, JobState.RUNNING, "pilot-00", token=first.token,
                                     started_at=1001.0)))
    driven.send(job_report(JobReport(first.job_id, end, "pilot-00", token=first.token, started_at=1001.0,
                                     ended_at=1002.0, exit_code=0 if end == JobState.FINISHED else 1)))
    driven.until(lambda: not held(driven), "the held job released by the first one's end")
    second = take_task(driven.settings)
    assert second.job_id == waiting
    with Session(driven.engine) as s:
        assert JobState(s.get(db.Job, first.job_id).state) == end
        assert JobState(s.get(db.Job, waiting).state) == JobState.QUEUED
