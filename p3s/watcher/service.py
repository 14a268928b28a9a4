"""The watcher daemon: sources in, confirmed data events out, a bounded backlog between.

An event leaves the backlog only when the broker has confirmed it, so a broker
outage delays events but loses none; while the broker is away the sources are
still read, until the backlog is full.
"""

from __future__ import annotations

import logging
import select
import time
from collections import deque
from collections.abc import Sequence

from p3s import metrics, topology
from p3s.broker import Outgoing, Publisher
from p3s.config import Settings, SourceSettings
from p3s.errors import BrokerUnavailable
from p3s.messages import DataEvent, encode
from p3s.watcher.files import Selector, to_event
from p3s.watcher.inotify import InotifySource

log = logging.getLogger(__name__)

PUBLISH_BATCH = 500


def event_message(event: DataEvent) -> Outgoing:
    return Outgoing(topology.events_exchange, topology.event_routing_key(event.stream), encode(event))


class Watcher:
    """Follows every configured source and publishes one data event per complete file."""

    def __init__(self, settings: Settings, sources: Sequence[SourceSettings] | None = None) -> None:
        self.settings = settings
        self.sources_settings = tuple(sources if sources is not None else settings.sources)
        if not self.sources_settings:
            raise ValueError("no sources configured")
        self.publisher = Publisher(
            settings.broker,
            exchanges=[topology.events_exchange],
            queues=[topology.invalid_queue, topology.events_queue],
        )
        self.backlog: deque[DataEvent] = deque()
        self.should_stop = False
        self._retry_at = 0.0
        self._backoff = 0.5
        self.sources: list[tuple[SourceSettings, InotifySource]] = []
        for src in self.sources_settings:
            if src.kind != "inotify":
                raise ValueError(f"source {src.name}: kind {src.kind!r} is not supported by this watcher yet")
            selector = Selector(src.pattern, settings.watcher.ignore)
            self.sources.append((src, InotifySource(src, selector)))

    def _enqueue(self, src: SourceSettings, items: Sequence[object]) -> None:
        for seen in items:
            if len(self.backlog) >= self.settings.watcher.backlog_max:
                # Never drop a seen file: the start-up rescan finds what is left unread.
                log.error(
                    "watcher: backlog full (%d), a file seen on %s waits for a rescan", len(self.backlog), src.name
                )
                return
            self.backlog.append(to_event(src, seen))  # type: ignore[arg-type]
        metrics.WATCHER_BACKLOG.set(len(self.backlog))

    def rescan(self) -> None:
        """Publish files written while the watcher was not running (duplicates are harmless)."""
        for src, source in self.sources:
            found = source.scan(self.settings.watcher.rescan_age_s)
            metrics.WATCHER_RESCANS.labels(src.name).inc()
            log.info(
                "source %s: start-up rescan found %d file(s) newer than %.0fs",
                src.name,
                len(found),
                self.settings.watcher.rescan_age_s,
            )
            self._enqueue(src, found)

    def poll_once(self, timeout: float) -> None:
        """Wait up to ``timeout`` for sources to report, then publish what is pending."""
        if len(self.backlog) < self.settings.watcher.backlog_max:
            ready, _w, _x = select.select([s for _src, s in self.sources], [], [], timeout)
            for src, source in self.sources:
                if source in ready:
                    self._enqueue(src, source.read())
        elif timeout:
            time.sleep(timeout)
        self.publish_backlog()

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
        log.info("watcher: following %s", ", ".join(f"{s.name}={s.location}" for s in self.sources_settings))
        while not self.should_stop:
            # A short wait while events are held back, so a returning broker is noticed soon.
            self.poll_once(0.2 if self.backlog else 1.0)
        # One last try for what is still held; what stays is found by the next start-up rescan.
        self.publish_backlog()
        self.close()

    def close(self) -> None:
        for _src, source in self.sources:
            source.close()
        self.publisher.close()
