"""End-to-end scenarios of the Phase I pipeline, run on the embedded default and on real servers.

Each takes a running :class:`Stack` that watches ``watch`` with one pilot.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kombu import Connection, Producer

from p3s import broker, topology
from tests.stack import Stack, graphml, probe_command, terminal_jobs, wait_for


def outdir_of(stack: Stack, job: dict) -> Path:
    return stack.settings.output_path / str(job["workflow_id"]) / job["node"]


def read_probe(stack: Stack, job: dict) -> dict:
    return json.loads((outdir_of(stack, job) / "probe.json").read_text())


def file_to_finished_job(stack: Stack, watch: Path) -> None:
    """A file written into the watched directory ends as a finished job that saw its argv and env."""
    stack.import_template(
        graphml(
            {"probe": {"command": probe_command("{input}", "{input_name}", "{workdir}", "{job_id}", "{workflow_id}"),
                       "env": {"DQM_RUN_FILE": "{input_name}", "DQM_CONFIG": "np04.fcl"}}},
            trigger="run*.dat",
        )
    )
    path = watch / "run000101.dat"
    path.write_bytes(b"\0" * 1000)
    (job,) = wait_for(lambda: terminal_jobs(stack, 1), what="the job to end")
    assert job["state"] == "finished", job
    assert job["exit_code"] == 0
    assert job["file"] == str(path)
    seen = read_probe(stack, job)
    workdir = seen["cwd"]
    assert seen["rest"] == [str(path), "run000101.dat", workdir, str(job["id"]), str(job["workflow_id"])]
    env = seen["env"]
    assert env["P3S_INPUT"] == str(path)
    assert env["P3S_JOB_ID"] == str(job["id"])
    assert env["P3S_WORKFLOW_ID"] == str(job["workflow_id"])
    assert env["P3S_WORKDIR"] == workdir
    assert env["DQM_RUN_FILE"] == "run000101.dat" and env["DQM_CONFIG"] == "np04.fcl"
    # The pilot's own settings (broker URL, passwords) never reach the payload.
    assert "P3S_BROKER_URL" not in env and "P3S_DATABASE_URL" not in env
    assert Path(workdir).parent == Path(stack.settings.pilot.work_root)
    assert not Path(workdir).exists(), "the work directory must be removed after the job"
    assert seen["pgid"] == seen["pid"], "the payload leads its own process group"
    assert "probe: exiting with 0" in Path(job["log"]).read_text()
    (wf,) = stack.workflows()
    assert wf["state"] == "finished" and wf["latency_s"] > 0
    (f,) = stack.files()
    assert f["decision"] == "accepted" and f["path"] == str(path)


def failing_payload(stack: Stack, watch: Path) -> None:
    """A payload exiting 3 ends failed with exit code 3."""
    stack.import_template(graphml({"probe": {"command": probe_command("--exit", "3")}}))
    (watch / "bad.dat").write_bytes(b"x")
    (job,) = wait_for(lambda: terminal_jobs(stack, 1), what="the job to end")
    assert (job["state"], job["exit_code"]) == ("failed", 3)
    assert stack.workflows()[0]["state"] == "incomplete"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wall_limit(stack: Stack, watch: Path) -> None:
    """A payload sleeping past wall_s ends timeout, and the grandchild it started is gone too."""
    stack.import_template(graphml({"probe": {"command": probe_command("--sleep", "60", "--grandchild"),
                                             "wall_s": "1.5"}}))
    (watch / "slow.dat").write_bytes(b"x")
    (job,) = wait_for(lambda: terminal_jobs(stack, 1), what="the job to end")
    assert job["state"] == "timeout", job
    assert job["started_at"] and job["ended_at"] - job["started_at"] < 10
    seen = read_probe(stack, job)
    wait_for(lambda: not _alive(seen["grandchild"]), timeout=5, what="the grandchild to be gone")
    assert not _alive(seen["pid"])
    assert not Path(seen["cwd"]).exists()


def duplicate_name(stack: Stack, watch: Path) -> None:
    """Two events for one file name give one workflow and one duplicate."""
    stack.import_template(graphml({"probe": {"command": probe_command()}}))
    path = watch / "twice.dat"
    path.write_bytes(b"first")
    wait_for(lambda: len(stack.files()) == 1, what="the first event")
    with open(path, "ab") as fh:  # a second close-after-write: a second event
        fh.write(b"again")
    wait_for(lambda: len(stack.files()) == 2, what="the second event")
    decisions = sorted(f["decision"] for f in stack.files())
    assert decisions == ["accepted", "duplicate"]
    wait_for(lambda: terminal_jobs(stack, 1), what="the job to end")
    time.sleep(0.5)
    assert len(stack.workflows()) == 1
    assert len(stack.jobs()) == 1


def malformed_event(stack: Stack, watch: Path) -> None:
    """A malformed event lands in p3s.invalid, and the next good event is still processed."""
    stack.import_template(graphml({"probe": {"command": probe_command()}}))
    with Connection(stack.settings.broker.effective_url) as conn:
        producer = Producer(conn.default_channel)
        for body in (b"this is not json", b'{"v": 1, "name": "x.dat"}', b'{"v": 99}'):
            producer.publish(body, exchange=topology.events_exchange, routing_key="file.raw",
                             content_type="application/json")
        wait_for(lambda: broker.queue_depth(conn, topology.invalid_queue) == 3, timeout=15,
                 what="three messages in p3s.invalid")
    (watch / "good.dat").write_bytes(b"x")
    (job,) = wait_for(lambda: terminal_jobs(stack, 1), what="the good event's job")
    assert job["state"] == "finished"
    assert [f["name"] for f in stack.files()] == ["good.dat"]
    from p3s import metrics

    assert metrics.INVALID_MESSAGES.labels(topology.events_queue.name)._value.get() >= 3


#: The scenarios both tiers run, in order.
PHASE_ONE = [file_to_finished_job, failing_payload, wall_limit, duplicate_name, malformed_event]
