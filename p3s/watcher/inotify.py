"""A local directory tree followed with inotify: the DAQ's online buffer.

A file is complete when its writer closes it (IN_CLOSE_WRITE) or when it is
renamed into the tree (IN_MOVED_TO, the usual write-then-rename).  New
subdirectories, such as one per run, are watched as they appear and scanned
at once, since files may land in them before the watch is in place.

What is published follows the rule in p3s/watcher/files.py, live and at a
rescan alike.  An entry that is not a regular file is judged when it appears
(IN_CREATE or IN_MOVED_TO), since no IN_CLOSE_WRITE comes for a symlink made
in place: a symlink created in the tree that resolves inside the root to a
regular file is published at once, as a rescan would, and a FIFO, socket or
device made in place is refused at once, as a rescan would.  A regular file's
IN_CREATE is not a decision: it is complete only at its IN_CLOSE_WRITE.  No
directory is watched through a symlink.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from inotify_simple import INotify, flags

from p3s import metrics
from p3s.config import SourceSettings
from p3s.watcher.files import OLD, Admitted, FileSeen, LocalRoot, Selector

log = logging.getLogger(__name__)

FILE_MASK = flags.CLOSE_WRITE | flags.MOVED_TO
# IN_CREATE of what is not a directory: only a decision for an entry that is not a regular file.
MADE_MASK = flags.CREATE
DIR_MASK = flags.CREATE | flags.MOVED_TO
WATCH_MASK = FILE_MASK | DIR_MASK | flags.DELETE_SELF | flags.ONLYDIR


class InotifySource:
    """Reports complete files under ``settings.location``; reads no file content."""

    def __init__(self, settings: SourceSettings, selector: Selector) -> None:
        self.settings = settings
        self.name = settings.name
        self.root = Path(settings.location)
        self.selector = selector
        self.rule = LocalRoot(settings.name, settings.location)
        self._inotify = INotify()
        self._paths: dict[int, Path] = {}
        self._watch_tree(self.root)

    def fileno(self) -> int:
        return self._inotify.fileno()

    def _watch(self, directory: Path) -> None:
        # The root may be given through a symlink; below it, a directory replaced by a symlink
        # since it was listed fails to be watched (IN_DONT_FOLLOW with IN_ONLYDIR).
        mask = WATCH_MASK if directory == self.root else WATCH_MASK | flags.DONT_FOLLOW
        try:
            wd = self._inotify.add_watch(directory, mask)
        except OSError as exc:
            log.warning("source %s: cannot watch %s: %s", self.name, directory, exc.strerror)
            return
        self._paths[wd] = directory

    def _walk(self, top: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
        """``os.walk`` of the wanted directories, with symlinks to directories listed among the files."""
        for dirpath, dirnames, filenames in os.walk(top):
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            # os.walk does not descend into links, but lists them as directories: they are entries to judge.
            dirnames[:] = [d for d in dirnames if d not in links and self.selector.wanted_dir(d)]
            yield Path(dirpath), dirnames, filenames + links

    def _watch_tree(self, top: Path) -> None:
        self._watch(top)
        for dirpath, dirnames, _files in self._walk(top):
            for d in dirnames:
                self._watch(dirpath / d)

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
            if ev.mask & (FILE_MASK | MADE_MASK) and self.selector.wanted(ev.name):
                item = self._seen(path, now, made=not ev.mask & FILE_MASK)
                if item is not None:
                    seen.append(item)
        return seen

    def _seen(self, path: Path, now: float, horizon: float = 0.0, made: bool = False) -> FileSeen | None:
        """The file to publish for ``path``, or None: refused, older than ``horizon``, gone, or not complete yet."""
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            return None  # renamed or deleted since: its new name has its own event
        if made and stat.S_ISREG(lst.st_mode):
            return None  # just created: complete at its IN_CLOSE_WRITE
        found = self.rule.admit(str(path), lst, horizon)
        if found is None or found == OLD:
            return None
        assert isinstance(found, Admitted)
        st = found.st
        return FileSeen(path=Path(found.path), size=st.st_size, mtime=st.st_mtime, seen_at=now, name=path.name)

    def _scan_dir(self, top: Path, max_age_s: float | None) -> Iterator[FileSeen]:
        now = time.time()
        horizon = 0.0 if max_age_s is None else now - max_age_s
        for dirpath, _dirnames, names in self._walk(top):
            for name in names:
                if not self.selector.wanted(name):
                    continue
                item = self._seen(dirpath / name, now, horizon)
                if item is not None:
                    yield item

    def scan(self, max_age_s: float | None) -> list[FileSeen]:
        """Every wanted file in the tree modified within ``max_age_s`` (all if None)."""
        return list(self._scan_dir(self.root, max_age_s))

    def close(self) -> None:
        self._inotify.close()
