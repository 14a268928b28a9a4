"""The watcher's inotify source: every way a file can arrive is reported once, and only when complete.

No server is needed: the source is driven directly (every inotify event of a
file operation is queued by the kernel before the system call returns, so one
``read()`` after the operation sees all of it), and the Watcher publishes
through the embedded broker, whose queue the tests read back.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from inotify_simple import Event, flags
from kombu import Connection

from p3s import metrics, topology
from p3s.config import SourceSettings, WatcherSettings
from p3s.messages import DataEvent
from p3s.watcher.files import FileSeen, Selector
from p3s.watcher.inotify import InotifySource
from p3s.watcher.service import Watcher
from tests.stack import make_settings

IGNORE = WatcherSettings().ignore


def source_settings(watch: Path, pattern: str = "*") -> SourceSettings:
    # A name of its own, so the rescan counter of one test is not another's.
    return SourceSettings(name=f"buf-{uuid.uuid4().hex[:8]}", location=str(watch), pattern=pattern)


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    path = tmp_path / "buffer"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory on the same file system as the watched one, but not watched."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


@pytest.fixture
def source(watch: Path) -> Iterator[InotifySource]:
    src = InotifySource(source_settings(watch), Selector("*", IGNORE))
    try:
        yield src
    finally:
        src.close()


def drain(source: InotifySource) -> list[FileSeen]:
    """Everything the source has to report now (the kernel has queued every event already)."""
    seen: list[FileSeen] = []
    while batch := source.read():
        seen.extend(batch)
    return seen


def paths(seen: list[FileSeen]) -> Counter[Path]:
    return Counter(item.path for item in seen)


def rescans(source: InotifySource) -> float:
    return metrics.WATCHER_RESCANS.labels(source.name)._value.get()


# -- each way a file can arrive --------------------------------------------


def test_write_and_close(source: InotifySource, watch: Path) -> None:
    path = watch / "run000001_0001.dat"
    path.write_bytes(b"x" * 1234)
    (item,) = drain(source)
    assert item.path == path
    assert item.size == 1234
    assert drain(source) == []


@pytest.mark.parametrize("temporary", [".{}.tmp", "{}.tmp", ".{}", "{}.part"])
def test_write_to_a_temporary_name_then_rename(source: InotifySource, watch: Path, temporary: str) -> None:
    path = watch / "run000001_0002.dat"
    tmp = watch / temporary.format(path.name)
    tmp.write_bytes(b"y" * 100)
    assert drain(source) == [], "a file under a temporary name is not reported"
    os.rename(tmp, path)
    (item,) = drain(source)
    assert (item.path, item.size) == (path, 100)


def test_mv_from_another_directory(source: InotifySource, watch: Path, outside: Path) -> None:
    staged = outside / "run000001_0003.dat"
    staged.write_bytes(b"z" * 10)
    assert drain(source) == [], "a file outside the tree is not reported"
    os.rename(staged, watch / staged.name)
    (item,) = drain(source)
    assert (item.path, item.size) == (watch / staged.name, 10)


def test_new_run_directory_with_files_written_at_once(source: InotifySource, watch: Path) -> None:
    run = watch / "run000002"
    run.mkdir()
    nested = run / "stream1"
    nested.mkdir()
    # Written before the source has seen the directory: no watch is in place yet.
    early = [run / f"early_{i}.dat" for i in range(5)] + [nested / "early_nested.dat"]
    for path in early:
        path.write_bytes(b"e")
    assert paths(drain(source)) == Counter(early)
    # Now the new directories are watched: later files come by their own events.
    late = [run / "late.dat", nested / "late_nested.dat"]
    for path in late:
        path.write_bytes(b"l")
    assert paths(drain(source)) == Counter(late)


def test_run_directory_moved_into_the_tree(source: InotifySource, watch: Path, outside: Path) -> None:
    run = outside / "run000003"
    run.mkdir()
    files = [run / f"f{i}.dat" for i in range(3)]
    for path in files:
        path.write_bytes(b"m")
    assert drain(source) == []
    os.rename(run, watch / run.name)
    assert paths(drain(source)) == Counter(watch / run.name / p.name for p in files)
    (watch / run.name / "after.dat").write_bytes(b"a")
    assert paths(drain(source)) == Counter([watch / run.name / "after.dat"])


def test_file_still_being_written_is_reported_when_closed(source: InotifySource, watch: Path) -> None:
    path = watch / "run000004_0001.dat"
    with open(path, "wb") as fh:
        fh.write(b"a" * 4096)
        fh.flush()
        os.fsync(fh.fileno())
        assert drain(source) == [], "an open file is not complete"
        fh.write(b"b" * 4096)
        fh.flush()
        assert drain(source) == [], "an open file is not complete"
    (item,) = drain(source)
    assert (item.path, item.size) == (path, 8192)


def test_hidden_and_temporary_names_are_never_reported(source: InotifySource, watch: Path) -> None:
    for name in (".hidden.dat", "partial.tmp", ".partial.dat.tmp", "copy.part", "backup.dat~"):
        (watch / name).write_bytes(b"h")
    (watch / "x.tmp").write_bytes(b"t")
    os.rename(watch / "x.tmp", watch / "y.tmp")  # a rename between temporary names
    staging = watch / ".staging"
    staging.mkdir()
    (staging / "visible_name.dat").write_bytes(b"s")
    assert drain(source) == []
    assert source.scan(max_age_s=None) == []


def test_pattern_limits_what_is_reported(watch: Path) -> None:
    src = InotifySource(source_settings(watch, "run*.dat"), Selector("run*.dat", IGNORE))
    try:
        (watch / "run1.dat").write_bytes(b"1")
        (watch / "notes.txt").write_bytes(b"2")
        assert paths(drain(src)) == Counter([watch / "run1.dat"])
    finally:
        src.close()


# -- bursts and overflows ---------------------------------------------------


BURST = 20_000


def test_burst_of_20000_files_each_reported_after_deduplication(source: InotifySource, watch: Path) -> None:
    """Created without reading: past the kernel's queue limit this overflows, and the rescan fills in."""
    before = rescans(source)
    # Most in the watched directory itself (two queued events each: IN_CREATE, IN_CLOSE_WRITE),
    # the rest in a run directory created in the middle of the burst.
    run = watch / "run000009"
    expected: set[Path] = set()
    for i in range(BURST):
        if i == BURST - 2000:
            run.mkdir()
        path = (run if i >= BURST - 2000 else watch) / f"f{i:05d}.dat"
        path.write_bytes(b"")
        expected.add(path)
    seen = drain(source)
    assert set(paths(seen)) == expected, "every file, and nothing else"
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit < BURST - 2000:  # every file in a watched directory costs at least one event
        assert rescans(source) > before, "the kernel queue must have overflowed into a full rescan"
    # After the burst (and any overflow), the tree is still followed, the new directory too.
    later = [watch / "later.dat", run / "later.dat"]
    for path in later:
        path.write_bytes(b"l")
    assert set(paths(drain(source))) == set(later)


def test_overflow_rescans_and_watches_directories_whose_events_were_lost(
    source: InotifySource, watch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synthetic IN_Q_OVERFLOW: the events before it are gone, so the tree is listed again."""
    old = watch / "old.dat"
    old.write_bytes(b"o")
    assert paths(drain(source)) == Counter([old])
    run = watch / "run000005"
    run.mkdir()
    lost = run / "lost.dat"
    lost.write_bytes(b"l")
    # The kernel dropped these events: read them and throw them away.
    list(source._inotify.read(timeout=0))
    before = rescans(source)
    real_read = source._inotify.read
    overflow = Event(wd=-1, mask=flags.Q_OVERFLOW, cookie=0, name="")
    monkeypatch.setattr(source._inotify, "read", lambda timeout=None: [overflow])
    seen = source.read()
    monkeypatch.setattr(source._inotify, "read", real_read)
    assert rescans(source) == before + 1
    # A full rescan: everything, the already reported file again too (the dispatcher de-duplicates).
    assert set(paths(seen)) == {old, lost}
    # The directory whose IN_CREATE was lost is watched from now on.
    after = run / "after.dat"
    after.write_bytes(b"a")
    assert paths(drain(source)) == Counter([after])


# -- restarts: the start-up rescan -------------------------------------------


def test_scan_finds_recent_files_and_skips_old_ones(watch: Path) -> None:
    recent = watch / "run000006" / "recent.dat"
    recent.parent.mkdir()
    recent.write_bytes(b"r")
    old = watch / "old.dat"
    old.write_bytes(b"o")
    a_day_ago = os.stat(old).st_mtime - 86400
    os.utime(old, (a_day_ago, a_day_ago))
    src = InotifySource(source_settings(watch), Selector("*", IGNORE))
    try:
        assert paths(src.scan(max_age_s=3600)) == Counter([recent])
        assert set(paths(src.scan(max_age_s=None))) == {recent, old}
    finally:
        src.close()


def published(connection: Connection) -> list[DataEvent]:
    """Every data event waiting in the dispatcher's events queue of the embedded broker."""
    events: list[DataEvent] = []
    queue = topology.events_queue(connection.default_channel)
    while (message := queue.get(no_ack=True)) is not None:
        events.append(DataEvent.parse(message.body))
    return events


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Connection]:
    settings = make_settings(tmp_path)
    assert settings.broker.embedded
    with Connection(settings.broker.effective_url) as conn:
        yield conn


def make_watcher(tmp_path: Path, watch: Path) -> Watcher:
    return Watcher(make_settings(tmp_path, P3S_WATCHER_RESCAN_AGE_S="3600"), [source_settings(watch)])


def test_file_written_while_the_watcher_was_stopped(tmp_path: Path, watch: Path, embedded: Connection) -> None:
    """The start-up rescan publishes what arrived while no watcher ran, but not old files."""
    first = make_watcher(tmp_path, watch)
    (watch / "before.dat").write_bytes(b"b")
    first.poll_once(0.5)
    first.close()
    assert [e.name for e in published(embedded)] == ["before.dat"]

    # Written while no watcher runs, in an existing and in a new run directory.
    (watch / "during.dat").write_bytes(b"d")
    (watch / "run000007").mkdir()
    (watch / "run000007" / "during_run.dat").write_bytes(b"d")
    old = watch / "old.dat"
    old.write_bytes(b"o")
    a_day_ago = os.stat(old).st_mtime - 86400
    os.utime(old, (a_day_ago, a_day_ago))

    second = make_watcher(tmp_path, watch)
    try:
        second.rescan()
        second.publish_backlog()
        events = published(embedded)
        by_name = {e.name: e for e in events}
        # before.dat is recent too: published again, which the dispatcher records as a duplicate.
        assert sorted(by_name) == ["before.dat", "during.dat", "during_run.dat"]
        assert len(events) == len(by_name)
        assert by_name["during_run.dat"].path == str(watch / "run000007" / "during_run.dat")
        assert by_name["during.dat"].size == 1
        # And it follows the tree from then on.
        (watch / "run000007" / "after.dat").write_bytes(b"a")
        second.poll_once(0.5)
        assert [e.name for e in published(embedded)] == ["after.dat"]
    finally:
        second.close()


def test_every_way_of_arriving_is_published_once(
    tmp_path: Path, watch: Path, outside: Path, embedded: Connection
) -> None:
    """Through the Watcher and the embedded broker: one data event per complete file, with its path."""
    watcher = make_watcher(tmp_path, watch)
    try:
        (watch / "closed.dat").write_bytes(b"c")
        (watch / ".renamed.dat.tmp").write_bytes(b"r")
        os.rename(watch / ".renamed.dat.tmp", watch / "renamed.dat")
        (outside / "moved.dat").write_bytes(b"m")
        os.rename(outside / "moved.dat", watch / "moved.dat")
        (watch / "run000008").mkdir()
        (watch / "run000008" / "in_run.dat").write_bytes(b"i")
        writing = open(watch / "writing.dat", "wb")  # closed below, after the first poll
        try:
            writing.write(b"partial")
            writing.flush()
            watcher.poll_once(0.5)
            events = published(embedded)
            assert sorted((e.name, e.path) for e in events) == sorted(
                [
                    ("closed.dat", str(watch / "closed.dat")),
                    ("renamed.dat", str(watch / "renamed.dat")),
                    ("moved.dat", str(watch / "moved.dat")),
                    ("in_run.dat", str(watch / "run000008" / "in_run.dat")),
                ]
            )
            assert all(e.stream == "raw" for e in events)
        finally:
            writing.close()
        watcher.poll_once(0.5)
        assert [(e.name, e.size) for e in published(embedded)] == [("writing.dat", 7)]
    finally:
        watcher.close()


def test_unreachable_broker_keeps_events_in_the_backlog(tmp_path: Path, watch: Path) -> None:
    """No broker listening: the watcher keeps reading its source and holds every event, in order."""
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(tmp_path, f"amqp://guest:guest@127.0.0.1:{port}//")
    watcher = Watcher(settings, [source_settings(watch)])
    try:
        for name in ("a.dat", "b.dat"):
            (watch / name).write_bytes(b"x")
            watcher.poll_once(0.5)
        watcher.publish_backlog()
        assert [e.name for e in watcher.backlog] == ["a.dat", "b.dat"]
    finally:
        watcher.close()
