"""Scans of listed sources (poll, xrootd) in threads of their own, so a hung mount stops only its source.

A ``stat`` or ``scandir`` on a dead NFS, EOS or FUSE mount can block for
ever, and no timeout can interrupt it.  Each listed source therefore has one
daemon thread that runs its scans one at a time; the results go to the
watcher's loop through a queue, and a byte on a pipe wakes that loop's
``select``.  The loop keeps the deadline: a scan that has not returned within
the source's ``health_timeout_s`` marks the source unhealthy (which starts the
failover clock), and no other scan is asked of it until that one returns.  A
thread that never returns is abandoned: it is a daemon, and holds nothing the
watcher waits for.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from p3s.watcher.files import FileSeen, Source

log = logging.getLogger(__name__)


class Wakeup:
    """A pipe for ``select``: any thread can make it readable; only the owner reads and closes it."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        # A scan thread abandoned on a hung mount may return after close(): it must not
        # write to a descriptor number the process has since given to another file.
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._w, b"\0")
            except BlockingIOError:
                pass  # already full of wake-ups: readable either way

    def clear(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._r)
                os.close(self._w)


@dataclass(frozen=True)
class ScanDone:
    """What one scan of a source returned: its files, or the error that ended it."""

    source: str
    kind: str  # "read": a regular scan; "rescan": start-up or takeover, with an age limit
    found: list[FileSeen]
    error: str = ""


class ScanThread:
    """Runs one listed source's scans, one at a time, in a daemon thread.

    ``started``, ``kind`` and ``overdue`` belong to the watcher's loop: it sets
    them when it asks for a scan and clears them when it takes the result.  The
    thread only runs the source, sets ``finished`` and hands back what it
    returned; a result may wait (while the backlog is full), and a scan that
    finished is never judged hung.
    """

    def __init__(self, source: Source, done: queue.SimpleQueue[ScanDone], wakeup: Wakeup) -> None:
        self.source = source
        self.name = source.name
        self._done = done
        self._wakeup = wakeup
        self._requests: queue.SimpleQueue[tuple[str, float | None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.started: float | None = None  # monotonic, from the request until its result is taken
        self.finished = False  # the running scan has returned; its result waits to be taken
        self.kind = ""
        self.overdue = False

    @property
    def busy(self) -> bool:
        return self.started is not None

    @property
    def running(self) -> bool:
        """A scan is asked for and has not returned: the one state that has a deadline."""
        return self.started is not None and not self.finished

    def submit(self, kind: str, max_age_s: float | None = None) -> None:
        """Ask for one scan: ``read`` (the next regular one) or ``rescan`` (files newer than ``max_age_s``)."""
        assert not self.busy, f"source {self.name}: a scan is still running"
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"p3s-scan-{self.name}", daemon=True)
            self._thread.start()
        self.started, self.kind, self.overdue, self.finished = time.monotonic(), kind, False, False
        self._requests.put((kind, max_age_s))

    def returned(self) -> None:
        """The loop has taken this scan's result."""
        self.started, self.kind, self.overdue, self.finished = None, "", False, False

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            kind, max_age_s = request
            try:
                found = self.source.read() if kind == "read" else self.source.scan(max_age_s)
                done = ScanDone(self.name, kind, found)
            except Exception as exc:
                # A source is meant never to raise; if one does, its scans must still go on.
                log.exception("source %s: %s failed", self.name, kind)
                done = ScanDone(self.name, kind, [], f"{kind} failed: {exc!r}")
            self.finished = True
            self._done.put(done)
            self._wakeup.set()

    def stop(self, timeout: float = 1.0) -> bool:
        """End the thread; True once it has, False if a scan still hangs in it (it is abandoned)."""
        if self._thread is None:
            return True
        self._requests.put(None)
        if self.busy:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


def mark_unhealthy(source: Any, why: str) -> None:
    """Mark a listed source unhealthy from the watcher's loop (logged once, as the source does)."""
    mark = getattr(source, "mark", None)
    if mark is not None:
        mark(False, why)
