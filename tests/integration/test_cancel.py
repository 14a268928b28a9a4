"""``p3s cancel workflow|job ID`` on RabbitMQ + PostgreSQL.

Pending and queued jobs end ``dropped`` with the reason ``cancelled by
operator`` at once, descendants too; a running job's pilot is told over the
broker, ends the payload with everything it started, and reports the job
(with its token, like every report); the pilot then goes on.  Cancelling
again changes nothing, and the audit still balances.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_pilot_control import finish, gone, p3s, pilot, probe_record, registered, running_job
from tests.stack import Stack, graphml, make_settings, probe_command, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

CANCELLED = "cancelled by operator"


@pytest.fixture
def stack(tmp_path: Path, broker_url: str, database_url: str) -> Iterator[tuple[Stack, Path]]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    s = Stack(make_settings(tmp_path, broker_url, database_url), watch=watch, pilots=0).start()
    try:
        yield s, watch
    finally:
        s.stop()


def by_node(stack: Stack, workflow_id: int) -> dict[str, dict[str, Any]]:
    return {j["node"]: j for j in stack.jobs() if j["workflow_id"] == workflow_id}


def workflow_state(stack: Stack, workflow_id: int) -> str:
    return next(w["state"] for w in stack.workflows() if w["id"] == workflow_id)


def test_cancel_workflow_ends_the_running_payload_and_drops_the_rest(stack: tuple[Stack, Path]) -> None:
    s, watch = stack
    s.import_template(graphml(
        {"a": {"command": probe_command("--grandchild", "--sleep", "120")},
         "b": {"command": probe_command()}, "c": {"command": probe_command()}},
        edges=[("a", "b"), ("b", "c")]))
    proc = pilot(s, "--id", "worker")
    try:
        registered(s, "worker")
        (watch / "one.dat").write_bytes(b"x")
        job = running_job(s)
        record = probe_record(s)
        wf = job["workflow_id"]
        done = p3s(s, "cancel", "workflow", str(wf))
        assert done.returncode == 0, done.stderr
        jobs = by_node(s, wf)
        assert f"job {jobs['a']['id']}: running on pilot worker: told to end its payload" in done.stdout
        assert f"job {jobs['b']['id']}: dropped ({CANCELLED})" in done.stdout
        assert {n: (j["state"], j["reason"]) for n, j in jobs.items() if n != "a"} == {
            "b": ("dropped", CANCELLED), "c": ("dropped", CANCELLED)}
        wait_for(lambda: by_node(s, wf)["a"]["state"] != "running", what="the pilot's report")
        assert (by_node(s, wf)["a"]["state"], by_node(s, wf)["a"]["reason"]) == ("dropped", CANCELLED)
        wait_for(lambda: gone(record["pid"]) and gone(record["grandchild"]), timeout=10,
                 what="the payload and its child gone")
        wait_for(lambda: workflow_state(s, wf) == "incomplete", what="the workflow ended")

        # Idempotent: nothing is left, nothing changes.
        again = p3s(s, "cancel", "workflow", str(wf))
        assert again.returncode == 0, again.stderr
        assert "nothing left to cancel" in again.stdout

        # The pilot goes on: the next file's first job runs on it, and `cancel job` ends that one.
        (watch / "two.dat").write_bytes(b"x")
        second = wait_for(lambda: next((j for j in s.jobs() if j["workflow_id"] != wf and j["node"] == "a"
                                        and j["state"] == "running"), None), what="the next job running")
        assert second["pilot_id"] == "worker"
        done = p3s(s, "cancel", "job", str(second["id"]))
        assert done.returncode == 0, done.stderr
        wf2 = second["workflow_id"]
        wait_for(lambda: workflow_state(s, wf2) == "incomplete", what="the second workflow ended")
        assert {n: (j["state"], j["reason"]) for n, j in by_node(s, wf2).items()} == {
            "a": ("dropped", CANCELLED), "b": ("dropped", CANCELLED), "c": ("dropped", CANCELLED)}
        assert proc.poll() is None, "the pilot is still serving"
    finally:
        proc.terminate()
        finish(proc)
    assert s.audit(grace_s=1).ok, s.audit(grace_s=1)


def test_cancel_job_drops_it_and_its_descendants_only(stack: tuple[Stack, Path]) -> None:
    """No pilot serves the queue: the jobs stay queued and pending until cancelled."""
    s, watch = stack
    s.import_template(graphml(
        {"a": {"command": probe_command()}, "b": {"command": probe_command()},
         "c": {"command": probe_command()}, "other": {"command": probe_command()}},
        edges=[("a", "b"), ("b", "c")]))
    (watch / "one.dat").write_bytes(b"x")
    jobs = wait_for(lambda: (j := {x["node"]: x for x in s.jobs()}) and len(j) == 4 and j, what="the jobs")
    wf = jobs["a"]["workflow_id"]
    assert (jobs["a"]["state"], jobs["b"]["state"], jobs["other"]["state"]) == ("queued", "pending", "queued")

    done = p3s(s, "cancel", "job", str(jobs["a"]["id"]))
    assert done.returncode == 0, done.stderr
    now = by_node(s, wf)
    assert {n: (j["state"], j["reason"]) for n, j in now.items() if n != "other"} == {
        "a": ("dropped", CANCELLED), "b": ("dropped", CANCELLED), "c": ("dropped", CANCELLED)}
    assert now["other"]["state"] == "queued", "not a descendant: untouched"
    assert workflow_state(s, wf) == "running"

    again = p3s(s, "cancel", "job", str(jobs["a"]["id"]))
    assert again.returncode == 0 and "nothing left to cancel" in again.stdout, again
    done = p3s(s, "cancel", "workflow", str(wf))
    assert done.returncode == 0 and f"job {now['other']['id']}: dropped" in done.stdout, done
    assert workflow_state(s, wf) == "incomplete"
    assert p3s(s, "cancel", "workflow", str(wf)).stdout.startswith(f"workflow {wf}: nothing left to cancel")

    unknown = p3s(s, "cancel", "job", "999999")
    assert unknown.returncode == 2 and "no job 999999" in unknown.stderr
    assert s.audit(grace_s=1).ok, s.audit(grace_s=1)
