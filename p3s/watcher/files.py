"""What a source reports, and which names it reports at all."""

from __future__ import annotations

import logging
import posixpath
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

from p3s.config import SourceSettings
from p3s.messages import DataEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileSeen:
    """A complete file noticed on a source."""

    path: Path
    size: int
    mtime: float
    seen_at: float
    # Where pilots read the file when it is not a local path (an xrootd source's root:// URL).
    url: str = ""


class Source(Protocol):
    """What the watcher drives: inotify, poll and xrootd sources alike.

    ``fileno()`` is None for a source polled every ``scan_interval_s`` rather
    than waited for with select(); such a source also has ``healthy`` and
    ``mark()``, and the watcher runs its ``read`` and ``scan`` in a thread of
    their own (p3s/watcher/scanner.py), so they may block.
    """

    name: str

    def fileno(self) -> int | None: ...

    def read(self) -> list[FileSeen]: ...

    def scan(self, max_age_s: float | None) -> list[FileSeen]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Selector:
    """The file pattern of a source, less temporary and hidden names."""

    pattern: str
    ignore: Sequence[str]

    def wanted(self, name: str) -> bool:
        if any(fnmatchcase(name, p) for p in self.ignore):
            return False
        return fnmatchcase(name, self.pattern)

    def wanted_dir(self, name: str) -> bool:
        return not name.startswith(".")


class Health:
    """Whether a listed source answers; a change is logged once, not at every scan.

    Marked by the source's own scans, and by the watcher when a scan has not
    returned in time (see p3s/watcher/scanner.py).
    """

    name: str
    healthy: bool = True
    last_error: str = ""

    def mark(self, healthy: bool, why: str = "") -> None:
        if healthy != self.healthy:
            if healthy:
                log.info("source %s: healthy again", self.name)
            else:
                log.warning("source %s: unhealthy: %s", self.name, why)
        self.healthy = healthy
        self.last_error = why


def to_event(source: SourceSettings, seen: FileSeen) -> DataEvent:
    """The data event for a file: pilots read it by its path, or under the source's URL prefix."""
    if seen.url:
        where = seen.url
    elif source.url_prefix:
        relative = seen.path.relative_to(source.location).as_posix()
        where = source.url_prefix.rstrip("/") + "/" + relative
    else:
        where = str(seen.path)
    return DataEvent(
        name=seen.path.name,
        path=where,
        stream=source.stream,
        seen_at=seen.seen_at,
        source=source.name,
        size=seen.size,
    )


class Stability:
    """Which listed files have held still long enough, and which were already published.

    A file is published once its (size, mtime) was the same in ``stable_scans``
    consecutive scans.  Memory stays bounded: a published file is forgotten once
    it is older than the rescan age (no scan publishes such a file again) or
    its directory is gone.
    """

    def __init__(self, stable_scans: int, max_age_s: float) -> None:
        self.stable_scans = max(1, stable_scans)
        self.max_age_s = max_age_s
        self.pending: dict[str, tuple[int, float, int]] = {}
        self.published: dict[str, float] = {}

    def known(self, key: str) -> bool:
        return key in self.published

    def observe(self, key: str, size: int, mtime: float, stamp: float | None = None) -> bool:
        """Record one sighting; True when the file should be published now.

        ``stamp`` (default ``mtime``) is the time the memory forgets the file by.
        """
        if key in self.published:
            return False
        before = self.pending.get(key)
        count = before[2] + 1 if before is not None and before[:2] == (size, mtime) else 1
        if count >= self.stable_scans:
            self.pending.pop(key, None)
            self.published[key] = mtime if stamp is None else stamp
            return True
        self.pending[key] = (size, mtime, count)
        return False

    def vanished(self, key: str) -> None:
        self.pending.pop(key, None)
        self.published.pop(key, None)

    def forget(self, now: float, gone: Callable[[str], bool]) -> list[str]:
        """Drop what no scan can publish again: too old, or under a directory no longer scanned.

        Returns the published keys forgotten.
        """
        horizon = now - self.max_age_s
        dropped = [k for k, m in self.published.items() if m < horizon or gone(k)]
        for key in dropped:
            del self.published[key]
        for key in [k for k in self.pending if gone(k)]:
            del self.pending[key]
        return dropped

    def pending_in(self) -> set[str]:
        """The directories (keys up to the last slash) holding files not yet stable."""
        return {posixpath.dirname(k) for k in self.pending}


class Budget:
    """At most ``per_minute`` files in any sliding minute: a fallback's I/O allowance."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._spent: deque[float] = deque()

    def take(self) -> bool:
        now = self.clock()
        while self._spent and now - self._spent[0] >= 60.0:
            self._spent.popleft()
        if self.per_minute > 0 and len(self._spent) >= self.per_minute:
            return False
        self._spent.append(now)
        return True
