"""A dispatcher killed between its commit and its publish: the committed jobs still run, once each.

The dispatcher records a batch (files, workflows, queued jobs) in one
transaction and then publishes the batch's tasks.  To stop it in exactly that
gap, the test runs a RabbitMQ node of its own and sets its memory watermark to
0 before the dispatcher starts: RabbitMQ then stops reading from any
connection that publishes, while consumers still receive.  The dispatcher
takes the events, commits their jobs as ``queued``, and hangs in its publish.
It is killed with SIGKILL; the broker side of its dead connections is closed
(so the publishes it wrote, unread by the broker, are discarded rather than
routed once the node accepts publishes again); then publishing is allowed
again and a new dispatcher and a pilot start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p3s.states import TERMINAL_JOB_STATES
from tests.conftest import unavailable
from tests.integration.test_outage import RabbitNode, server_script
from tests.integration.test_sampling import publish
from tests.procs import Parts, import_template
from tests.stack import graphml, make_settings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

# Not /usr/sbin/rabbitmqctl: as root, that wrapper switches to the rabbitmq
# user, whose Erlang cookie is not the private node's.
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"

TERMINAL = {s.value for s in TERMINAL_JOB_STATES}


# -- the private node ------------------------------------------------------------------


def ctl(node: RabbitNode, *args: str) -> str:
    """rabbitmqctl against the private node, with its own HOME (and so its Erlang cookie)."""
    done = subprocess.run([RABBITMQCTL, "-n", node.name, *args], env=node.env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def connections(node: RabbitNode) -> list[str]:
    out = ctl(node, "list_connections", "-q", "--no-table-headers", "name", "state")
    return [line for line in out.splitlines() if line.strip()]


@pytest.fixture
def node(tmp_path_factory: pytest.TempPathFactory, rabbitmq_available: None) -> Iterator[RabbitNode]:
    server = server_script()
    if server is None or not os.path.exists(RABBITMQCTL):
        unavailable("RabbitMQ", "no rabbitmq-server script and rabbitmqctl to run a node of the test's own")
    rabbit = RabbitNode(tmp_path_factory.mktemp("rmq"), server)
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.stop()


RECORD_RUN = """\
import os, sys, time
outdir = sys.argv[1]
os.makedirs(outdir, exist_ok=True)
with open(os.path.join(outdir, f"run-{os.getpid()}-{time.time_ns()}"), "w") as fh:
    fh.write(sys.argv[2] + "\\n")
"""


def runs_per_job(output_root: Path, jobs: list[dict[str, Any]]) -> dict[int, int]:
    """How often each job's payload ran: one record file per run in its outdir."""
    return {j["id"]: len(list((output_root / str(j["workflow_id"]) / j["node"]).glob("run-*"))) for j in jobs}


def test_jobs_committed_before_a_dispatcher_crash_run_once_each(
    tmp_path: Path, node: RabbitNode, database_url: str
) -> None:
    files = 20
    budget_s = 40  # long enough to restart everything, short enough that today's failure shows within the test
    payload = tmp_path / "record_run.py"
    payload.write_text(RECORD_RUN)
    settings = make_settings(tmp_path, node.url, database_url)
    import_template(settings, graphml({"run": {"command": f"{sys.executable} {payload} {{outdir}} {{job_id}}"}},
                                      budget_s=budget_s))
    names = [f"np04_raw_run{9000:06d}_{i:04d}.hdf5" for i in range(files)]

    with Parts(tmp_path, settings) as parts:
        # The events wait in their queue; then the node stops reading publishes.
        publish(node.url, names)
        ctl(node, "set_vm_memory_high_watermark", "0")
        first = parts.start("dispatcher", "dispatcher")

        def queued() -> int:
            return sum(j["state"] == "queued" for j in parts.db_jobs())

        # The dispatcher commits, then hangs in its publish: wait until what it
        # recorded stops growing (normally all the events, in one batch).
        parts.wait_for(lambda: queued() > 0, timeout=30, what="the first dispatcher to commit jobs", alive=[first])
        seen = -1
        while (now := queued()) != seen:
            seen = now
            time.sleep(1.0)
        parts.assert_alive(first)
        committed = parts.db_jobs()
        assert committed and {j["state"] for j in committed} == {"queued"}, "nothing ran: no task reached the broker"

        first.proc.send_signal(signal.SIGKILL)  # no cleanup of any kind, as in a crash
        first.proc.wait(30)
        # The broker still holds the dead dispatcher's publishing connection,
        # unread; closing it discards what the dispatcher wrote into it, so no
        # task of the dead process is ever routed.
        ctl(node, "close_all_connections", "test: the dispatcher was killed")
        parts.wait_for(lambda: not connections(node), timeout=30, what="the dead dispatcher's connections to close")
        ctl(node, "set_vm_memory_high_watermark", "0.4")

        second = parts.start("dispatcher", "dispatcher")
        pilot = parts.start("pilot", "pilot")

        def all_ended() -> list[dict[str, Any]] | None:
            jobs = parts.db_jobs()
            return jobs if len(jobs) >= files and all(j["state"] in TERMINAL for j in jobs) else None

        # Today the committed jobs sit queued until the reaper expires them at their deadline.
        jobs = parts.wait_for(all_ended, timeout=budget_s + 20, what="every job to end", alive=[second, pilot])

        by_id = {j["id"]: j for j in jobs}
        misleading = sorted(i for i, j in by_id.items() if j["reason"] == "deadline passed before it started")
        assert not misleading, (
            f"{len(misleading)} of the {len(committed)} jobs committed before the crash expired as if their queue "
            f"had been congested, although their tasks were never published: jobs {misleading}"
        )
        for job in jobs:
            assert job["state"] == "finished" or job["reason"].startswith("not published"), job

        runs = runs_per_job(settings.output_path, jobs)
        assert {i: n for i, n in runs.items() if n > 1} == {}, "no job runs twice"
        assert {i: n for i, n in runs.items() if by_id[i]["state"] == "finished" and n != 1} == {}, (
            "every finished job ran exactly once"
        )
        checked = parts.audit()
        assert checked.returncode == 0, checked.stdout + checked.stderr
        parts.assert_alive(second, pilot)
