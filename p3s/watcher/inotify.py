"""A local directory tree followed with inotify: the DAQ's online buffer.

A file is complete when its writer closes it (IN_CLOSE_WRITE) or when it is
renamed into the tree (IN_MOVED_TO, the usual write-then-rename).  New
subdirectories, such as one per run, are watched as they appear and scanned
at once, since files may land in them before the watch is in place.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from inotify_simple import INotify, flags

from p3s import metrics
from p3s.config import SourceSettings
from p3s.watcher.files import FileSeen, Selector

log = logging.getLogger(__name__)

FILE_MASK = flags.CLOSE_WRITE | flags.MOVED_TO
DIR_MASK = flags.CREATE | flags.MOVED_TO
WATCH_MASK = FILE_MASK | DIR_MASK | flags.DELETE_SELF | flags.ONLYDIR


class InotifySource:
    """Reports complete files under ``settings.location``; reads no file content."""

    def __init__(self, settings: SourceSettings, selector: Selector) -> None:
        self.settings = settings
        self.name = settings.name
        self.root = Path(settings.location)
        self.selector = selector
        self._inotify = INotify()
        self._paths: dict[int, Path] = {}
        self._watch_tree(self.root)

    def fileno(self) -> int:
        return self._inotify.fileno()

    def _watch(self, directory: Path) -> None:
        try:
            wd = self._inotify.add_watch(directory, WATCH_MASK)
        except OSError as exc:
            log.warning("source %s: cannot watch %s: %s", self.name, directory, exc.strerror)
            return
        self._paths[wd] = directory

    def _watch_tree(self, top: Path) -> None:
        self._watch(top)
        for dirpath, dirnames, _files in os.walk(top):
            dirnames[:] = [d for d in dirnames if self.selector.wanted_dir(d)]
            for d in dirnames:
                self._watch(Path(dirpath) / d)

    def read(self) -> list[FileSeen]:
        """The complete files reported since the last call (never blocks)."""
        seen: list[FileSeen] = []
        now = time.time()
        for ev in self._inotify.read(timeout=0):
            if ev.mask & flags.Q_OVERFLOW:
                # The kernel dropped events: only a full listing can tell what they were.
                # Among them may be the IN_CREATE of a new (run) directory, so watch the
                # whole tree again first (a directory already watched keeps its watch).
                log.warning("source %s: inotify queue overflowed, rescanning everything", self.name)
                metrics.WATCHER_RESCANS.labels(self.name).inc()
                self._watch_tree(self.root)
                seen.extend(self.scan(max_age_s=None))
                continue
            directory = self._paths.get(ev.wd)
            if directory is None:
                continue
            if ev.mask & flags.IGNORED:
                self._paths.pop(ev.wd, None)
                continue
            path = directory / ev.name
            if ev.mask & flags.ISDIR:
                if ev.mask & DIR_MASK and self.selector.wanted_dir(ev.name):
                    self._watch_tree(path)
                    seen.extend(self._scan_dir(path, None))
                continue
            if ev.mask & FILE_MASK and self.selector.wanted(ev.name):
                item = self._seen(path, now)
                if item is not None:
                    seen.append(item)
        return seen

    def _seen(self, path: Path, now: float) -> FileSeen | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None  # renamed or deleted since: its new name has its own event
        return FileSeen(path=path, size=st.st_size, mtime=st.st_mtime, seen_at=now)

    def _scan_dir(self, top: Path, max_age_s: float | None) -> Iterator[FileSeen]:
        now = time.time()
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if self.selector.wanted_dir(d)]
            for name in filenames:
                if not self.selector.wanted(name):
                    continue
                item = self._seen(Path(dirpath) / name, now)
                if item is not None and (max_age_s is None or now - item.mtime <= max_age_s):
                    yield item

    def scan(self, max_age_s: float | None) -> list[FileSeen]:
        """Every wanted file in the tree modified within ``max_age_s`` (all if None)."""
        return list(self._scan_dir(self.root, max_age_s))

    def close(self) -> None:
        self._inotify.close()
