"""What a local source publishes: regular files, and symlinks that stay inside its root.

Every kind of entry is tried on the inotify and the poll source, live (made
after the source started) and at a rescan (made before), and moved in or
created in place: each gets the same decision everywhere.  A published
symlink's event carries the resolved path (the link's own name); anything
else is refused, logged at WARNING once and counted in
p3s_watcher_files_refused_total{source,reason}.  The xrootd source refuses
listed paths that would leave its root.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from p3s import metrics
from p3s.config import SourceSettings
from p3s.messages import encode
from p3s.watcher.files import FileSeen, Selector, to_event
from p3s.watcher.inotify import InotifySource
from p3s.watcher.poll import PollSource
from p3s.watcher.service import Watcher
from p3s.watcher.xrootd import XrootdSource
from tests.stack import make_settings
from tests.unit.test_watcher import embedded, published  # noqa: F401 (fixture)

SELECTOR = Selector("*.dat", (".*", "*.tmp"))
OUTSIDE_ROOT = "symlink outside root"
NOT_REGULAR = "not a regular file"
DANGLING = "dangling symlink"


@dataclass
class Tree:
    """A watched root and a directory beside it, with the targets the cases point at.

    Targets inside the root do not match the pattern, so only the links to them can be published.
    """

    root: Path
    outside: Path

    @property
    def target(self) -> Path:
        return self.root / "store" / "target.bin"

    @property
    def pipe(self) -> Path:
        return self.root / "store" / "pipe"

    @property
    def secret(self) -> Path:
        return self.outside / "secret.bin"


@pytest.fixture
def tree() -> Iterator[Tree]:
    # A short path: a UNIX socket's path must fit in 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="p3s-", dir="/tmp"))
    t = Tree(base / "root", base / "out")
    t.root.mkdir()
    t.outside.mkdir()
    t.target.parent.mkdir()
    t.target.write_bytes(b"t" * 7)
    os.mkfifo(t.pipe)
    t.secret.write_bytes(b"s" * 3)
    try:
        yield t
    finally:
        shutil.rmtree(base)


def place(tree: Tree, name: str, how: str, make: Callable[[Path], None]) -> None:
    """Make ``name`` in the root: in place, or beside the root and then renamed into it."""
    if how == "in place":
        make(tree.root / name)
    else:
        make(tree.outside / name)
        os.rename(tree.outside / name, tree.root / name)


def symlink_to(target: Path | str) -> Callable[[Path], None]:
    return lambda path: os.symlink(target, path)


def fifo(path: Path) -> None:
    os.mkfifo(path)


def unix_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def char_device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("making a device needs CAP_MKNOD")


def regular(path: Path) -> None:
    path.write_bytes(b"r" * 5)


# name -> (how to make it, the decision: ("published", its event's path) or ("refused", reason))
CASES: dict[str, tuple[Callable[[Tree], Callable[[Path], None]], Callable[[Tree], tuple[str, str]]]] = {
    "regular file": (lambda t: regular, lambda t: ("published", str(t.root / "entry.dat"))),
    "symlink inside root": (lambda t: symlink_to(t.target), lambda t: ("published", str(t.target))),
    "relative symlink inside root": (
        lambda t: symlink_to("store/../store/target.bin"),
        lambda t: ("published", str(t.target)),
    ),
    "symlink outside root": (lambda t: symlink_to(t.secret), lambda t: ("refused", OUTSIDE_ROOT)),
    "relative symlink out by ..": (lambda t: symlink_to("../out/secret.bin"), lambda t: ("refused", OUTSIDE_ROOT)),
    "symlink to /etc/passwd": (lambda t: symlink_to("/etc/passwd"), lambda t: ("refused", OUTSIDE_ROOT)),
    "symlink to /dev/null": (lambda t: symlink_to("/dev/null"), lambda t: ("refused", OUTSIDE_ROOT)),
    "dangling symlink": (lambda t: symlink_to(t.root / "store" / "missing"), lambda t: ("refused", DANGLING)),
    "symlink loop": (lambda t: symlink_to("entry.dat"), lambda t: ("refused", DANGLING)),
    "symlink to a FIFO": (lambda t: symlink_to(t.pipe), lambda t: ("refused", NOT_REGULAR)),
    "symlink to a directory": (lambda t: symlink_to(t.root / "store"), lambda t: ("refused", NOT_REGULAR)),
    "FIFO": (lambda t: fifo, lambda t: ("refused", NOT_REGULAR)),
    "UNIX socket": (lambda t: unix_socket, lambda t: ("refused", NOT_REGULAR)),
    "character device": (lambda t: char_device, lambda t: ("refused", NOT_REGULAR)),
}


def refused(source: str, reason: str) -> float:
    return metrics.WATCHER_FILES_REFUSED.labels(source, reason)._value.get()


def all_refused(source: str) -> dict[str, float]:
    return {r: refused(source, r) for r in (OUTSIDE_ROOT, NOT_REGULAR, DANGLING)}


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("p3s")]


@contextmanager
def no_file_opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any open() fails the test within: a scan lists and stats, it never opens (a FIFO would block)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a file was opened: {args[:1]}")

    with monkeypatch.context() as patched:
        patched.setattr(os, "open", refuse)
        patched.setattr(builtins, "open", refuse)
        patched.setattr(io, "open", refuse)
        yield


class Driver:
    """One source kind, one moment (live or rescan): make the entry, return what the source published."""

    def __init__(self, kind: str, when: str, tree: Tree) -> None:
        self.kind, self.when, self.tree = kind, when, tree
        self.settings = SourceSettings(
            name=f"{kind}-{uuid.uuid4().hex[:8]}", kind=kind, location=str(tree.root), pattern="*.dat", stable_scans=1
        )
        self.source: InotifySource | PollSource | None = None

    def _open(self) -> InotifySource | PollSource:
        if self.kind == "inotify":
            return InotifySource(self.settings, SELECTOR)
        return PollSource(self.settings, SELECTOR, rescan_age_s=3600)

    def run(self, make: Callable[[], None], monkeypatch: pytest.MonkeyPatch | None = None) -> list[FileSeen]:
        """Live: start the source, make the entry, read.  Rescan: make it, start the source, scan (opening nothing)."""
        if self.when == "live":
            self.source = self._open()
            assert self.source.scan(3600) == []
            make()
            return self.read()
        make()
        self.source = self._open()
        if monkeypatch is None:
            return self.source.scan(3600)
        with no_file_opened(monkeypatch):
            return self.source.scan(3600)

    def read(self) -> list[FileSeen]:
        assert self.source is not None
        seen: list[FileSeen] = []
        for _ in range(3):  # inotify: drain its queue; poll: scans after the one that published
            seen.extend(self.source.read())
        return seen

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


@pytest.fixture(params=["inotify", "poll"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("how", ["in place", "moved in"])
@pytest.mark.parametrize("when", ["live", "rescan"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_entry_gets_the_documented_decision(
    tree: Tree, kind: str, when: str, how: str, case: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    maker, expected = CASES[case]
    make = maker(tree)
    decision, detail = expected(tree)
    driver = Driver(kind, when, tree)
    caplog.set_level(logging.WARNING, logger="p3s")
    before = all_refused(driver.settings.name)
    try:
        seen = driver.run(lambda: place(tree, "entry.dat", how, make), monkeypatch)
        if decision == "published":
            (item,) = seen
            assert str(item.path) == detail, "a published symlink's event carries the resolved path"
            event = to_event(driver.settings, item)
            assert (event.name, event.path) == ("entry.dat", detail), "the link's own name, the resolved path"
            assert event.size == os.stat(detail).st_size
            assert all_refused(driver.settings.name) == before
            assert warnings(caplog) == []
        else:
            assert seen == [], f"{case} must not be published"
            after = all_refused(driver.settings.name)
            assert after[detail] == before[detail] + 1, f"{case} is counted as {detail!r}"
            assert sum(after.values()) == sum(before.values()) + 1, "counted once, under one reason"
            (line,) = warnings(caplog)
            assert "entry.dat" in line and detail in line and driver.settings.name in line
    finally:
        driver.close()


def test_a_refused_file_is_logged_and_counted_once(
    tree: Tree, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Scan after scan, rescan after rescan, and each inotify event of it: one warning, one count."""
    caplog.set_level(logging.WARNING, logger="p3s")
    driver = Driver(kind, "live", tree)
    name = driver.settings.name
    try:
        driver.run(lambda: os.mkfifo(tree.root / "pipe.dat"))
        # A writer opening and closing the FIFO: IN_CLOSE_WRITE fires for it, as for a file.
        fd = os.open(tree.root / "pipe.dat", os.O_RDWR | os.O_NONBLOCK)
        os.close(fd)
        os.symlink(tree.secret, tree.root / "secret.dat")
        assert driver.read() == []
        assert driver.source is not None
        assert driver.source.scan(3600) == [] and driver.source.scan(None) == []
        assert driver.read() == []
        assert refused(name, NOT_REGULAR) == 1 and refused(name, OUTSIDE_ROOT) == 1
        assert len(warnings(caplog)) == 2, warnings(caplog)
    finally:
        driver.close()


def test_a_directory_symlink_is_never_entered(tree: Tree, kind: str) -> None:
    """A link to a directory outside the root, there before the source starts: nothing under it is published."""
    os.symlink(tree.outside, tree.root / "escape")
    os.symlink(tree.outside, tree.root / "escape.dat")
    driver = Driver(kind, "live", tree)
    try:
        assert driver.run(lambda: (tree.outside / "later.dat").write_bytes(b"l")) == []
        assert driver.source is not None
        assert driver.source.scan(None) == []
        (tree.root / "inside.dat").write_bytes(b"i")
        assert [s.path for s in driver.read()] == [tree.root / "inside.dat"]
    finally:
        driver.close()


def test_a_link_in_a_root_given_through_a_symlink(tree: Tree, kind: str) -> None:
    """The root's location may itself be a symlink: its resolved form is the root, the event path stays under it."""
    alias = tree.outside / "alias"
    os.symlink(tree.root, alias)
    settings = SourceSettings(name=f"{kind}-{uuid.uuid4().hex[:8]}", kind=kind, location=str(alias),
                              pattern="*.dat", stable_scans=1, url_prefix="root://eos.example//raw")
    source = InotifySource(settings, SELECTOR) if kind == "inotify" else PollSource(settings, SELECTOR, 3600)
    try:
        assert source.scan(3600) == []
        os.symlink(tree.target, tree.root / "link.dat")
        os.symlink(alias / "store" / "target.bin", tree.root / "via-alias.dat")
        seen = {s.name: s for _ in range(2) for s in source.read()}
        assert sorted(seen) == ["link.dat", "via-alias.dat"]
        for item in seen.values():
            assert item.path == alias / "store" / "target.bin", "written under the configured location"
            assert to_event(settings, item).path == "root://eos.example//raw/store/target.bin"
    finally:
        source.close()


def test_the_watcher_publishes_the_resolved_path_under_the_links_name(
    tmp_path: Path, tree: Tree, embedded: Connection  # noqa: F811
) -> None:
    """Through the Watcher and the embedded broker, live and at its start-up rescan."""
    os.symlink(tree.target, tree.root / "before.dat")
    os.symlink(tree.secret, tree.root / "secret-before.dat")
    src = SourceSettings(name=f"buf-{uuid.uuid4().hex[:8]}", location=str(tree.root), pattern="*.dat")
    watcher = Watcher(make_settings(tmp_path, P3S_WATCHER_RESCAN_AGE_S="3600"), [src])
    try:
        watcher.rescan()
        os.symlink(tree.target, tree.root / "live.dat")
        os.symlink(tree.secret, tree.root / "secret-live.dat")
        watcher.poll_once(0.5)
        events = published(embedded)
        assert sorted((e.name, e.path) for e in events) == [("before.dat", str(tree.target)),
                                                            ("live.dat", str(tree.target))]
        assert refused(src.name, OUTSIDE_ROOT) == 2
    finally:
        watcher.close()


# -- xrootd: a listing shows no symlinks, but its paths must stay under the root ----------------


def test_xrootd_refuses_listed_paths_that_leave_the_root(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="p3s")
    lines = [
        "-rw-r--r-- u g 5 2024-01-01 12:00:00 /data/good.dat",
        "-rw-r--r-- u g 5 2024-01-01 12:00:00 /data/../etc/shadow.dat",
        "-rw-r--r-- u g 5 2024-01-01 12:00:00 /etc/passwd.dat",
        "-rw-r--r-- u g 5 2024-01-01 12:00:00 /data/./dot.dat",
        "-rw-r--r-- u g 5 2024-01-01 12:00:00 ../up.dat",
        "dr-xr-xr-x u g 0 2024-01-01 12:00:00 /data/..",
        "dr-xr-xr-x u g 0 2024-01-01 12:00:00 /elsewhere",
    ]
    xrdfs = tmp_path / "xrdfs"  # stands in for the client; lists the same entries for every directory
    xrdfs.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(lines) + "\nEOF\n")
    xrdfs.chmod(0o755)
    name = f"eos-{uuid.uuid4().hex[:8]}"
    settings = SourceSettings(name=name, kind="xrootd", location="root://127.0.0.1:1094//data", stable_scans=1)
    source = XrootdSource(settings, Selector("*.dat", ()), rescan_age_s=10 * 365 * 86400.0, xrdfs=str(xrdfs))
    (seen,) = source.read()
    assert source.healthy
    assert source.listings == 1, "no directory outside the root is listed"
    event = json.loads(encode(to_event(settings, seen)))
    assert (event["name"], event["path"]) == ("good.dat", "root://127.0.0.1:1094//data/good.dat")
    assert refused(name, "path outside root") == 6
    assert len(warnings(caplog)) == 6
    assert source.read() == [] and refused(name, "path outside root") == 6, "logged and counted once"
