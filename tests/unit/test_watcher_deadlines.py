"""The watcher's deadlines: a hung listing stops only its own source, failover runs on the monotonic clock.

The Watcher runs on the embedded broker; a hung mount is a listing that blocks
on a threading.Event for paths under one directory.  Names that are not UTF-8
are carried in the event JSON for the dispatcher to judge.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from p3s import topology
from p3s.config import SourceSettings
from p3s.watcher import poll
from p3s.watcher.service import Watcher
from tests.stack import make_settings
from tests.unit.test_watcher import embedded, published  # noqa: F401 (fixture)


class HungListing:
    """``os.scandir`` that blocks for paths under ``root`` while ``hung`` is set, as on a dead mount."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.hung = threading.Event()
        self.released = threading.Event()
        self.calls = 0  # listings that blocked
        self._real = os.scandir

    def __call__(self, path: Any = ".") -> Any:
        if self.hung.is_set() and str(path).startswith(self.root):
            self.calls += 1
            self.released.wait(30)
        return self._real(path)


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    out = {name: tmp_path / name for name in ("eos", "online", "spare")}
    for path in out.values():
        path.mkdir()
    return out


@pytest.fixture
def hung(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[HungListing]:
    listing = HungListing(dirs["eos"])
    # os.scandir for everyone (inotify's os.walk too): only the eos tree hangs.
    monkeypatch.setattr(poll.os, "scandir", listing)
    try:
        yield listing
    finally:
        listing.released.set()


def eos(path: Path, **kw: Any) -> SourceSettings:
    given: dict[str, Any] = {"scan_interval_s": 0.05, "stable_scans": 1, **kw}
    return SourceSettings(name="eos", kind="poll", location=str(path), pattern="*.dat", **given)


def spare(path: Path, **kw: Any) -> SourceSettings:
    return SourceSettings(name="spare", kind="inotify", location=str(path), pattern="*.dat",
                          fallback_for="eos", max_files_per_minute=600, **kw)


def run_until(watcher: Watcher, done: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while not (value := done()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        watcher.poll_once(0.05)
    return value


@pytest.mark.parametrize("hang_at", ["start", "later"])
def test_a_hung_listing_stops_only_its_source_and_the_fallback_takes_over(
    tmp_path: Path, dirs: dict[str, Path], hung: HungListing, embedded: Connection, hang_at: str  # noqa: F811
) -> None:
    sources = [
        eos(dirs["eos"], health_timeout_s=0.3),
        SourceSettings(name="online", kind="inotify", location=str(dirs["online"]), pattern="*.dat"),
        spare(dirs["spare"], failover_after_s=0.3),
    ]
    watcher = Watcher(make_settings(tmp_path), sources)
    slots = {slot.name: slot for slot in watcher.slots}
    seen: dict[str, str] = {}

    def arrived(*names: str) -> bool:
        seen.update((e.name, e.source) for e in published(embedded))
        return set(names) <= seen.keys()

    try:
        if hang_at == "start":
            hung.hung.set()
        watcher.rescan()  # returns although the start-up scan of eos hangs
        if hang_at == "later":
            (dirs["eos"] / "a.dat").write_bytes(b"a")
            run_until(watcher, lambda: arrived("a.dat"), what="a.dat from eos")
            hung.hung.set()
        run_until(watcher, lambda: hung.calls, what="a listing of eos to hang")

        # The inotify source beside the hung one keeps delivering.
        (dirs["online"] / "b.dat").write_bytes(b"b")
        run_until(watcher, lambda: arrived("b.dat"), what="b.dat from the online source")
        # eos turns unhealthy once its scan overran its deadline, and the fallback takes over.
        run_until(watcher, lambda: not slots["eos"].healthy, what="eos to turn unhealthy")
        assert "has not returned within 0.3s" in slots["eos"].source.last_error  # type: ignore[attr-defined]
        run_until(watcher, lambda: slots["spare"].active, what="the fallback to take over")
        (dirs["spare"] / "c.dat").write_bytes(b"c")
        run_until(watcher, lambda: arrived("c.dat"), what="c.dat from the fallback")
        assert seen["b.dat"] == "online" and seen["c.dat"] == "spare"
        assert hung.calls == 1, "no other scan was started while one hung"
        assert slots["eos"].scanner is not None and slots["eos"].scanner.busy

        # The mount answers again: the late scan is taken, the next is healthy, the fallback idles.
        hung.hung.clear()
        hung.released.set()
        (dirs["eos"] / "d.dat").write_bytes(b"d")
        run_until(watcher, lambda: arrived("d.dat") and not slots["spare"].active, what="eos to be back")
        assert seen["d.dat"] == "eos"
    finally:
        hung.released.set()
        watcher.close()


def test_close_does_not_wait_for_a_hung_scan(
    tmp_path: Path, dirs: dict[str, Path], hung: HungListing, embedded: Connection  # noqa: F811
) -> None:
    watcher = Watcher(make_settings(tmp_path), [eos(dirs["eos"], health_timeout_s=0.3)])
    hung.hung.set()
    watcher.rescan()
    run_until(watcher, lambda: hung.calls, what="a listing of eos to hang")
    thread = next(t for t in threading.enumerate() if t.name == "p3s-scan-eos")
    assert thread.daemon, "a hung scan thread must never keep the process alive"
    watcher.close()  # returns: the hung thread is abandoned
    assert thread.is_alive()
    hung.released.set()
    thread.join(5)
    assert not thread.is_alive(), "once the mount answers, the abandoned thread ends"


def test_a_scan_result_waiting_for_backlog_room_is_not_a_hang(tmp_path: Path, dirs: dict[str, Path]) -> None:
    """With the broker away and the backlog full, a scan that returned waits to be taken: eos stays healthy."""
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(tmp_path, f"amqp://guest:guest@127.0.0.1:{port}//", P3S_WATCHER_BACKLOG_MAX="1")
    # Scans due at every pass: one is asked for in the pass that fills the backlog.
    watcher = Watcher(settings, [eos(dirs["eos"], health_timeout_s=0.2, scan_interval_s=0.0)])
    slot = watcher.slots[0]
    try:
        watcher.rescan()
        (dirs["eos"] / "a.dat").write_bytes(b"a")
        run_until(watcher, lambda: watcher.backlog, what="a.dat in the backlog")
        run_until(watcher, lambda: slot.scanner is not None and slot.scanner.busy, what="the next scan")
        end = time.monotonic() + 1.0  # five deadlines
        while time.monotonic() < end:
            watcher.poll_once(0.05)
            assert slot.healthy, slot.source.last_error  # type: ignore[attr-defined]
        assert [e.name for e in watcher.backlog] == ["a.dat"]
    finally:
        watcher.close()


class Clock:
    """time.time that can jump, as the wall clock does under NTP steps or a mistaken operator."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._real = time.time

    def __call__(self) -> float:
        return self._real() + self.offset


@pytest.mark.parametrize("jump", [-86400.0, 86400.0])
def test_failover_timing_ignores_wall_clock_jumps(
    tmp_path: Path, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, jump: float
) -> None:
    """eos is unhealthy from the start (its mount is gone): the fallback takes over after failover_after_s."""
    failover_after_s = 0.5
    gone = dirs["eos"] / "mount"  # never created: every scan fails at once
    watcher = Watcher(make_settings(tmp_path), [eos(gone), spare(dirs["spare"], failover_after_s=failover_after_s)])
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    slot = watcher.slots[1]
    try:
        watcher.rescan()
        run_until(watcher, lambda: not watcher.slots[0].healthy, what="eos to turn unhealthy")
        started = time.monotonic()
        clock.offset = jump  # a day forward must not fail over early, a day back must not delay it
        while time.monotonic() - started < failover_after_s * 0.6:
            watcher.poll_once(0.02)
            assert not slot.active, f"failed over after {time.monotonic() - started:.2f}s on a wall clock jump"
        run_until(watcher, lambda: slot.active, timeout=5, what="the fallback to take over")
    finally:
        watcher.close()


@pytest.mark.parametrize("kind", ["inotify", "poll"])
def test_a_name_that_is_not_utf8_is_carried_in_valid_json(
    tmp_path: Path, embedded: Connection, kind: str  # noqa: F811
) -> None:
    """The watcher refuses nothing: a lone surrogate from os.fsdecode is escaped in the JSON body."""
    watch = tmp_path / "buffer"
    watch.mkdir()
    raw = os.fsencode(watch) + b"/run\xff.dat"
    src = SourceSettings(name=f"buf-{kind}", kind=kind, location=str(watch), scan_interval_s=0.05, stable_scans=1)
    watcher = Watcher(make_settings(tmp_path), [src])
    try:
        watcher.rescan()
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x")
        os.close(fd)
        bodies: list[bytes] = []
        queue = topology.events_queue(embedded.default_channel)

        def body() -> list[bytes]:
            while (message := queue.get(no_ack=True)) is not None:
                bodies.append(message.body)
            return bodies

        (only,) = run_until(watcher, body, what="the event")
        only.decode("ascii")  # surrogates are escaped, never written as invalid UTF-8
        event = json.loads(only)
        assert os.fsencode(event["name"]) == b"run\xff.dat"
        assert os.fsencode(event["path"]) == raw
        # What the dispatcher receives survives another round through the encoder.
        assert json.loads(json.dumps(event)) == event
    finally:
        watcher.close()



def test_an_xrootd_name_that_is_not_utf8_is_carried_unchanged(tmp_path: Path) -> None:
    """xrdfs prints raw bytes: they must reach the event as the same bytes (escaped), not as U+FFFD."""
    from p3s.messages import encode
    from p3s.watcher.files import Selector, to_event
    from p3s.watcher.xrootd import XrootdSource

    xrdfs = tmp_path / "xrdfs"  # stands in for the client: one file whose name has the byte 0xff
    xrdfs.write_text("#!/bin/sh\nprintf -- '-rw-r--r-- u g 5 2024-01-01 12:00:00 /data/run\\377.dat\\n'\n")
    xrdfs.chmod(0o755)
    settings = SourceSettings(name="eos", kind="xrootd", location="root://127.0.0.1:1094//data", stable_scans=1)
    source = XrootdSource(settings, Selector("*.dat", ()), rescan_age_s=10 * 365 * 86400.0, xrdfs=str(xrdfs))
    (seen,) = source.read()
    assert source.healthy
    event = json.loads(encode(to_event(settings, seen)).decode("ascii"))
    assert os.fsencode(event["name"]) == b"run\xff.dat"
    assert event["path"] == "root://127.0.0.1:1094//data/run\udcff.dat"
