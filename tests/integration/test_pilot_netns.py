"""A worker node's network goes away while its payload runs, and comes back.

Two pilot hosts, each a network namespace of this test with a veth pair and
addresses only inside it (``tests/netns.py``), reach RabbitMQ through a relay
in the root namespace; the dispatcher and the watcher run in this process.
One host's link is taken down while its pilot runs a payload that outlives
the heartbeat timeout.  The dispatcher must call that pilot and its job
``lost`` within the timeout, drop the job's descendant, and run nothing
again; once the link is back, the pilot's late report of the job must change
nothing, and the pilot must take new work.

Needs root (``ip netns``): skipped elsewhere, failed in CI.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RABBITMQ_HOST, RABBITMQ_PORT
from tests.netns import NetHost, NetHosts, NetnsPart, require_namespaces
from tests.procs import Parts
from tests.stack import Stack, graphml, make_settings, probe_command

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

HEARTBEAT_TIMEOUT_S = 3.0  # the dispatcher's; pilots beat every second
REAP_INTERVAL_S = 0.5
BROKER_HEARTBEAT_S = "2"  # so a pilot notices its dead connection within seconds


@pytest.fixture
def hosts() -> Iterator[NetHosts]:
    require_namespaces()
    made = NetHosts((RABBITMQ_HOST, RABBITMQ_PORT))
    try:
        yield made
    finally:
        made.close()


def start_pilot(parts: Parts, host: NetHost, pilot_id: str, tmp_path: Path) -> NetnsPart:
    """``p3s pilot`` on ``host``: its broker through the host's relay, its work directories on the host."""
    env = parts.env(
        P3S_BROKER_URL=host.broker_url(parts.settings.broker.url),
        P3S_DATABASE_URL="",  # a pilot holds no database credentials
        P3S_PILOT_WORK_ROOT=str(tmp_path / f"{pilot_id}-local" / "work"),  # this host's own disk
        P3S_OUTPUT_ROOT=str(parts.settings.output_path),  # the shared storage, at the dispatcher's path
    )
    part = NetnsPart(host, pilot_id, ["pilot", "--id", pilot_id], env, parts.logs / f"{pilot_id}.log")
    parts.started.append(part)
    return part


def job_of(stack: Stack, node: str, name: str) -> dict[str, Any] | None:
    return next((j for j in stack.jobs() if j["node"] == node and Path(j["file"]).name == name), None)


def test_a_cut_link_loses_the_pilot_and_its_job_and_nothing_reruns(tmp_path: Path, broker_url: str,
                                                                   database_url: str, hosts: NetHosts) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    release, release_new = tmp_path / "release", tmp_path / "release-new"
    settings = make_settings(tmp_path, broker_url, database_url,
                             P3S_DISPATCHER_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
                             P3S_DISPATCHER_REAP_INTERVAL_S=str(REAP_INTERVAL_S),
                             P3S_BROKER_HEARTBEAT_S=BROKER_HEARTBEAT_S)
    stack = Stack(settings, watch=watch, pilots=0).start()
    parts = Parts(tmp_path, settings, P3S_BROKER_HEARTBEAT_S=BROKER_HEARTBEAT_S)
    try:
        stack.import_template(graphml({
            "hold": {"command": probe_command("--until", str(release))},
            "after": {"command": probe_command()},
        }, edges=[("hold", "after")], trigger="cut*.dat", name="chain"), "chain")
        stack.import_template(graphml({"fresh": {"command": probe_command("--until", str(release_new))}},
                                      trigger="new*.dat", name="fresh"), "fresh")
        a, b = hosts.add(), hosts.add()
        pilots = {"pilot-a": start_pilot(parts, a, "pilot-a", tmp_path),
                  "pilot-b": start_pilot(parts, b, "pilot-b", tmp_path)}
        host_of = {"pilot-a": a, "pilot-b": b}
        alive = list(pilots.values())
        parts.wait_for(lambda: {p["id"]: p["state"] for p in stack.pilots()} == {"pilot-a": "idle",
                                                                                  "pilot-b": "idle"},
                       timeout=60, what="both pilots registered through their relays", alive=alive)

        (watch / "cut1.dat").write_bytes(b"x")
        hold = parts.wait_for(lambda: (j := job_of(stack, "hold", "cut1.dat")) and j["state"] == "running" and j,
                              timeout=30, what="the first job running", alive=alive)
        victim = hold["pilot_id"]
        other = next(p for p in pilots if p != victim)
        host_of[victim].cut()
        cut_at = time.monotonic()

        # Lost within the heartbeat timeout (plus one reap and the last beat's second).
        limit = HEARTBEAT_TIMEOUT_S + REAP_INTERVAL_S + 1.0 + 2.0
        lost = parts.wait_for(lambda: (j := job_of(stack, "hold", "cut1.dat"))["state"] == "lost" and j,
                              timeout=limit + 5, what="the job on the cut host to be lost", alive=alive)
        took = time.monotonic() - cut_at
        assert took <= limit, f"lost after {took:.1f}s, more than the heartbeat timeout allows ({limit:.1f}s)"
        assert lost["reason"] == f"pilot {victim} lost", lost
        by_id = stack.pilots_by_id()
        assert by_id[victim]["state"] == "lost", by_id
        assert by_id[other]["state"] == "idle", f"the pilot on the other host is not touched: {by_id}"
        after = job_of(stack, "after", "cut1.dat")
        assert after is not None and after["state"] == "dropped" and after["reason"], after
        assert pilots[victim].alive(), "the pilot itself is still running its payload, unseen"

        # Nothing runs again: the other pilot stays idle while the payload still runs on the cut host.
        time.sleep(HEARTBEAT_TIMEOUT_S)
        jobs = stack.jobs()
        assert len(jobs) == 2 and all(j["pilot_id"] != other for j in jobs), jobs
        assert stack.pilots_by_id()[other]["state"] == "idle"

        host_of[victim].heal()
        release.touch()  # the payload ends now, after the job was given up
        parts.wait_for(lambda: stack.pilots_by_id()[victim]["jobs_done"] == 1, timeout=45,
                       what="the late report of the healed pilot", alive=alive)
        # Its report of the finished payload arrived and changed nothing.
        again = job_of(stack, "hold", "cut1.dat")
        assert (again["state"], again["reason"], again["ended_at"]) == ("lost", lost["reason"], lost["ended_at"])
        assert job_of(stack, "after", "cut1.dat")["state"] == "dropped"
        assert [w["state"] for w in stack.workflows()] == ["incomplete"]
        log_text = pilots[victim].log()
        assert "job " + str(hold["id"]) + ": finished" in log_text, log_text[-3000:]

        # Both pilots take new work: two held jobs run at once, one on each host.
        parts.wait_for(lambda: stack.pilots_by_id()[victim]["state"] == "idle", timeout=30,
                       what="the healed pilot idle again", alive=alive)
        for name in ("new1.dat", "new2.dat"):
            (watch / name).write_bytes(b"x")
        running = parts.wait_for(
            lambda: len(r := [j for j in stack.jobs() if j["node"] == "fresh" and j["state"] == "running"]) == 2
            and r, timeout=30, what="a new job running on each pilot", alive=alive)
        assert {j["pilot_id"] for j in running} == set(pilots)
        release_new.touch()
        parts.wait_for(lambda: [j["state"] for j in stack.jobs() if j["node"] == "fresh"] == ["finished"] * 2,
                       timeout=30, what="the new jobs to finish", alive=alive)
        assert len(stack.jobs()) == 4, "nothing of the first file ran again"
        checked = stack.audit(grace_s=1)
        assert checked.ok, checked.problems
    finally:
        release.touch()
        release_new.touch()
        parts.stop_all()
        stack.stop()
