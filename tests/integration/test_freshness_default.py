"""Fresh by default: under an overload, with no setting at all, no task starts that cannot finish in time.

RabbitMQ + PostgreSQL, the shipped defaults (no ``max_queue_length``): the
dispatcher's admission bounds the queue from the live pilot, the stage's
expected run time and the budget.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, graphml, make_settings, probe_command, terminal_jobs, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

FILES = 40
RUN_S = 0.5
# The pilot admits a task when the time left covers the stage's expected run time; the
# payload itself starts later, after the pilot has prepared it and an interpreter has
# started, which on a loaded host has taken up to about half a second.  The stage
# declares that start in its expected run time, as an operator declares what a job
# really costs, so "finishes in time" is judged on the payload's own clock.
START_S = 1.0
EXPECTED_S = RUN_S + START_S
BUDGET_S = 12.0


@pytest.fixture
def stack(tmp_path: Path, broker_url: str, database_url: str) -> Iterator[tuple[Stack, Path]]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = make_settings(tmp_path, broker_url, database_url)
    assert settings.broker.max_queue_length == 0, "the shipped default"
    s = Stack(settings, watch=watch, pilots=1).start()
    try:
        yield s, watch
    finally:
        s.stop()


def test_an_overload_with_the_default_settings_starts_nothing_that_cannot_finish(stack, tmp_path: Path) -> None:
    stack, watch = stack
    stack.import_template(graphml({"dqm": {"command": probe_command("--sleep", str(RUN_S)),
                                           "expected_s": str(EXPECTED_S)}},
                                  budget_s=BUDGET_S, name="fresh"), "fresh")
    wait_for(lambda: [p for p in stack.pilots() if p["state"] == "idle"], timeout=15, what="the pilot to register")
    # 40 files at once: 20 s of work for one pilot against a 12 s budget.
    for i in range(FILES):
        (watch / f"run{i:03d}.dat").write_bytes(b"x")
    jobs = wait_for(lambda: terminal_jobs(stack, FILES), timeout=30, what="every job to end")

    files = stack.files()
    assert len(files) == FILES and {f["decision"] for f in files} == {"accepted"}, "every file one decision"
    states = [j["state"] for j in jobs]
    assert set(states) <= {"finished", "dropped", "expired"}, states
    for j in jobs:
        if j["state"] != "finished":
            assert j["reason"], f"job {j['id']} {j['state']} without a reason"
    dropped = [j for j in jobs if j["state"] == "dropped"]
    assert dropped and all(j["reason"].startswith("overload") for j in dropped), "cut at admission, counted"
    assert states.count("finished") >= 3, states
    started = [j for j in jobs if j["started_at"] is not None]
    for j in started:
        assert j["started_at"] + RUN_S <= j["deadline"], f"job {j['id']} started too late to finish in time"
        record = json.loads((Path(stack.settings.output_path) / str(j["workflow_id"]) / "dqm" /
                             "probe.json").read_text())
        assert record["started"] + RUN_S <= j["deadline"], f"job {j['id']}: its payload started too late"
    never_ran = [j for j in jobs if j["state"] == "dropped"]
    assert all(j["started_at"] is None for j in never_ran)

    report = stack.audit(grace_s=30)
    assert report.ok, report.problems
