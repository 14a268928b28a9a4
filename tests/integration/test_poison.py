"""Poison input: no message stalls the dispatcher's intake or kills it, now or on a restart.

Each test publishes one bad body to the real exchanges, beside good events,
before a ``p3s dispatcher`` subprocess starts (so they arrive in one batch),
and runs a ``p3s pilot`` subprocess.  The bad body must end in ``p3s.invalid``
with the reason and the queue it came from in its headers, the good events must
be recorded and their jobs finish, the dispatcher must stay alive, and
``p3s audit`` must balance.

- the database would refuse it (issue 9, case 2): too long, NUL characters,
  integers out of the columns' range;
- it would raise in the dispatcher (case 3): deep nesting, a lone surrogate,
  states and types no parser checked, non-finite times;
- a file whose name is not UTF-8, seen by a ``p3s watcher`` (case 4).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kombu import Exchange

from p3s import topology
from tests.procs import InvalidReader, Part, Parts, amqp, event_body, finished_names, import_template, publish_raw
from tests.stack import graphml, make_settings, probe_command

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

EVENTS = topology.events_exchange
STATUS = topology.status_exchange


@dataclass
class World:
    """One test's servers, data directory and parts."""

    url: str
    data: Path
    parts: Parts
    invalid: InvalidReader
    running: list[Part] = field(default_factory=list)  # the parts that must stay alive

    def good_events(self, prefix: str, count: int = 3) -> list[tuple[str, bytes]]:
        """Events for files that exist, as a watcher would publish them."""
        out = []
        for i in range(count):
            name = f"{prefix}_{i:04d}.dat"
            path = self.data / name
            path.write_bytes(b"good data")
            out.append((name, event_body(name, str(path))))
        return out

    def publish(self, exchange: Exchange, routing_key: str, *bodies: bytes) -> None:
        with amqp(self.url) as conn:
            publish_raw(conn, exchange, routing_key, bodies)

    def start(self, name: str, *args: str) -> Part:
        part = self.parts.start(name, *args)
        self.running.append(part)
        return part

    def start_dispatcher(self) -> Part:
        return self.start("dispatcher", "dispatcher")

    def start_pilot(self) -> Part:
        return self.start("pilot", "pilot", "--queues", "default", "--id", "poison-pilot")

    def stop(self, part: Part) -> None:
        """Stop a part on purpose: it must exit cleanly."""
        self.running.remove(part)
        assert part.stop() == 0, part.describe()

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
        return self.parts.wait_for(predicate, timeout=timeout, what=what, alive=self.running)

    def assert_alive(self) -> None:
        self.parts.assert_alive(*self.running)

    def restart_dispatcher(self, dispatcher: Part) -> Part:
        """Stop the dispatcher and start another; it must still be alive a while after it consumes."""
        self.stop(dispatcher)
        again = self.start_dispatcher()
        self.wait_consuming(again)
        time.sleep(1.0)  # a message left unacked is delivered, and raises, at once
        self.assert_alive()
        return again

    def wait_consuming(self, dispatcher: Part) -> None:
        self.wait_for(lambda: dispatcher.log_has("dispatcher: consuming on"), what="the dispatcher to consume")

    def wait_finished(self, names: list[str], what: str, timeout: float = 30.0) -> None:
        self.wait_for(lambda: finished_names(self.parts.db_jobs()) >= set(names), timeout=timeout, what=what)

    def wait_refused(self, body: bytes, queue: str) -> dict[str, Any]:
        """The headers of ``body`` once the dispatcher has refused it to p3s.invalid."""
        headers = self.wait_for(lambda: self.invalid.find(body), what=f"the bad body in p3s.invalid (from {queue})")
        check_invalid_headers(headers, queue)
        return headers

    def check_books(self, accepted: list[str]) -> list[dict[str, Any]]:
        """``p3s files --json`` shows ``accepted`` accepted, anything else refused; the audit balances."""
        files = self.parts.files()
        assert sorted(f["name"] for f in files if f["decision"] == "accepted") == sorted(accepted), files
        assert {f["decision"] for f in files} <= {"accepted", "refused"}, files
        audit = self.parts.audit()
        assert audit.returncode == 0, f"p3s audit exited {audit.returncode}:\n{audit.stdout}{audit.stderr}"
        return files


def check_invalid_headers(headers: dict[str, Any], queue: str) -> None:
    reason = headers.get("p3s-reason")
    assert isinstance(reason, str | bytes) and reason.strip(), headers
    got_queue = headers.get("p3s-queue")
    got_queue = got_queue.decode() if isinstance(got_queue, bytes) else got_queue
    assert got_queue == queue, headers


@pytest.fixture
def world(tmp_path: Path, broker_url: str, database_url: str) -> Iterator[World]:
    settings = make_settings(tmp_path, broker_url, database_url)
    import_template(settings, graphml({"probe": {"command": probe_command()}}, budget_s=60))
    data = tmp_path / "data"
    data.mkdir()
    with Parts(tmp_path, settings) as parts:
        yield World(broker_url, data, parts, InvalidReader(broker_url))


# -- the bad bodies --------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad body: where it goes, and how to make it (given an existing job's id)."""

    exchange: Exchange
    routing_key: str
    make: Callable[[Path, int], bytes]
    needs_job: bool = False

    @property
    def queue(self) -> str:
        return (topology.events_queue if self.exchange is EVENTS else topology.status_queue).name


def _event(name: str, **fields: Any) -> Callable[[Path, int], bytes]:
    return lambda data, _job: event_body(name, str(data / "bad.dat"), **fields)


def _pilot(**fields: Any) -> Callable[[Path, int], bytes]:
    def make(_data: Path, _job: int) -> bytes:
        body = {"v": 1, "pilot_id": "poison-report", "event": "heartbeat", "host": "wn042", "pid": 4242,
                "queues": ["default"], "state": "idle", "sent_at": time.time(), "jobs_done": 0, **fields}
        return json.dumps(body).encode()

    return make


def _exit_code(code: int) -> Callable[[Path, int], bytes]:
    def make(_data: Path, job: int) -> bytes:
        now = time.time()
        body = {"v": 1, "job_id": job, "state": "failed", "pilot_id": "poison-report", "sent_at": now,
                "exit_code": code, "started_at": now - 1, "ended_at": now}
        return json.dumps(body).encode()

    return make


def _text(text: str) -> Callable[[Path, int], bytes]:
    return lambda _data, _job: text.encode()


DEEP = "[" * 10_000 + "]" * 10_000

#: Case 2: the parsers let these through and PostgreSQL refuses them.
REFUSED_BY_DATABASE = {
    "name_600_chars": Bad(EVENTS, "file.raw", _event("n" * 596 + ".dat")),
    "nul_in_name": Bad(EVENTS, "file.raw", _event("bad\x00name.dat")),
    "nul_in_path": Bad(EVENTS, "file.raw", lambda data, _job: event_body("nulpath.dat", f"{data}/nul\x00path.dat")),
    "size_2_63": Bad(EVENTS, "file.raw", _event("huge.dat", size=2**63)),
    "pilot_pid_2_31": Bad(STATUS, "pilot.heartbeat", _pilot(pid=2**31)),
    "exit_code_2_31": Bad(STATUS, "job.failed", _exit_code(2**31), needs_job=True),
}

#: Case 3: each of these raised in the dispatcher's thread, and again after every restart.
KILLERS = {
    "deep_field": Bad(EVENTS, "file.raw", lambda data, _job: (
        '{"v":1,"name":"deep.dat","path":"%s","stream":"raw","seen_at":%r,"extra":%s}'
        % (data / "deep.dat", time.time(), DEEP)).encode()),
    "deep_bare": Bad(EVENTS, "file.raw", _text(DEEP)),
    "lone_surrogate_in_source": Bad(EVENTS, "file.raw", lambda data, _job: (
        '{"v":1,"name":"surrogate.dat","path":"%s","stream":"raw","seen_at":%r,"source":"a\\ud800b"}'
        % (data / "surrogate.dat", time.time())).encode()),
    "pilot_state_flying": Bad(STATUS, "pilot.heartbeat", _pilot(state="flying")),
    "pilot_queues_ints": Bad(STATUS, "pilot.heartbeat", _pilot(queues=[1, 2])),
    "seen_at_nan": Bad(EVENTS, "file.raw", _event("nan.dat", seen_at=math.nan)),
    "seen_at_infinity": Bad(EVENTS, "file.raw", _event("inf.dat", seen_at=math.inf)),
}


def make_victim(world: World) -> int:
    """A job that exists and is queued: a dispatcher records one event, then stops."""
    ((_name, body),) = world.good_events("victim", 1)
    world.publish(EVENTS, "file.raw", body)
    dispatcher = world.start_dispatcher()
    jobs = world.wait_for(lambda: [j for j in world.parts.db_jobs() if j["state"] == "queued"],
                          what="the victim's job to be queued")
    world.stop(dispatcher)
    return int(jobs[0]["id"])


def poison_beside_good(world: World, bad: Bad) -> tuple[Part, list[str]]:
    """Publish ``bad`` among three good events, start a dispatcher and a pilot, and see both handled.

    Returns the dispatcher and the names of the files whose jobs finished.
    """
    victim = make_victim(world) if bad.needs_job else 0
    body = bad.make(world.data, victim)
    good = world.good_events("good")
    world.publish(EVENTS, "file.raw", good[0][1])
    world.publish(bad.exchange, bad.routing_key, body)
    world.publish(EVENTS, "file.raw", *(b for _n, b in good[1:]))
    dispatcher = world.start_dispatcher()
    world.start_pilot()
    world.wait_consuming(dispatcher)
    names = [n for n, _b in good] + (["victim_0000.dat"] if bad.needs_job else [])
    world.wait_refused(body, bad.queue)
    world.wait_finished(names, "the good events' jobs to finish")
    world.assert_alive()
    return dispatcher, names


@pytest.mark.parametrize("kind", sorted(REFUSED_BY_DATABASE))
def test_a_body_the_database_refuses_is_set_aside(world: World, kind: str) -> None:
    _dispatcher, names = poison_beside_good(world, REFUSED_BY_DATABASE[kind])
    world.check_books(names)
    world.assert_alive()


@pytest.mark.parametrize("kind", sorted(KILLERS))
def test_a_body_that_raised_is_set_aside_and_stays_harmless(world: World, kind: str) -> None:
    dispatcher, names = poison_beside_good(world, KILLERS[kind])
    not_finite = [j for j in world.parts.db_jobs() if not math.isfinite(j["deadline"])]
    assert not not_finite, not_finite

    # A good event published afterwards is processed as usual.
    ((late, late_body),) = world.good_events("late", 1)
    world.publish(EVENTS, "file.raw", late_body)
    world.wait_finished([*names, late], "a later good event's job to finish")

    # Nothing of the poison is left to kill a restarted dispatcher.
    world.restart_dispatcher(dispatcher)
    world.check_books([*names, late])
    world.assert_alive()


def test_a_lone_surrogate_in_a_file_name_is_set_aside(world: World) -> None:
    """A name that is not text: refused to p3s.invalid, or recorded ``refused``; never a crash."""
    good = world.good_events("good")
    body = ('{"v":1,"name":"a\\ud800.dat","path":"%s","stream":"raw","seen_at":%r}'
            % (world.data / "a.dat", time.time())).encode()
    world.publish(EVENTS, "file.raw", good[0][1], body, *(b for _n, b in good[1:]))
    dispatcher = world.start_dispatcher()
    world.start_pilot()
    names = [n for n, _b in good]

    def set_aside() -> bool:
        headers = world.invalid.find(body)
        if headers is not None:
            check_invalid_headers(headers, topology.events_queue.name)
            return True
        return any(f["decision"] == "refused" for f in world.parts.db_files())

    world.wait_for(set_aside, what="the bad event in p3s.invalid or recorded refused")
    world.wait_finished(names, "the good events' jobs to finish")
    world.restart_dispatcher(dispatcher)
    world.check_books(names)
    world.assert_alive()


def test_a_file_name_that_is_not_utf8_is_refused_and_recorded(world: World, tmp_path: Path) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    dispatcher = world.start_dispatcher()
    pilot = world.start_pilot()
    watcher = world.start("watcher", "watcher", "--watch", str(watch))
    world.wait_consuming(dispatcher)
    world.wait_for(lambda: watcher.log_has("watcher: following") and pilot.log_has("waiting for tasks"),
                   what="the watcher and the pilot to start")

    fd = os.open(os.fsencode(watch) + b"/np04_raw_\xff\xfe_latin\xe9.dat", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"bad name, good data")
    finally:
        os.close(fd)

    def refused() -> list[dict[str, Any]]:
        return [f for f in world.parts.db_files() if f["decision"] == "refused"]

    (row,) = world.wait_for(refused, what="the file to be recorded refused")
    assert re.search(r"utf-?8", row["reason"] or "", re.IGNORECASE), row
    world.assert_alive()

    good = "np04_raw_run000200_0000.dat"
    (watch / good).write_bytes(b"good data")
    world.wait_finished([good], "the good file's job to finish")

    world.restart_dispatcher(dispatcher)
    files = world.check_books([good])
    (shown,) = [f for f in files if f["decision"] == "refused"]
    assert re.search(r"utf-?8", shown["reason"] or "", re.IGNORECASE), shown
    world.assert_alive()
