"""The watcher on the real RabbitMQ through a quiet spell and a hung primary source.

Events are read back from the dispatcher's events queue with a plain kombu
connection that asks for no heartbeat, so RabbitMQ never drops it and it tells
the watcher's own connection apart in ``rabbitmqctl list_connections``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from kombu import Connection

from p3s import topology
from p3s.config import SourceSettings
from p3s.messages import DataEvent
from p3s.watcher import poll
from tests.conftest import rabbitmqctl
from tests.integration.test_xrootd import WatcherThread
from tests.stack import make_settings, wait_for

pytestmark = [pytest.mark.rabbitmq]

HEARTBEAT_S = 2
# RabbitMQ closes a connection that sent nothing for about two heartbeats: stay quiet well past that.
QUIET_S = 10.0


class EventReader:
    """The data events that reached the events queue, in order."""

    def __init__(self, url: str) -> None:
        self.connection = Connection(url, heartbeat=0)
        self.queue = topology.events_queue(self.connection.default_channel)
        self.queue.declare()  # before the watcher's first publish, so nothing is unroutable
        self.events: list[DataEvent] = []

    def read(self) -> list[DataEvent]:
        while (message := self.queue.get(no_ack=True)) is not None:
            self.events.append(DataEvent.parse(message.body))
        return self.events

    def names(self) -> list[str]:
        return [e.name for e in self.read()]

    def close(self) -> None:
        self.connection.release()


@pytest.fixture
def events(broker_url: str) -> Iterator[EventReader]:
    reader = EventReader(broker_url)
    try:
        yield reader
    finally:
        reader.close()


def heartbeating_connections(broker_url: str) -> set[tuple[str, str]]:
    """(peer port, negotiated heartbeat) of the connections in this test's vhost that heartbeat."""
    vhost = unquote(urlsplit(broker_url).path[1:])
    out = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "peer_port", "timeout").stdout
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    return {(port, timeout) for v, port, timeout in rows if v == vhost and timeout != "0"}


def broker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("p3s") and r.levelno >= logging.WARNING]


def test_a_quiet_spell_longer_than_the_heartbeat(
    tmp_path: Path, broker_url: str, events: EventReader, caplog: pytest.LogCaptureFixture
) -> None:
    """A file after an idle spell goes out on the same, heartbeated connection, with no warning."""
    caplog.set_level(logging.INFO, logger="p3s")
    watch = tmp_path / "buffer"
    watch.mkdir()
    settings = make_settings(tmp_path, broker_url, P3S_BROKER_HEARTBEAT_S=str(HEARTBEAT_S))
    runner = WatcherThread(settings, [SourceSettings(name="buffer", location=str(watch), pattern="*.dat")]).start()
    try:
        wait_for(runner.watcher.ready.is_set, timeout=10, what="the watcher to start")
        (watch / "run1_a.dat").write_bytes(b"a")
        wait_for(lambda: events.names() == ["run1_a.dat"], timeout=10, what="the first event")
        before = wait_for(lambda: heartbeating_connections(broker_url), timeout=10, what="the watcher's connection")
        assert {timeout for _port, timeout in before} == {str(HEARTBEAT_S)}, before

        time.sleep(QUIET_S)  # nothing to publish: only heartbeats keep the connection open
        (watch / "run1_b.dat").write_bytes(b"b")
        wait_for(lambda: events.names() == ["run1_a.dat", "run1_b.dat"], timeout=10, what="the event after the spell")
        assert broker_warnings(caplog) == [], "a quiet spell is not a broker outage"
        assert heartbeating_connections(broker_url) == before, "the watcher's connection lived through the spell"
    finally:
        runner.stop()


class HangingOs:
    """``os`` for the poll module, whose listing of one tree blocks while ``hung`` is set: a dead mount."""

    def __init__(self, real: ModuleType, root: Path) -> None:
        self._real = real
        self._root = str(root)
        self.hung = threading.Event()
        self.released = threading.Event()
        self.blocked = 0

    def _maybe_hang(self, path: Any) -> None:
        if self.hung.is_set() and str(path).startswith(self._root):
            self.blocked += 1
            self.released.wait(60)

    def stat(self, path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        self._maybe_hang(path)
        return self._real.stat(path, *args, **kwargs)

    def scandir(self, path: Any) -> Any:
        self._maybe_hang(path)
        return self._real.scandir(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_hung_primary_scan_fails_over_to_the_inotify_fallback(
    tmp_path: Path, broker_url: str, events: EventReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    eos, buffer = tmp_path / "eos", tmp_path / "buffer"
    eos.mkdir()
    buffer.mkdir()
    mount = HangingOs(os, eos)
    monkeypatch.setattr(poll, "os", mount)
    primary = SourceSettings(name="eos", kind="poll", location=str(eos), pattern="*.dat",
                             scan_interval_s=0.2, stable_scans=1, health_timeout_s=1.0)
    fallback = SourceSettings(name="buffer", kind="inotify", location=str(buffer), pattern="*.dat",
                              fallback_for="eos", failover_after_s=1.0, max_files_per_minute=600)
    runner = WatcherThread(make_settings(tmp_path, broker_url), [primary, fallback]).start()
    slot = runner.watcher.slots[1]

    def sources() -> dict[str, str]:
        return {e.name: e.source for e in events.read()}

    try:
        wait_for(runner.watcher.ready.is_set, timeout=10, what="the watcher to start")
        (eos / "run1_a.dat").write_bytes(b"a")
        wait_for(lambda: sources().get("run1_a.dat") == "eos", timeout=10, what="run1_a.dat from the primary")

        # The mount hangs: the next scan never returns.
        mount.hung.set()
        (buffer / "run1_b.dat").write_bytes(b"b")  # while the fallback is idle: found by its takeover rescan
        wait_for(lambda: mount.blocked, timeout=10, what="a scan to hang")
        wait_for(lambda: slot.active, timeout=15, what="the fallback to take over from the hung primary")
        (buffer / "run1_c.dat").write_bytes(b"c")  # seen by inotify while active
        wait_for(lambda: {"run1_b.dat", "run1_c.dat"} <= sources().keys(), timeout=10, what="the fallback's files")
        assert sources()["run1_b.dat"] == sources()["run1_c.dat"] == "buffer"
        assert mount.blocked == 1, "no second scan is started while one hangs"
    finally:
        mount.released.set()
        runner.stop()
