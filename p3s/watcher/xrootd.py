"""An XRootD server listed with ``xrdfs``: EOS reached without a FUSE mount.

``location`` is ``root://host:port//path``.  Each scan runs ``xrdfs host:port
ls -l DIR`` (a subprocess with a timeout, never a shell) on the root and on the
directories worth listing: new ones, those whose mtime (read from the parent's
listing) changed, the ``newest_dirs`` newest, and those holding files not yet
stable.  Since a directory's mtime is learnt from its parent's listing, a
change deep under an unchanged, old directory is noticed only once that
directory is among the newest; DAQ trees (one directory per run) are one or two
levels deep, where this holds.  Same stability rule as the poll source; events
carry ``root://`` URLs.  A listing that fails or takes longer than
``health_timeout_s`` marks the source unhealthy, and the scan is abandoned.
A listing shows no symlinks (the server resolves them); a listed path that is
not below the root, or has a ``.`` or ``..`` component, is neither published
nor listed, but refused as in p3s/watcher/files.py (``path outside root``).
"""

from __future__ import annotations

import calendar
import heapq
import logging
import os
import posixpath
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from p3s.config import SourceSettings
from p3s.watcher.files import PATH_OUTSIDE, FileSeen, Health, Refusals, Selector, Stability, inside

log = logging.getLogger(__name__)

# "-rw-r--r-- owner group  1000 2024-01-01 12:00:00 /path"; older clients omit owner and group.
LINE = re.compile(
    r"^(?P<mode>\S+)\s+(?:\S+\s+\S+\s+)?(?P<size>\d+)\s+"
    r"(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s+(?P<path>.+)$"
)


class ListingFailed(Exception):
    """An ``xrdfs`` listing failed, timed out, or could not be run."""


@dataclass(frozen=True)
class Entry:
    path: str  # absolute on the server
    is_dir: bool
    size: int
    mtime: float


def parse_listing(text: str, directory: str) -> list[Entry]:
    """The entries of ``xrdfs ls -l`` output; lines that do not parse are skipped."""
    out: list[Entry] = []
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m is None:
            continue
        path = m["path"]
        if not path.startswith("/"):
            path = f"{directory.rstrip('/')}/{path}"
        # xrdfs prints times in the TZ it runs under: it runs with TZ=UTC.
        mtime = float(calendar.timegm(time.strptime(m["date"], "%Y-%m-%d %H:%M:%S")))
        out.append(Entry(path=path, is_dir=m["mode"].startswith("d"), size=int(m["size"]), mtime=mtime))
    return out


def split_location(location: str) -> tuple[str, str]:
    """``root://host:port//data`` -> (``host:port``, ``/data``)."""
    parts = urlsplit(location)
    if parts.scheme not in ("root", "xroot") or not parts.netloc:
        raise ValueError(f"not a root:// URL: {location!r}")
    path = "/" + parts.path.lstrip("/")
    return parts.netloc, path.rstrip("/") or "/"


class XrootdSource(Health):
    """Reports files on an XRootD server once they are stable; reads no file content."""

    def __init__(self, settings: SourceSettings, selector: Selector, rescan_age_s: float, xrdfs: str = "xrdfs") -> None:
        self.settings = settings
        self.name = settings.name
        self.server, self.root = split_location(settings.location)
        scheme = urlsplit(settings.location).scheme
        self.url_base = settings.url_prefix.rstrip("/") if settings.url_prefix else ""
        self._server_url = f"{scheme}://{self.server}/"
        self.selector = selector
        self.refusals = Refusals(settings.name)
        self.xrdfs = xrdfs
        self.interval_s = settings.scan_interval_s
        self.newest = max(0, settings.newest_dirs)
        self.stability = Stability(settings.stable_scans, rescan_age_s)
        self.rescan_age_s = rescan_age_s
        self._max_age_s: float | None = rescan_age_s
        self._horizon = 0.0
        self._dirs: dict[str, float] = {}  # directory -> its mtime when last listed
        self._seen_mtime: dict[str, float] = {}  # directory -> its mtime in its parent's last listing
        self._started = False
        self.healthy = True
        self.last_error = ""
        self.listings = 0
        # TZ: xrdfs prints times in local time.  One connection attempt within the health
        # timeout: by default the client retries for minutes before it gives up.
        window = str(max(1, int(settings.health_timeout_s)))
        self._env = {
            **os.environ,
            "TZ": "UTC",
            "XRD_CONNECTIONRETRY": "1",
            "XRD_CONNECTIONWINDOW": window,
            "XRD_REQUESTTIMEOUT": window,
            "XRD_STREAMTIMEOUT": window,
        }

    def fileno(self) -> int | None:
        return None

    def under_root(self, path: str) -> bool:
        """Whether a listed path names an entry below the root: absolute, no ``.`` or ``..`` in it."""
        if not path.startswith("/") or any(part in (".", "..") for part in path.split("/")):
            return False
        # normpath keeps a leading "//" (POSIX leaves its meaning open): the server does not.
        return bool(inside(posixpath.normpath("/" + path.lstrip("/")), self.root))

    def url_of(self, path: str) -> str:
        if self.url_base:
            relative = PurePosixPath(path).relative_to(self.root).as_posix()
            return f"{self.url_base}/{relative}"
        return self._server_url + path  # root://host:port//abs/path

    def _list(self, directory: str) -> list[Entry]:
        argv = [self.xrdfs, self.server, "ls", "-l", directory]
        self.listings += 1
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.settings.health_timeout_s,
                check=False,
                env=self._env,
            )
        except subprocess.TimeoutExpired as exc:
            raise ListingFailed(f"listing {directory} took over {self.settings.health_timeout_s:.1f}s") from exc
        except OSError as exc:
            raise ListingFailed(f"cannot run {self.xrdfs}: {exc.strerror or exc}") from exc
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip().splitlines()
            raise ListingFailed(f"listing {directory}: {message[-1] if message else f'exit {done.returncode}'}")
        # Names are bytes on the server: undecodable ones keep their bytes as lone surrogates, as
        # os.fsdecode gives for a local file, so the dispatcher can refuse them (a U+FFFD would
        # stand for another name, one a pilot would look for in vain).
        return parse_listing(done.stdout.decode("utf-8", errors="surrogateescape"), directory)

    def scan(self, max_age_s: float | None) -> list[FileSeen]:
        """The start-up scan: every directory changed within ``max_age_s``, files newer than it."""
        self._max_age_s = max_age_s
        self._dirs.clear()
        self._seen_mtime.clear()
        self._started = True
        return self._run_scan()

    def read(self) -> list[FileSeen]:
        """One scan: the files that became stable (a failing server makes it unhealthy, never raises)."""
        if not self._started:
            return self.scan(self.rescan_age_s)
        return self._run_scan()

    def _run_scan(self) -> list[FileSeen]:
        now = time.time()
        self._horizon = 0.0 if self._max_age_s is None else now - self._max_age_s
        out: list[FileSeen] = []
        started = time.monotonic()
        try:
            self._walk(now, out)
        except ListingFailed as exc:
            self.mark(False, str(exc))
            return out
        took = time.monotonic() - started
        if took > self.settings.health_timeout_s:
            self.mark(False, f"a scan took {took:.1f}s (limit {self.settings.health_timeout_s:.1f}s)")
        else:
            self.mark(True)
        self.stability.forget(now, lambda key: posixpath.dirname(key) not in self._dirs)
        return out

    def _walk(self, now: float, out: list[FileSeen]) -> None:
        # Newest first by the mtimes the parents' listings gave; the root is always listed.
        newest = set(heapq.nlargest(self.newest, self._seen_mtime, key=self._seen_mtime.__getitem__))
        pending = self.stability.pending_in()
        todo = [self.root]
        while todo:
            directory = todo.pop()
            entries = self._list(directory)
            self._dirs[directory] = self._seen_mtime.get(directory, now)
            names: set[str] = set()
            subdirs: set[str] = set()
            for e in entries:
                if not self.under_root(e.path):
                    # A server (or a name) that would take pilots, or the next listing, out of the root.
                    self.refusals.refuse(e.path, PATH_OUTSIDE, (e.is_dir, e.size, e.mtime))
                    continue
                name = PurePosixPath(e.path).name
                if e.is_dir:
                    if not self.selector.wanted_dir(name):
                        continue
                    subdirs.add(e.path)
                    before = self._dirs.get(e.path)
                    self._seen_mtime[e.path] = e.mtime
                    if (
                        e.path in newest
                        or e.path in pending
                        or (before is None and e.mtime >= self._horizon)
                        or (before is not None and before != e.mtime)
                    ):
                        todo.append(e.path)
                    continue
                if not self.selector.wanted(name):
                    continue
                names.add(e.path)
                if e.mtime < self._horizon:
                    continue
                if self.stability.observe(e.path, e.size, e.mtime):
                    out.append(
                        FileSeen(
                            path=PurePosixPath(e.path),  # type: ignore[arg-type]
                            size=e.size,
                            mtime=e.mtime,
                            seen_at=now,
                            url=self.url_of(e.path),
                        )
                    )
            for key in [k for k in self.stability.pending if posixpath.dirname(k) == directory and k not in names]:
                self.stability.vanished(key)
            # Subdirectories that disappeared take their memory with them.
            prefix = directory.rstrip("/") + "/"
            for d in [
                d for d in self._seen_mtime if d.startswith(prefix) and "/" not in d[len(prefix) :] and d not in subdirs
            ]:
                self._forget_dir(d)

    def _forget_dir(self, directory: str) -> None:
        prefix = directory + "/"
        for table in (self._dirs, self._seen_mtime):
            for d in [d for d in table if d == directory or d.startswith(prefix)]:
                del table[d]

    def close(self) -> None:
        self._dirs.clear()
