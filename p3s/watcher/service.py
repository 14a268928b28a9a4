"""The watcher daemon: sources in, confirmed data events out, a bounded backlog between.

An event leaves the backlog only when the broker has confirmed it, so a broker
outage delays events but loses none; while the broker is away the sources are
still read, until the backlog is full.  One loop waits for inotify sources and
for the results of listed sources, whose scans run in threads of their own
(p3s/watcher/scanner.py), and heartbeats the publisher's connection between
files, so a quiet spell does not cost it.
"""

from __future__ import annotations

import logging
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from p3s import metrics, topology
from p3s.broker import Outgoing, Publisher
from p3s.config import Settings, SourceSettings
from p3s.errors import BrokerUnavailable
from p3s.messages import DataEvent, encode
from p3s.watcher.files import Budget, FileSeen, Selector, Source, to_event
from p3s.watcher.inotify import InotifySource
from p3s.watcher.poll import PollSource
from p3s.watcher.report import SourcesReporter
from p3s.watcher.scanner import ScanDone, ScanThread, Wakeup, mark_unhealthy
from p3s.watcher.xrootd import XrootdSource

log = logging.getLogger(__name__)

PUBLISH_BATCH = 500
# How far before its primary failed a fallback looks back when it takes over.
FAILOVER_MARGIN_S = 60.0


def event_message(event: DataEvent) -> Outgoing:
    return Outgoing(topology.events_exchange, topology.event_routing_key(event.stream), encode(event))


def make_source(src: SourceSettings, settings: Settings) -> Source:
    """The source object for one configured source, by its kind."""
    selector = Selector(src.pattern, settings.watcher.ignore)
    if src.kind == "inotify":
        return InotifySource(src, selector)
    if src.kind == "poll":
        return PollSource(src, selector, settings.watcher.rescan_age_s)
    if src.kind == "xrootd":
        return XrootdSource(src, selector, settings.watcher.rescan_age_s)
    raise ValueError(f"source {src.name}: unknown kind {src.kind!r}")


@dataclass(eq=False)
class Slot:
    """A source and what the watcher keeps about it: when to poll it, and its failover role."""

    settings: SourceSettings
    source: Source
    due: float = 0.0  # monotonic: when a source without a descriptor is read next
    scanner: ScanThread | None = None  # runs the scans of a source without a descriptor
    primary: Slot | None = None  # set on a fallback
    active: bool = True  # a fallback publishes only while active
    unhealthy_since: float | None = None  # monotonic, on a source that can be unhealthy
    budget: Budget | None = None
    held: deque[FileSeen] = field(default_factory=deque)  # a fallback's files waiting for budget

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def role(self) -> str:
        return "fallback" if self.settings.fallback_for else "primary"

    @property
    def polled(self) -> bool:
        return self.source.fileno() is None

    @property
    def healthy(self) -> bool:
        # An inotify source has no notion of health: a local disk answers or the host is down.
        return bool(getattr(self.source, "healthy", True))


class Watcher:
    """Follows every configured source and publishes one data event per complete file.

    Sources with a file descriptor (inotify) are waited for with select();
    the others (poll, xrootd) are read every ``scan_interval_s``.  A source with
    ``fallback_for`` publishes only while its primary has been unhealthy for
    ``failover_after_s``, and then at most ``max_files_per_minute``.
    """

    def __init__(
        self,
        settings: Settings,
        sources: Sequence[SourceSettings] | None = None,
        make: Callable[[SourceSettings, Settings], Source] = make_source,
    ) -> None:
        self.settings = settings
        self.sources_settings = tuple(sources if sources is not None else settings.sources)
        if not self.sources_settings:
            raise ValueError("no sources configured")
        names = {s.name for s in self.sources_settings}
        for src in self.sources_settings:
            if src.fallback_for and (src.fallback_for not in names or src.fallback_for == src.name):
                raise ValueError(f"source {src.name}: fallback_for names no other source: {src.fallback_for!r}")
        self.publisher = Publisher(
            settings.broker,
            exchanges=[topology.events_exchange],
            queues=[topology.invalid_queue, topology.events_queue],
        )
        self.backlog: deque[DataEvent] = deque()
        self.reporter = SourcesReporter(settings)
        self.ready = threading.Event()
        self.should_stop = False
        self._retry_at = 0.0
        self._backoff = 0.5
        self._wakeup = Wakeup()
        self._scans_done: queue.SimpleQueue[ScanDone] = queue.SimpleQueue()
        self.slots: list[Slot] = []
        try:
            for src in self.sources_settings:
                slot = Slot(src, make(src, settings))
                self.slots.append(slot)
                if slot.polled:
                    slot.scanner = ScanThread(slot.source, self._scans_done, self._wakeup)
        except BaseException:
            self.close()
            raise
        by_name = {slot.name: slot for slot in self.slots}
        for slot in self.slots:
            if slot.settings.fallback_for:
                slot.primary = by_name[slot.settings.fallback_for]
                slot.active = False
                slot.budget = Budget(slot.settings.max_files_per_minute)
            metrics.SOURCE_ACTIVE.labels(slot.name, slot.role).set(1 if slot.active else 0)

    @property
    def sources(self) -> list[tuple[SourceSettings, Source]]:
        return [(slot.settings, slot.source) for slot in self.slots]

    def _enqueue(self, src: SourceSettings, items: Sequence[FileSeen]) -> int:
        """Put events in the backlog; return how many fitted."""
        done = 0
        for seen in items:
            if len(self.backlog) >= self.settings.watcher.backlog_max:
                # Never drop a seen file: the start-up rescan finds what is left unread.
                log.error(
                    "watcher: backlog full (%d), a file seen on %s waits for a rescan", len(self.backlog), src.name
                )
                break
            self.backlog.append(to_event(src, seen))
            done += 1
        metrics.WATCHER_BACKLOG.set(len(self.backlog))
        return done

    def _deliver(self, slot: Slot, items: Sequence[FileSeen]) -> None:
        if slot.primary is None:
            self._enqueue(slot.settings, items)
        elif slot.active:
            room = self.settings.watcher.backlog_max - len(slot.held)
            if len(items) > room:
                log.error("source %s: %d file(s) over the held limit wait for a rescan", slot.name, len(items) - room)
            slot.held.extend(items[: max(0, room)])
        elif items:
            # Idle: the primary reports these files; an inotify fd is still read so its queue never overflows.
            log.debug("source %s: idle, %d file(s) left to %s", slot.name, len(items), slot.settings.fallback_for)

    def rescan(self) -> None:
        """Publish files written while the watcher was not running (duplicates are harmless).

        A listed source's rescan runs in its scan thread: its files are
        delivered when it returns, and a hung mount does not hold up the start.
        """
        now = time.monotonic()
        age = self.settings.watcher.rescan_age_s
        for slot in self.slots:
            if slot.primary is not None:
                continue  # an idle fallback costs its disks nothing; it rescans when it takes over
            metrics.WATCHER_RESCANS.labels(slot.name).inc()
            slot.due = now + slot.settings.scan_interval_s
            if slot.scanner is not None:
                slot.scanner.submit("rescan", age)
                continue
            found = slot.source.scan(age)
            log.info("source %s: start-up rescan found %d file(s) newer than %.0fs", slot.name, len(found), age)
            self._deliver(slot, found)

    def _after_read(self, slot: Slot) -> None:
        if slot.healthy:
            slot.unhealthy_since = None
        elif slot.unhealthy_since is None:
            slot.unhealthy_since = time.monotonic()

    def _next_wake(self) -> float:
        """The monotonic time of the next scan due or scan deadline."""
        times = [float("inf")]
        for slot in self.slots:
            scanner = slot.scanner
            if scanner is None:
                continue
            if scanner.started is None:
                if slot.active:
                    times.append(slot.due)
            elif scanner.running and not scanner.overdue:
                times.append(scanner.started + slot.settings.health_timeout_s)
        return min(times)

    def poll_once(self, timeout: float) -> None:
        """Wait up to ``timeout`` for sources to report, start the scans that are due, publish."""
        if len(self.backlog) < self.settings.watcher.backlog_max:
            waiting = [s for s in self.slots if not s.polled]
            timeout = max(0.0, min(timeout, self._next_wake() - time.monotonic()))
            readable: list[Any] = [self._wakeup, *(s.source for s in waiting)]
            ready, _w, _x = select.select(readable, [], [], timeout)
            if self._wakeup in ready:
                self._wakeup.clear()
            for slot in waiting:
                if slot.source in ready:
                    self._deliver(slot, slot.source.read())
            self._take_scans()
            now = time.monotonic()
            for slot in self.slots:
                if slot.scanner is not None and not slot.scanner.busy and slot.active and now >= slot.due:
                    slot.due = now + slot.settings.scan_interval_s
                    slot.scanner.submit("read")
        elif timeout:
            time.sleep(timeout)
        self._check_deadlines()
        self.update_failover()
        self.release_held()
        # Between files the publisher's connection is otherwise silent, and the broker
        # closes a connection that misses its heartbeats.
        self.publisher.heartbeat_check()
        self.publish_backlog()
        # Only while events flow: a broker that does not answer must not hold the loop up twice.
        self.reporter.maybe_send(self.slots, broker_ok=not self.backlog)

    def _take_scans(self) -> None:
        """Deliver the results of the scans that returned."""
        by_name = {slot.name: slot for slot in self.slots}
        while True:
            try:
                done = self._scans_done.get_nowait()
            except queue.Empty:
                return
            slot = by_name[done.source]
            assert slot.scanner is not None
            if slot.scanner.overdue:
                log.info("source %s: a %s that overran its deadline returned", slot.name, done.kind)
            slot.scanner.returned()
            if done.error:
                mark_unhealthy(slot.source, done.error)
            if done.kind == "rescan":
                log.info("source %s: rescan found %d file(s)", slot.name, len(done.found))
            self._deliver(slot, done.found)
            self._after_read(slot)

    def _check_deadlines(self) -> None:
        """Mark unhealthy a listed source whose scan has not returned within its ``health_timeout_s``."""
        now = time.monotonic()
        for slot in self.slots:
            scanner = slot.scanner
            if scanner is None or not scanner.running or scanner.overdue:
                continue
            limit = slot.settings.health_timeout_s
            assert scanner.started is not None
            if now - scanner.started >= limit:
                scanner.overdue = True
                mark_unhealthy(slot.source, f"a {scanner.kind} has not returned within {limit:.1f}s (a hung mount?)")
                self._after_read(slot)

    def update_failover(self) -> None:
        """Activate a fallback whose primary has been unhealthy long enough; idle it when the primary is back."""
        now = time.monotonic()
        for slot in self.slots:
            primary = slot.primary
            if primary is None:
                continue
            if primary.healthy and slot.active:
                self._switch(slot, False, f"{primary.name} is healthy again")
            elif (
                not primary.healthy
                and not slot.active
                and primary.unhealthy_since is not None
                and now - primary.unhealthy_since >= slot.settings.failover_after_s
            ):
                self._switch(slot, True, f"{primary.name} unhealthy for {now - primary.unhealthy_since:.0f}s")

    def _switch(self, slot: Slot, active: bool, why: str) -> None:
        slot.active = active
        to = "active" if active else "idle"
        metrics.SOURCE_SWITCHES.labels(slot.name, to).inc()
        metrics.SOURCE_ACTIVE.labels(slot.name, slot.role).set(1 if active else 0)
        if not active:
            log.warning(
                "source %s: idle again (%s), %d held file(s) left to the primary", slot.name, why, len(slot.held)
            )
            slot.held.clear()
            return
        assert slot.primary is not None and slot.primary.unhealthy_since is not None
        # Files written shortly before the primary failed may not have reached it: look back a margin.
        primary = slot.primary.settings
        margin = max(FAILOVER_MARGIN_S, primary.scan_interval_s * (primary.stable_scans + 1))
        now = time.monotonic()
        max_age = now - slot.primary.unhealthy_since + margin
        log.warning(
            "source %s: active, standing in for %s (%s); rescanning files newer than %.0fs",
            slot.name,
            primary.name,
            why,
            max_age,
        )
        metrics.WATCHER_RESCANS.labels(slot.name).inc()
        slot.due = now + slot.settings.scan_interval_s
        if slot.scanner is None:
            self._deliver(slot, slot.source.scan(max_age))
        elif slot.scanner.busy:
            log.warning("source %s: a scan is still running, no takeover rescan", slot.name)
        else:
            slot.scanner.submit("rescan", max_age)

    def release_held(self) -> None:
        """Move a fallback's held files to the backlog as its budget allows."""
        for slot in self.slots:
            while slot.held and slot.budget is not None and slot.budget.take():
                if not self._enqueue(slot.settings, [slot.held.popleft()]):
                    break

    def publish_backlog(self) -> None:
        now = time.monotonic()
        while self.backlog and now >= self._retry_at:
            batch = [self.backlog[i] for i in range(min(PUBLISH_BATCH, len(self.backlog)))]
            try:
                self.publisher.publish(event_message(e) for e in batch)
            except BrokerUnavailable as exc:
                log.warning(
                    "watcher: broker unavailable, %d event(s) kept, retrying in %.1fs: %s",
                    len(self.backlog),
                    self._backoff,
                    exc,
                )
                self._retry_at = now + self._backoff
                self._backoff = min(self._backoff * 2, 10.0)
                return
            self._backoff = 0.5
            for event in batch:
                self.backlog.popleft()
                metrics.EVENTS_PUBLISHED.labels(event.source).inc()
                log.debug("file %s: published from %s", event.name, event.source)
            metrics.WATCHER_BACKLOG.set(len(self.backlog))

    def run(self) -> None:
        self.rescan()
        # Files written from now on are seen once, by their events, not also by the rescan.
        self.ready.set()
        log.info("watcher: following %s", ", ".join(f"{s.name}={s.location}" for s in self.sources_settings))
        # Wake at least twice per heartbeat interval, so the publisher's heartbeats go out in time.
        heartbeat = self.settings.broker.heartbeat_s
        idle = min(1.0, heartbeat / 2) if heartbeat > 0 else 1.0
        while not self.should_stop:
            # A short wait while events are held back, so a returning broker (or budget) is noticed soon.
            held = self.backlog or any(s.held for s in self.slots)
            self.poll_once(min(0.2, idle) if held else idle)
        # One last try for what is still held; what stays is found by the next start-up rescan.
        self.publish_backlog()
        self.close()

    def close(self) -> None:
        for slot in self.slots:
            if slot.scanner is not None and not slot.scanner.stop():
                # Its scan hangs: the abandoned thread still uses the source, so it is left open.
                log.warning("source %s: a scan still hangs at close; its thread is abandoned", slot.name)
                continue
            slot.source.close()
        self.publisher.close()
        self.reporter.close()
        self._wakeup.close()
