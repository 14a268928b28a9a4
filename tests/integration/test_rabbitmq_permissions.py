"""Least privilege on the real RabbitMQ: config/rabbitmq/definitions.json, shown by trying.

The definitions are imported into a vhost of their own, with the vhost and user
names suffixed so concurrent runs never collide, and real passwords set with
``rabbitmqctl change_password`` as an operator would.  Then each role's user
tries what it must be able to do and what it must not.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import amqp
import amqp.exceptions
import pytest
from kombu import Connection

from p3s import app, topology
from p3s.broker import Outgoing, Publisher
from p3s.config import load_settings
from p3s.messages import Control, DataEvent, Task, encode
from p3s.pilot.service import Limits
from tests.conftest import RABBITMQ_HOST, RABBITMQ_PORT, rabbitmqctl

pytestmark = pytest.mark.rabbitmq

DEFINITIONS = Path(__file__).resolve().parents[2] / "config" / "rabbitmq" / "definitions.json"
ROLES = ("dispatcher", "watcher", "pilot")
QUEUES = ("p3s.dispatcher.events", "p3s.dispatcher.status", "p3s.dispatcher.expired", "p3s.invalid",
          "p3s.tasks.default", "p3s.tasks.express")


@dataclass(frozen=True)
class Loaded:
    """The definitions as loaded: the vhost, and an AMQP URL per role."""

    vhost: str
    urls: dict[str, str]

    def connect(self, role: str) -> Connection:
        conn = Connection(self.urls[role], connect_timeout=5, heartbeat=0)
        conn.ensure_connection(max_retries=0)
        return conn


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def rewritten(definitions: dict[str, Any], vhost: str, users: dict[str, str], passwords: dict[str, str]
              ) -> dict[str, Any]:
    """``definitions`` for another vhost, other user names and passwords (everything else as shipped)."""
    out = json.loads(json.dumps(definitions))
    out["vhosts"] = [{**v, "name": vhost} for v in out["vhosts"]]
    out["users"] = [{**u, "name": users[u["name"]], "password_hash": password_hash(passwords[users[u["name"]]])}
                    for u in out["users"]]
    out["permissions"] = [{**p, "user": users[p["user"]], "vhost": vhost} for p in out["permissions"]]
    for key in ("queues", "exchanges", "bindings", "policies", "parameters", "topic_permissions"):
        out[key] = [{**item, "vhost": vhost} for item in out.get(key, [])]
    return out


@pytest.fixture(scope="module")
def imported(rabbitmq_available: None) -> Iterator[Loaded]:
    """The shipped definitions in a vhost of their own, with their own users, for this module."""
    suffix = uuid.uuid4().hex[:10]
    vhost = f"p3s-perm-{suffix}"
    shipped = json.loads(DEFINITIONS.read_text())
    users = {u["name"]: f"{u['name']}-{suffix}" for u in shipped["users"]}
    assert sorted(users) == sorted(f"p3s-{r}" for r in ROLES)
    passwords = {name: uuid.uuid4().hex for name in users.values()}
    text = json.dumps(rewritten(shipped, vhost, users, passwords))
    try:
        # From stdin: given a path, the broker node itself reads the file, and it may not read a test's files.
        subprocess.run(["rabbitmqctl", "import_definitions", "--format", "json"], input=text,
                       capture_output=True, text=True, timeout=120, check=True)
        # The import is asynchronous: wait for its last part, the bindings.
        expected = {(b["source"], b["destination"], b["routing_key"]) for b in shipped["bindings"]}
        wait_until(lambda: expected <= bindings(vhost), "the imported bindings")
        # As the README tells an operator to: replace the password of the imported user.
        pilot = users["p3s-pilot"]
        passwords[pilot] = uuid.uuid4().hex
        rabbitmqctl("change_password", pilot, passwords[pilot])
        server = f"{RABBITMQ_HOST}:{RABBITMQ_PORT}/{quote(vhost, safe='')}"
        urls = {}
        for role in ROLES:
            user = users[f"p3s-{role}"]
            urls[role] = f"amqp://{quote(user, safe='')}:{passwords[user]}@{server}"
        yield Loaded(vhost, urls)
    finally:
        for name in users.values():
            try:
                rabbitmqctl("delete_user", name)
            except subprocess.CalledProcessError:  # not there if the import failed half-way
                pass
        try:
            rabbitmqctl("delete_vhost", vhost)
        except subprocess.CalledProcessError:
            pass


@pytest.fixture
def loaded(imported: Loaded) -> Loaded:
    """The imported definitions with every queue emptied: each test starts from the same state."""
    with imported.connect("dispatcher") as conn:
        for queue in QUEUES:
            channel = conn.channel()
            try:
                channel.queue_purge(queue)
            except amqp.exceptions.NotFound:
                pass
            finally:
                if channel.is_open:
                    channel.close()
    return imported


def bindings(vhost: str) -> set[tuple[str, str, str]]:
    try:
        out = rabbitmqctl("list_bindings", "-q", "--no-table-headers", "-p", vhost,
                          "source_name", "destination_name", "routing_key").stdout
    except subprocess.CalledProcessError:  # the vhost is not there yet
        return set()
    return {tuple((line.split("\t") + ["", ""])[:3]) for line in out.splitlines() if line}  # type: ignore[misc]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# -- helpers: each try on a channel of its own, since a refusal closes it ------------


def publish(conn: Connection, exchange: str, routing_key: str, body: bytes = b"{}", **props: Any) -> None:
    """Publish with a confirm, so a refusal (which comes asynchronously) is seen here."""
    channel = conn.channel()
    try:
        channel.basic_publish_confirm(amqp.Message(body, delivery_mode=2, **props), exchange=exchange,
                                      routing_key=routing_key, confirm_timeout=10)
    finally:
        if channel.is_open:
            channel.close()


def get(conn: Connection, queue: str, timeout: float = 10.0) -> amqp.Message | None:
    """basic.get (needs read on the queue) until a message comes or ``timeout`` passes."""
    channel = conn.channel()
    try:
        end = time.monotonic() + timeout
        while True:
            message = channel.basic_get(queue, no_ack=True)
            if message is not None or time.monotonic() > end:
                return message
            time.sleep(0.05)
    finally:
        if channel.is_open:
            channel.close()


def consume_one(conn: Connection, queue: str, timeout: float = 10.0) -> amqp.Message:
    """basic.consume as a pilot does, and wait for one delivery."""
    channel = conn.channel()
    got: list[amqp.Message] = []
    try:
        channel.basic_qos(0, 1, False)
        channel.basic_consume(queue, callback=got.append, no_ack=True)
        end = time.monotonic() + timeout
        while not got and time.monotonic() < end:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass
        assert got, f"nothing was delivered from {queue}"
        return got[0]
    finally:
        if channel.is_open:
            channel.close()


def refused(conn: Connection, attempt: Callable[[Any], Any]) -> None:
    """``attempt(channel)`` is refused with ACCESS_REFUSED (channel-level, the connection survives)."""
    channel = conn.channel()
    with pytest.raises(amqp.exceptions.AccessRefused) as info:
        attempt(channel)
        # A refusal of an asynchronous method shows on the next synchronous one.
        channel.basic_qos(0, 1, False)
    assert info.value.reply_code == 403
    assert conn.connected, "a refusal closes the channel, never the connection"


def refused_publish(conn: Connection, exchange: str, routing_key: str) -> None:
    with pytest.raises(amqp.exceptions.AccessRefused) as info:
        publish(conn, exchange, routing_key)
    assert info.value.reply_code == 403
    assert exchange in str(info.value)


def drain(conn: Connection, queue: str) -> None:
    while get(conn, queue, timeout=0) is not None:
        pass


# -- the tests ------------------------------------------------------------------------


def test_dispatcher_declares_the_whole_topology_over_the_loaded_one(loaded: Loaded) -> None:
    """The arguments in definitions.json match topology.py: no PRECONDITION_FAILED, and new task queues work."""
    with loaded.connect("dispatcher") as conn:
        topology.declare_all(conn, ["default", "express"])
        topology.declare(conn, [topology.task_queue("default")])
        # The dispatcher publishes tasks to a queue it declared itself at run time.
        publish(conn, topology.tasks_exchange.name, "express", b'{"v": 1}')
        assert get(conn, "p3s.tasks.express") is not None


def test_pilot_consumes_tasks_and_publishes_status(loaded: Loaded) -> None:
    with loaded.connect("dispatcher") as dispatcher, loaded.connect("pilot") as pilot:
        publish(dispatcher, "p3s.tasks", "default", b'{"task": 1}', priority=5)
        assert consume_one(pilot, "p3s.tasks.default").body == b'{"task": 1}'
        publish(dispatcher, "p3s.tasks", "default", b'{"task": 2}')
        got = get(pilot, "p3s.tasks.default")
        assert got is not None and got.body == b'{"task": 2}'

        publish(pilot, "p3s.status", "job.finished", b'{"report": 1}')
        got = get(dispatcher, "p3s.dispatcher.status")
        assert got is not None and got.body == b'{"report": 1}'
        assert got.delivery_info["routing_key"] == "job.finished"


def test_pilot_cannot_publish_tasks_read_dispatcher_queues_or_declare(loaded: Loaded) -> None:
    with loaded.connect("pilot") as pilot, loaded.connect("dispatcher") as dispatcher:
        # No tasks of its own making, no fake data events, nothing dead-lettered by hand.
        for exchange, key in [("p3s.tasks", "default"), ("p3s.events", "file.raw"), ("p3s.expired", ""),
                              ("p3s.invalid", ""), ("", "p3s.tasks.default"), ("p3s.control", "pilot.other")]:
            refused_publish(pilot, exchange, key)
        assert get(dispatcher, "p3s.tasks.default", timeout=0.5) is None, "no refused task got through"
        assert get(dispatcher, "p3s.dispatcher.events", timeout=0) is None

        # Nothing of the dispatcher's to read: neither by consuming nor by basic.get.
        publish(dispatcher, "p3s.status", "job.finished", b'{"secret": 1}')
        for queue in ("p3s.dispatcher.events", "p3s.dispatcher.status", "p3s.dispatcher.expired", "p3s.invalid"):
            refused(pilot, lambda ch, q=queue: ch.basic_consume(q, callback=lambda m: None))
            refused(pilot, lambda ch, q=queue: ch.basic_get(q))
            refused(pilot, lambda ch, q=queue: ch.queue_purge(q))
        assert get(dispatcher, "p3s.dispatcher.status") is not None, "the status message is still there"

        # No configure permission but on a server-named queue of its own: no exchange, no named queue,
        # no binding of p3s's queues.
        refused(pilot, lambda ch: ch.exchange_declare("p3s.pilot-made", "fanout", durable=True, auto_delete=False))
        refused(pilot, lambda ch: ch.exchange_declare("p3s.tasks", "direct", durable=True, auto_delete=False))
        refused(pilot, lambda ch: ch.exchange_delete("p3s.tasks"))
        refused(pilot, lambda ch: ch.queue_declare("p3s.tasks.mine", durable=True, auto_delete=False))
        refused(pilot, lambda ch: ch.queue_declare("amq.gen-mine", auto_delete=True, exclusive=True))
        refused(pilot, lambda ch: ch.queue_delete("p3s.tasks.default"))
        refused(pilot, lambda ch: ch.queue_bind("p3s.tasks.default", "p3s.events", "file.#"))
        # Not even its own task queue may it (re)declare: hence declare_topology = false for pilots.
        refused(pilot, lambda ch: topology.task_queue("default")(ch).declare())


def test_pilot_reads_its_control_queue_but_cannot_give_orders(loaded: Loaded) -> None:
    """p3s.control: a pilot binds a server-named queue of its own and reads it; it cannot write to it.

    Nor can it bind that queue to any exchange that carries what it must not
    see: p3s.tasks (every task, tokens and all), p3s.status (every report),
    p3s.events, p3s.expired or p3s.invalid.
    """
    with loaded.connect("pilot") as pilot, loaded.connect("dispatcher") as dispatcher, \
            loaded.connect("watcher") as watcher:
        topology.declare(dispatcher, exchanges=[topology.control_exchange])
        channel = pilot.channel()
        # Not auto-deleted here, so it outlives consume_one's consumer (the pilot's stays).
        name = channel.queue_declare(queue="", exclusive=True, auto_delete=False).queue
        assert name.startswith("amq.gen-")
        channel.queue_bind(name, exchange="p3s.control", routing_key=topology.control_routing_key("p1"))
        order = encode(Control("drain", "p1"))
        publish(dispatcher, "p3s.control", topology.control_routing_key("p1"), order)
        got = consume_one(pilot, name)
        assert Control.parse(got.body).action == "drain"

        for exchange in ("p3s.tasks", "p3s.status", "p3s.events", "p3s.expired", "p3s.invalid"):
            refused(pilot, lambda ch, e=exchange: ch.queue_bind(name, exchange=e, routing_key="#"))
        # Refusals closed their channels only: the queue and its binding stay.
        assert channel.is_open
        for who in (pilot, watcher):
            refused_publish(who, "p3s.control", topology.control_routing_key("p1"))
        assert channel.basic_get(name, no_ack=True) is None, "no forged order got through"
        channel.close()


def test_passive_declare_of_dispatcher_queues(loaded: Loaded) -> None:
    """RabbitMQ checks no permission on a passive declare: it tells existence and depth, never content."""
    with loaded.connect("pilot") as pilot:
        channel = pilot.channel()
        name, _count, _consumers = channel.queue_declare("p3s.dispatcher.status", passive=True)
        assert name == "p3s.dispatcher.status"
        channel.close()
        # ... and a passive declare of its task queue is how a pilot user could read the depth.
        channel = pilot.channel()
        assert channel.queue_declare("p3s.tasks.default", passive=True)[0] == "p3s.tasks.default"
        channel.close()


def test_watcher_only_publishes_events(loaded: Loaded) -> None:
    with loaded.connect("watcher") as watcher, loaded.connect("dispatcher") as dispatcher:
        publish(watcher, "p3s.events", "file.raw", b'{"event": 1}')
        got = get(dispatcher, "p3s.dispatcher.events")
        assert got is not None and got.body == b'{"event": 1}'

        for exchange, key in [("p3s.tasks", "default"), ("p3s.status", "job.finished"),
                              ("p3s.status", "pilot.register"), ("p3s.expired", ""), ("p3s.invalid", ""),
                              ("", "p3s.dispatcher.events")]:
            refused_publish(watcher, exchange, key)
        assert get(dispatcher, "p3s.dispatcher.status", timeout=0.5) is None
        assert get(dispatcher, "p3s.tasks.default", timeout=0) is None

        publish(dispatcher, "p3s.tasks", "default", b'{"task": 1}')
        for queue in ("p3s.tasks.default", "p3s.dispatcher.events", "p3s.dispatcher.status",
                      "p3s.dispatcher.expired", "p3s.invalid"):
            refused(watcher, lambda ch, q=queue: ch.basic_consume(q, callback=lambda m: None))
            refused(watcher, lambda ch, q=queue: ch.basic_get(q))
        refused(watcher, lambda ch: ch.exchange_declare("p3s.events", "topic", durable=True, auto_delete=False))
        refused(watcher, lambda ch: ch.queue_declare("p3s.watcher-made", durable=True, auto_delete=False))
        assert get(dispatcher, "p3s.tasks.default") is not None, "the task is still there"


def test_real_watcher_publisher_under_the_watcher_user(loaded: Loaded) -> None:
    """The watcher's Publisher (confirms, declare_topology = false) works as the watcher user."""
    settings = load_settings(None, {"P3S_BROKER_URL": loaded.urls["watcher"], "P3S_BROKER_DECLARE_TOPOLOGY": "false"})
    publisher = Publisher(settings.broker, exchanges=[topology.events_exchange],
                          queues=[topology.invalid_queue, topology.events_queue])
    event = DataEvent(name="run1.dat", path="/data/run1.dat", stream="raw", seen_at=time.time())
    try:
        assert publisher.publish([Outgoing(topology.events_exchange, topology.event_routing_key("raw"),
                                           encode(event))]) == 1
    finally:
        publisher.close()
    with loaded.connect("dispatcher") as dispatcher:
        got = get(dispatcher, "p3s.dispatcher.events")
        assert got is not None and DataEvent.parse(got.body) == event


def test_watcher_sources_report_reaches_the_dispatcher_under_the_watcher_user(loaded: Loaded) -> None:
    """The watcher may write p3s.events only: its sources report goes there and is bound to the status queue."""
    from p3s.config import SourceSettings
    from p3s.messages import SourcesReport, parse_status
    from p3s.watcher.report import SourcesReporter

    settings = load_settings(None, {"P3S_BROKER_URL": loaded.urls["watcher"], "P3S_BROKER_DECLARE_TOPOLOGY": "false"})

    class Slot:
        settings = SourceSettings(name="buffer", location="/data/buffer")
        active = True
        healthy = True

    reporter = SourcesReporter(settings)
    try:
        assert reporter.maybe_send([Slot()]) and not reporter.refused
    finally:
        reporter.close()
    with loaded.connect("dispatcher") as dispatcher:
        got = get(dispatcher, "p3s.dispatcher.status")
        assert got is not None, "the report reached the dispatcher's status queue"
        report = parse_status(got.body)
        assert isinstance(report, SourcesReport) and report.sources[0]["name"] == "buffer"
        assert get(dispatcher, "p3s.dispatcher.events", timeout=0.5) is None, "not taken for a data event"


def test_real_pilot_runs_a_task_under_the_pilot_user(loaded: Loaded, tmp_path: Path) -> None:
    """p3s's own pilot, as the pilot user with declare_topology = false: takes a task, runs it, reports."""
    env = {
        "P3S_BROKER_URL": loaded.urls["pilot"],
        "P3S_BROKER_DECLARE_TOPOLOGY": "false",
        "P3S_STATE_DIR": str(tmp_path / "state"),
        "P3S_PILOT_WORK_ROOT": str(tmp_path / "work"),
        "P3S_PILOT_HEARTBEAT_S": "1",
    }
    settings = load_settings(None, env)
    assert settings.broker.declare_topology is False
    pilot = app.make_pilot(settings, queues=("default",), limits=Limits(max_jobs=1), pilot_id="least-privileged")
    errors: list[BaseException] = []

    def body() -> None:
        try:
            pilot.run()
            pilot.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=body, name="pilot", daemon=True)
    now = time.time()
    task = Task(job_id=4242, workflow_id=1, template="probe", node="hello",
                argv=[sys.executable, "-c", "print('hello from a least-privileged pilot')"],
                values={}, env={}, queue="default", priority=5, wall_s=30.0, deadline=now + 120,
                seen_at=now, enqueued_at=now)
    with loaded.connect("dispatcher") as dispatcher:
        drain(dispatcher, "p3s.dispatcher.status")
        thread.start()
        try:
            publish(dispatcher, "p3s.tasks", "default", encode(task), priority=5, content_type="application/json",
                    application_headers={"p3s-deadline": task.deadline})
            reports: list[tuple[str, dict[str, Any]]] = []
            end = time.monotonic() + 60
            while not any(key == "pilot.stop" for key, _ in reports) and time.monotonic() < end and not errors:
                message = get(dispatcher, "p3s.dispatcher.status", timeout=1)
                if message is not None:
                    reports.append((message.delivery_info["routing_key"], json.loads(message.body)))
        finally:
            pilot.should_stop = True
            thread.join(30)
        assert not thread.is_alive(), "the pilot did not stop"
        assert not errors, errors
        keys = [key for key, _ in reports]
        assert keys[0] == "pilot.register", keys
        assert "job.running" in keys and "job.finished" in keys, keys
        finished = next(r for key, r in reports if key == "job.finished")
        assert finished["job_id"] == 4242 and finished["exit_code"] == 0
        assert finished["pilot_id"] == "least-privileged"
        assert keys[-1] == "pilot.stop", keys
        assert get(dispatcher, "p3s.tasks.default", timeout=0) is None, "the task was taken"


def test_real_pilot_under_the_pilot_user_obeys_a_drain(loaded: Loaded, tmp_path: Path) -> None:
    """p3s's own pilot, least-privileged, makes its control queue and stops when the dispatcher's account says so."""
    env = {
        "P3S_BROKER_URL": loaded.urls["pilot"],
        "P3S_BROKER_DECLARE_TOPOLOGY": "false",
        "P3S_STATE_DIR": str(tmp_path / "state"),
        "P3S_PILOT_WORK_ROOT": str(tmp_path / "work"),
        "P3S_PILOT_HEARTBEAT_S": "1",
    }
    pilot = app.make_pilot(load_settings(None, env), queues=("default",), pilot_id="obedient")
    thread = threading.Thread(target=lambda: (pilot.run(), pilot.close()), name="pilot", daemon=True)
    with loaded.connect("dispatcher") as dispatcher:
        drain(dispatcher, "p3s.dispatcher.status")
        thread.start()
        try:
            wait_until(lambda: pilot.connections > 0, "the pilot consuming", timeout=30)
            publish(dispatcher, "p3s.control", topology.control_routing_key("obedient"),
                    encode(Control("drain", "obedient")))
            thread.join(30)
        finally:
            pilot.should_stop = True
            thread.join(30)
        assert not thread.is_alive(), "the pilot did not stop"
        assert not pilot.refused, pilot.refused
        reports = []
        while (message := get(dispatcher, "p3s.dispatcher.status", timeout=1)) is not None:
            reports.append((message.delivery_info["routing_key"], json.loads(message.body)))
        assert reports[-1][0] == "pilot.stop", reports
        assert reports[-1][1]["problem"] == "stopped by operator"


def test_pilot_declaring_the_topology_is_refused(loaded: Loaded, tmp_path: Path) -> None:
    """Why pilots need declare_topology = false: with it on, the pilot user's declares are refused.

    kombu's ConsumerMixin would retry that for ever; the pilot instead stops at
    once and says why, since no retry can grant a permission.
    """
    settings = load_settings(None, {"P3S_BROKER_URL": loaded.urls["pilot"], "P3S_STATE_DIR": str(tmp_path)})
    assert settings.broker.declare_topology is True
    with loaded.connect("pilot") as conn:
        refused(conn, lambda ch: topology.task_queue("default")(ch).declare())
    pilot = app.make_pilot(settings, queues=("default",), limits=Limits(max_jobs=1), pilot_id="over-reaching")
    thread = threading.Thread(target=pilot.run, name="pilot", daemon=True)
    with loaded.connect("dispatcher") as dispatcher:
        publish(dispatcher, "p3s.tasks", "default", b'{"task": 1}')
        thread.start()
        try:
            thread.join(15)
            assert not thread.is_alive(), "a refused pilot stops by itself"
            assert "refused" in pilot.refused and "over-reaching" in pilot.refused
            assert get(dispatcher, "p3s.dispatcher.status", timeout=1) is None, "it never registered"
        finally:
            pilot.should_stop = True
            thread.join(30)
            pilot.publisher.close()
            pilot.connection.release()
        assert not thread.is_alive()
        assert get(dispatcher, "p3s.tasks.default", timeout=0) is not None, "the task was never taken"
