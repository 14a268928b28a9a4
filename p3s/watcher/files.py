"""What a source reports, and which names it reports at all.

The rule for local sources (inotify and poll), the same for a file seen live
and for one found by a rescan:

- A regular file is published under its path, as listed under the source's
  root (its ``location``).  No directory is entered through a symlink.
- A symlink is followed only if it resolves (every link in it, strictly)
  inside the root (the location, itself resolved), to a regular file.  Its
  event then carries the RESOLVED path, written under the configured
  location (``location/store/x.dat`` for a link ``location/a.dat``), so the
  dispatcher can check it against the roots of the stream; the event's name
  stays the link's.  Size and mtime are the target's.
- Anything else is not published: a FIFO, socket or device (reason
  ``not a regular file``), a symlink that resolves outside the root
  (``symlink outside root``), to a directory or a special file
  (``not a regular file``), or to nothing (``dangling symlink``, also a loop).
  Each is logged at WARNING once per file and counted in
  ``p3s_watcher_files_refused_total{source,reason}``.
- The decision is taken when the entry appears, with the file system as it is
  then; entries are only ever lstat'ed and stat'ed, never opened, so a FIFO
  cannot block a scan.

An xrootd listing shows no symlinks (the server resolves them); there a
listed path with a ``.`` or ``..`` component, or not under the root, is
refused (``path outside root``) and no directory outside the root is listed.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

from p3s import metrics
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
    # The name the file was seen under: a symlink's own name, while ``path`` is where it resolves.
    name: str = ""


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
        name=seen.name or seen.path.name,
        path=where,
        stream=source.stream,
        seen_at=seen.seen_at,
        source=source.name,
        size=seen.size,
    )


# Why a source did not publish a file: the ``reason`` label of p3s_watcher_files_refused_total.
NOT_REGULAR = "not a regular file"
OUTSIDE_ROOT = "symlink outside root"
DANGLING = "dangling symlink"
PATH_OUTSIDE = "path outside root"

# Errors that mean a symlink does not resolve: missing target, a loop, a file used as a
# directory, a directory the watcher may not search.  Others (EIO, ENOTCONN) are the storage's.
UNRESOLVED = {errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}


class Refusals:
    """The files a source did not publish: each logged at WARNING and counted once.

    A file is known by its path and an identity (inode and mtime for a local
    file): a rescan, another scan or another event of the same file says
    nothing more, while a new file under the same name is refused again.  The
    memory is bounded: past ``limit`` files the oldest are forgotten, and at
    worst logged once more.
    """

    def __init__(self, source: str, limit: int = 10_000) -> None:
        self.source = source
        self.limit = limit
        self._known: dict[str, tuple[str, object]] = {}

    def refuse(self, path: str, reason: str, identity: object = None, detail: str = "") -> None:
        key = (reason, identity)
        if self._known.get(path) == key:
            return
        self._known.pop(path, None)
        while len(self._known) >= self.limit:
            del self._known[next(iter(self._known))]
        self._known[path] = key
        metrics.WATCHER_FILES_REFUSED.labels(self.source, reason).inc()
        log.warning("source %s: file %s not published: %s%s", self.source, path, reason, detail)


@dataclass(frozen=True)
class Admitted:
    """A file that may be published: the path its event carries, and its stat (the target's, for a link)."""

    path: str
    st: os.stat_result


# What LocalRoot.admit returns for an entry older than the horizon it was given: neither
# published nor refused, as old files are not looked at.
OLD = "old"


class LocalRoot:
    """The publication rule for a local source (see the module docstring): only lstat, stat and readlink."""

    def __init__(self, source: str, location: str) -> None:
        self.location = location.rstrip("/") or "/"
        self.refusals = Refusals(source)

    def admit(self, path: str, lst: os.stat_result, horizon: float = 0.0) -> Admitted | str | None:
        """Judge the entry at ``path``, whose ``os.lstat`` is ``lst``.

        Returns what to publish, :data:`OLD` for an entry changed before
        ``horizon`` (a link: the link and its target), or None when it is
        refused (logged and counted once) or gone.
        """
        identity = (lst.st_ino, lst.st_mtime_ns)
        if stat.S_ISREG(lst.st_mode):
            return OLD if lst.st_mtime < horizon else Admitted(path, lst)
        if not stat.S_ISLNK(lst.st_mode):
            if lst.st_mtime < horizon:
                return OLD
            self.refusals.refuse(path, NOT_REGULAR, identity, f" ({kind_of(lst.st_mode)})")
            return None
        try:
            target = os.path.realpath(path, strict=True)
            st = os.stat(target, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in UNRESOLVED:
                raise
            if lst.st_mtime < horizon:
                return OLD
            self.refusals.refuse(path, DANGLING, identity, f" ({exc.strerror})")
            return None
        if max(lst.st_mtime, st.st_mtime) < horizon:
            return OLD
        # Resolved now, not at start: the location may be a link to a mount that moves.
        relative = inside(target, os.path.realpath(self.location))
        if relative is None:
            self.refusals.refuse(path, OUTSIDE_ROOT, identity, f" (it leads to {target})")
            return None
        if not stat.S_ISREG(st.st_mode):
            self.refusals.refuse(path, NOT_REGULAR, identity, f" (it leads to a {kind_of(st.st_mode)})")
            return None
        # The resolved path under the location as configured: what the dispatcher checks against.
        return Admitted(posixpath.join(self.location, relative), st)


def inside(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` ("" for the root itself), or None if it is not under it; both normalised."""
    if path == root:
        return ""
    prefix = root if root.endswith("/") else root + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def kind_of(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return kind
    return "special file"


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
