"""Who may say what, on RabbitMQ + PostgreSQL with the shipped least-privilege users.

config/rabbitmq/definitions.json is imported into a vhost of this module's own
(as tests/integration/test_rabbitmq_permissions.py does), with passwords set
here.  The dispatcher runs as p3s-dispatcher, believing status reports from
the pilot account only and events from the watcher's and its own; a real
pilot runs as p3s-pilot with declare_topology = false.  While the pilot holds
a job, a forger holding the pilot's password (what a payload of the pilot's
user could read) tells the dispatcher the job finished, in every way it can:

- as another pilot, without the token, and with the job's real token (stolen
  from the queue before the real pilot took the task);
- as the real pilot, without a token, and with another job's token;
- with the dispatcher's account, which may write to p3s.status;
- with no user_id at all.

Each is refused to p3s.invalid with its reason and counted, the job's real
outcome is the one recorded, and its child waits for that.  The watcher's
account cannot even publish to p3s.status.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import amqp
import pytest
from kombu import Connection

from p3s import topology
from p3s.messages import JobReport, Task, encode
from tests.conftest import RABBITMQ_HOST, RABBITMQ_PORT, rabbitmqctl
from tests.integration.test_rabbitmq_permissions import (
    DEFINITIONS,
    bindings,
    publish,
    refused_publish,
    rewritten,
    wait_until,
)
from tests.pgserver import free_port
from tests.procs import Parts, event_body, import_template
from tests.stack import graphml, make_settings, probe_command

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

ROLES = ("dispatcher", "watcher", "pilot")
PILOT_ID = "real-pilot"


@dataclass(frozen=True)
class Accounts:
    """The imported definitions: the vhost, and per role its login and AMQP URL."""

    vhost: str
    users: dict[str, str]
    urls: dict[str, str]

    def connect(self, role: str) -> Connection:
        conn = Connection(self.urls[role], connect_timeout=5, heartbeat=0)
        conn.ensure_connection(max_retries=0)
        return conn


@pytest.fixture(scope="module")
def accounts(rabbitmq_available: None) -> Iterator[Accounts]:
    """The shipped definitions in a vhost of their own, with users and passwords of this module."""
    suffix = uuid.uuid4().hex[:10]
    vhost = f"p3s-auth-{suffix}"
    shipped = json.loads(DEFINITIONS.read_text())
    names = {u["name"]: f"{u['name']}-{suffix}" for u in shipped["users"]}
    passwords = {name: uuid.uuid4().hex for name in names.values()}
    text = json.dumps(rewritten(shipped, vhost, names, passwords))
    try:
        subprocess.run(["rabbitmqctl", "import_definitions", "--format", "json"], input=text,
                       capture_output=True, text=True, timeout=120, check=True)
        expected = {(b["source"], b["destination"], b["routing_key"]) for b in shipped["bindings"]}
        wait_until(lambda: expected <= bindings(vhost), "the imported bindings")
        server = f"{RABBITMQ_HOST}:{RABBITMQ_PORT}/{quote(vhost, safe='')}"
        users = {role: names[f"p3s-{role}"] for role in ROLES}
        urls = {role: f"amqp://{quote(user, safe='')}:{passwords[user]}@{server}" for role, user in users.items()}
        yield Accounts(vhost, users, urls)
    finally:
        for name in names.values():
            try:
                rabbitmqctl("delete_user", name)
            except subprocess.CalledProcessError:
                pass
        try:
            rabbitmqctl("delete_vhost", vhost)
        except subprocess.CalledProcessError:
            pass


def take(conn: Connection, queue: str, timeout: float = 20.0) -> amqp.Message:
    """basic.get and ack one message from ``queue`` (needs read on it), waiting up to ``timeout``."""
    channel = conn.channel()
    try:
        end = time.monotonic() + timeout
        while (message := channel.basic_get(queue, no_ack=True)) is None:
            assert time.monotonic() < end, f"nothing came on {queue}"
            time.sleep(0.1)
        return message
    finally:
        channel.close()


def invalid(conn: Connection) -> list[tuple[bytes, dict[str, Any]]]:
    """Everything in p3s.invalid so far (read with the dispatcher's account), bodies and headers."""
    got = []
    channel = conn.channel()
    try:
        while (message := channel.basic_get("p3s.invalid", no_ack=True)) is not None:
            body = message.body if isinstance(message.body, bytes) else message.body.encode()
            got.append((body, dict(message.headers or {})))
    finally:
        channel.close()
    return got


def metric(port: int, name: str, **labels: str) -> float:
    """A sample of the dispatcher's /metrics, 0 if it has none yet."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.MULTILINE)
    for found in pattern.finditer(text):
        have = ",".join(sorted((found.group(1) or "").split(","))) if found.group(1) else ""
        if have == want:
            return float(found.group(2))
    return 0.0


def job(parts: Parts, node: str) -> dict[str, Any] | None:
    return next((j for j in parts.db_jobs() if j["node"] == node), None)


def test_forged_reports_are_refused_and_the_real_outcome_stands(
    tmp_path: Path, accounts: Accounts, database_url: str
) -> None:
    port = free_port()
    release = tmp_path / "release"
    settings = make_settings(tmp_path, accounts.urls["dispatcher"], database_url)
    import_template(settings, graphml({
        "slow": {"command": probe_command("--until", str(release))},
        "after": {"command": probe_command()},
        "held": {"command": probe_command(), "queue": "hold"},  # a queue no pilot serves
    }, [("slow", "after")], name="auth"), name="auth")
    pilot_user, watcher_user, dispatcher_user = (accounts.users[r] for r in ("pilot", "watcher", "dispatcher"))

    with Parts(tmp_path, settings) as parts, accounts.connect("pilot") as forger, \
            accounts.connect("dispatcher") as operator:
        dispatcher = parts.start("dispatcher", "dispatcher", P3S_METRICS_PORT=str(port),
                                 P3S_DISPATCHER_REPORT_USERS=pilot_user,
                                 P3S_DISPATCHER_EVENT_USERS=f"{watcher_user},{dispatcher_user}")
        parts.wait_for(lambda: dispatcher.log_has("dispatcher: consuming"), alive=[dispatcher],
                       what="the dispatcher to consume")
        with accounts.connect("watcher") as watcher:
            publish(watcher, "p3s.events", topology.event_routing_key("raw"),
                    event_body("run1.dat", "/data/run1.dat"), user_id=watcher_user)
        parts.wait_for(lambda: (j := job(parts, "held")) and j["state"] == "queued" and
                       (s := job(parts, "slow")) and s["state"] == "queued",
                       alive=[dispatcher], what="both root jobs queued")

        # The forger reads tasks it may read (p3s.tasks.*): another job's, and this job's
        # before the real pilot comes; the latter goes back (with the operator's account, which
        # may publish tasks) for the real pilot to take.
        held = Task.parse(take(forger, "p3s.tasks.hold").body)
        raw = take(forger, "p3s.tasks.default")
        slow = Task.parse(raw.body)
        assert held.token and slow.token and held.token != slow.token
        publish(operator, "p3s.tasks", "default", raw.body, priority=slow.priority,
                content_type="application/json", application_headers=dict(raw.headers or {}))

        pilot = parts.start("pilot", "pilot", "--id", PILOT_ID, P3S_BROKER_URL=accounts.urls["pilot"],
                            P3S_BROKER_DECLARE_TOPOLOGY="false")
        running = parts.wait_for(lambda: (j := job(parts, "slow")) and j["state"] == "running" and j,
                                 alive=[dispatcher, pilot], what="the real pilot to run the slow job")
        assert running["pilot_id"] == PILOT_ID

        def forged(token: str = "", pilot_id: str = PILOT_ID, job_id: int = slow.job_id) -> bytes:
            now = time.time()
            return encode(JobReport(job_id, "finished", pilot_id, exit_code=0, started_at=now - 1, ended_at=now,
                                    token=token))

        key = topology.status_routing_key("job", "finished")
        attempts = {
            # (a) the job is another pilot's: without its token, and even with it
            "other pilot, no token": (forged(pilot_id="other-pilot"), pilot_user, "token"),
            "other pilot, the job's token": (forged(slow.token, pilot_id="other-pilot"), pilot_user, "pilot"),
            # (b) and (c): the right pilot id, but no token, or the token of another job
            "no token": (forged(), pilot_user, "token"),
            "another job's token": (forged(held.token), pilot_user, "token"),
            # (d) everything right but the account: the dispatcher's may write to p3s.status
            "dispatcher's account": (forged(slow.token), dispatcher_user, "account"),
            "no user_id": (forged(slow.token), "", "account"),
        }
        for body, user, _kind in attempts.values():
            props = {"user_id": user} if user else {}
            publish(operator if user == dispatcher_user else forger, "p3s.status", key, body,
                    content_type="application/json", **props)
        # (e) the watcher's account cannot publish there at all: RabbitMQ refuses it.
        with accounts.connect("watcher") as watcher:
            refused_publish(watcher, "p3s.status", key)

        seen: dict[bytes, dict[str, Any]] = {}

        def all_refused() -> bool:
            seen.update(invalid(operator))
            return all(body in seen for body, _u, _k in attempts.values())

        parts.wait_for(all_refused, alive=[dispatcher, pilot], what="every forged report in p3s.invalid")
        reasons = {what: str(seen[body].get("p3s-reason", "")) for what, (body, _u, _k) in attempts.items()}
        for what, (body, _user, kind) in attempts.items():
            assert seen[body].get("p3s-queue") == "p3s.dispatcher.status", (what, seen[body])
            reason = reasons[what]
            if kind == "token":
                assert f"job {slow.job_id}" in reason and "token" in reason, (what, reason)
            elif kind == "pilot":
                assert f"pilot {PILOT_ID} took the job" in reason, (what, reason)
            else:
                assert "broker account" in reason and pilot_user in reason, (what, reason)
        assert slow.token not in " ".join(reasons.values()) and held.token not in " ".join(reasons.values())

        assert metric(port, "p3s_invalid_messages_total", queue="p3s.dispatcher.status") == len(attempts)
        for kind in ("token", "pilot", "account"):
            expected = sum(k == kind for _b, _u, k in attempts.values())
            assert metric(port, "p3s_reports_refused_total", reason=kind) == expected, kind

        # Nothing forged took effect: the job is still the real pilot's and running, its child waits.
        now = job(parts, "slow")
        assert now is not None and now["state"] == "running" and now["pilot_id"] == PILOT_ID, now
        child = job(parts, "after")
        assert child is None or (child["state"] == "pending" and child["queued_at"] is None), child
        assert job(parts, "held")["state"] == "queued"  # type: ignore[index]

        release.touch()
        done = parts.wait_for(lambda: (j := job(parts, "after")) and j["state"] == "finished" and j,
                              alive=[dispatcher, pilot], what="the slow job and then its child to finish")
        final = job(parts, "slow")
        assert final is not None and final["state"] == "finished" and final["exit_code"] == 0, final
        assert final["pilot_id"] == PILOT_ID and final["reason"] in (None, ""), final
        assert done["queued_at"] >= final["ended_at"], "the child was queued before its parent really ended"
        assert done["pilot_id"] == PILOT_ID
        # The real pilot's reports were all believed.
        assert metric(port, "p3s_invalid_messages_total", queue="p3s.dispatcher.status") == len(attempts)
        parts.assert_alive(dispatcher, pilot)
