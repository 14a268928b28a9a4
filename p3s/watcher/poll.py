"""A directory tree polled by listing and stat: a network or FUSE mount (EOS, NFS).

inotify sees nothing another host writes on such a mount, so the tree is
scanned every ``scan_interval_s``.  A file is published once its size and
mtime held still for ``stable_scans`` consecutive scans; no file is opened.

A scan does not walk the whole tree.  Every known directory is stat'ed (one
call each: there are far fewer directories than files), and only these are
listed: directories whose mtime changed since they were last listed (adding or
removing an entry changes it), the ``newest_dirs`` newest ones (mtimes are
coarse on some mounts, and a file growing in place leaves its directory's mtime
alone), and those holding files not yet stable.  Within a listed directory, only
files not yet published are stat'ed.

What is published follows the rule in p3s/watcher/files.py: each entry is
lstat'ed, a symlink is resolved and published under its resolved path only
if it stays inside the root, and a special file is refused, at start-up and
in later scans alike.  A symlink to a directory is an entry, never a
directory to list.
"""

from __future__ import annotations

import heapq
import logging
import os
import posixpath
import time
from pathlib import Path

from p3s.config import SourceSettings
from p3s.watcher.files import OLD, Admitted, FileSeen, Health, LocalRoot, Selector, Stability

log = logging.getLogger(__name__)


class PollSource(Health):
    """Reports files under ``settings.location`` once they are stable; reads no file content.

    It has no file descriptor: the watcher calls :meth:`read` every
    ``interval_s``, and :meth:`scan` once at start.
    """

    def __init__(self, settings: SourceSettings, selector: Selector, rescan_age_s: float) -> None:
        self.settings = settings
        self.name = settings.name
        self.root = settings.location.rstrip("/") or "/"
        self.selector = selector
        self.rule = LocalRoot(settings.name, self.root)
        self.interval_s = settings.scan_interval_s
        self.newest = max(0, settings.newest_dirs)
        self.rescan_age_s = rescan_age_s
        self.stability = Stability(settings.stable_scans, rescan_age_s)
        # Directory path -> its mtime when last listed; the root is always known.
        self._dirs: dict[str, float] = {}
        # Names judged too old in the directories listed last scan: not stat'ed again while
        # those directories keep being listed (the newest ones are listed every scan).
        self._old: dict[str, set[str]] = {}
        self._listed: set[str] = set()
        self._started = False
        self._max_age_s: float | None = rescan_age_s
        self._horizon = 0.0  # files changed before this are not published: now - rescan age
        self.healthy = True
        self.last_error = ""
        self.scans = 0

    def fileno(self) -> int | None:
        return None

    def scan(self, max_age_s: float | None) -> list[FileSeen]:
        """The start-up scan: list every directory, consider files newer than ``max_age_s``.

        Directories older than the age are listed (to learn their
        subdirectories) but their files are not stat'ed: nothing in them can
        be newer.  Returns what is already stable (with ``stable_scans`` 1).
        """
        now = time.time()
        self._max_age_s = max_age_s
        self._horizon = 0.0
        self._dirs.clear()
        self._started = True
        return self._run_scan(now, full=True)

    def read(self) -> list[FileSeen]:
        """One scan: the files that became stable (never raises for storage errors)."""
        if not self._started:
            return self.scan(self.rescan_age_s)
        return self._run_scan(time.time(), full=False)

    def _run_scan(self, now: float, full: bool) -> list[FileSeen]:
        started = time.monotonic()
        self.scans += 1
        out: list[FileSeen] = []
        try:
            os.stat(self.root)
            if self._max_age_s is not None:
                # The horizon moves with the memory's: what is forgotten is never published again.
                self._horizon = now - self._max_age_s
            if full:
                self._list_tree(self.root, now, out)
            else:
                self._scan_changed(now, out)
        except OSError as exc:
            # A dead mount (ENOTCONN, ESTALE, EIO) or a missing root: unhealthy, never a crash.
            self.mark(False, f"{self.root}: {exc.strerror or exc}")
            return out
        took = time.monotonic() - started
        if took > self.settings.health_timeout_s:
            self.mark(False, f"a scan took {took:.1f}s (limit {self.settings.health_timeout_s:.1f}s)")
        else:
            self.mark(True)
        for key in self.stability.forget(now, self._gone):
            # Forgotten as published, remembered as old: a listed directory must not take it for new.
            directory, name = posixpath.split(key)
            if directory in self._old:
                self._old[directory].add(name)
        self._old = {d: names for d, names in self._old.items() if d in self._listed}
        self._listed = set()
        return out

    def _gone(self, key: str) -> bool:
        return posixpath.dirname(key) not in self._dirs

    def _scan_changed(self, now: float, out: list[FileSeen]) -> None:
        current: dict[str, float] = {}
        for directory in list(self._dirs):
            try:
                current[directory] = os.stat(directory).st_mtime
            except (FileNotFoundError, NotADirectoryError):
                self._drop_dir(directory)
        wanted = {d for d, m in current.items() if m != self._dirs.get(d)}
        wanted |= set(heapq.nlargest(self.newest, current, key=current.__getitem__))
        wanted |= self.stability.pending_in() & current.keys()
        for directory in sorted(wanted):
            if directory not in self._dirs:
                continue  # dropped with a parent that vanished meanwhile
            for sub in self._list_dir(directory, current[directory], now, out, stat_files=True):
                # A subdirectory that appeared after start, such as a new run: all its files are new.
                try:
                    self._list_tree(sub, now, out)
                except (FileNotFoundError, NotADirectoryError):
                    continue

    def _drop_dir(self, directory: str) -> None:
        prefix = directory + "/"
        for d in [d for d in self._dirs if d == directory or d.startswith(prefix)]:
            del self._dirs[d]
        log.debug("source %s: directory %s is gone", self.name, directory)

    def _list_tree(self, top: str, now: float, out: list[FileSeen]) -> None:
        mtime = os.stat(top).st_mtime
        # A directory untouched since the horizon can only hold files older than it.
        for sub in self._list_dir(top, mtime, now, out, stat_files=mtime >= self._horizon):
            try:
                self._list_tree(sub, now, out)
            except (FileNotFoundError, NotADirectoryError):
                continue

    def _list_dir(self, directory: str, mtime: float, now: float, out: list[FileSeen], stat_files: bool) -> list[str]:
        """List ``directory`` and observe its files; return its subdirectories not known before."""
        self._dirs[directory] = mtime
        self._listed.add(directory)
        remembered = directory in self._old
        known_old = self._old.get(directory, set())
        old: set[str] = set()
        try:
            with os.scandir(directory) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            self._drop_dir(directory)
            return []
        new_dirs: list[str] = []
        names: set[str] = set()
        for name, is_dir in entries:
            path = f"{directory}/{name}" if directory != "/" else f"/{name}"
            if is_dir:
                if self.selector.wanted_dir(name) and path not in self._dirs:
                    new_dirs.append(path)
                continue
            if not stat_files or not self.selector.wanted(name):
                continue
            names.add(path)
            if self.stability.known(path):
                continue
            if name in known_old:
                old.add(name)
                continue
            try:
                lst = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue
            # A name absent from this directory's last listing is new even with an old mtime
            # (``mv`` keeps it); elsewhere an mtime older than the horizon means an old file.
            found = self.rule.admit(path, lst, 0.0 if remembered else self._horizon)
            if found == OLD:
                old.add(name)
                continue
            if found is None:
                continue  # refused (logged and counted once), or gone
            assert isinstance(found, Admitted)
            st = found.st
            # Keyed by the name listed, a link's too: that is what must hold still and be published once.
            if self.stability.observe(path, st.st_size, st.st_mtime, max(st.st_mtime, now)):
                out.append(
                    FileSeen(path=Path(found.path), size=st.st_size, mtime=st.st_mtime, seen_at=now, name=name)
                )
        if stat_files:
            self._old[directory] = old
            for key in [k for k in self.stability.pending if posixpath.dirname(k) == directory and k not in names]:
                self.stability.vanished(key)
        return new_dirs

    def close(self) -> None:
        self._dirs.clear()
