"""The watcher's word on its sources: a small report on ``p3s.status`` every little while.

The dispatcher keeps the newest report of each source, so ``p3s status`` shows
which source a watcher reads from (active or standby, healthy or not) from
what the watcher itself says, wherever the operator runs it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from p3s import topology
from p3s.broker import Outgoing, Publisher
from p3s.config import Settings
from p3s.errors import BrokerUnavailable
from p3s.messages import SourcesReport, encode

log = logging.getLogger(__name__)

#: Seconds between reports when nothing changes; ``p3s status`` calls a report stale after a few of these.
REPORT_INTERVAL_S = 15.0


class SourcesReporter:
    """Sends a SourcesReport every REPORT_INTERVAL_S, and at once when a source changes role or health.

    On a connection of its own, so a broker that refuses these reports (an
    account that may write ``p3s.events`` only) never disturbs the events.
    """

    def __init__(self, settings: Settings, interval_s: float = REPORT_INTERVAL_S) -> None:
        self.host = socket.gethostname()
        self.watcher_id = f"{self.host}-{os.getpid()}"[:64]
        self.interval_s = interval_s
        self._publisher = Publisher(settings.broker, exchanges=[topology.events_exchange])
        self._due = 0.0
        self._last: tuple[Any, ...] | None = None
        self.refused = False

    def maybe_send(self, slots: Sequence[Any], broker_ok: bool = True) -> bool:
        """Send a report if one is due (or the sources changed); True if one was sent."""
        if self.refused or not broker_ok:
            return False
        sources = [
            {
                "name": slot.settings.name,
                "kind": slot.settings.kind,
                "location": slot.settings.location,
                "stream": slot.settings.stream,
                "fallback_for": slot.settings.fallback_for,
                "active": bool(slot.active),
                "healthy": bool(slot.healthy),
            }
            for slot in slots
        ]
        state = tuple((s["name"], s["active"], s["healthy"]) for s in sources)
        now = time.monotonic()
        if now < self._due and state == self._last:
            return False
        self._due = now + self.interval_s
        report = SourcesReport(watcher_id=self.watcher_id, host=self.host, sources=sources)
        try:
            self._publisher.publish(
                [Outgoing(topology.events_exchange, topology.WATCHER_REPORT_KEY, encode(report))]
            )
        except BrokerUnavailable as exc:
            if "ACCESS_REFUSED" in str(exc):
                # Retrying cannot help: say once what to change.
                self.refused = True
                log.warning(
                    "watcher %s: the broker refuses sources reports on p3s.status (%s); p3s status will not show "
                    "this watcher's sources until its account may write p3s.status",
                    self.watcher_id,
                    exc,
                )
            else:
                log.debug("watcher %s: sources report not sent: %s", self.watcher_id, exc)
            return False
        self._last = state
        return True

    def close(self) -> None:
        self._publisher.close()
