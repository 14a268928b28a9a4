"""The poll source on a local directory: stability, new run directories, once only, and its cost."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p3s.config import SourceSettings
from p3s.watcher import poll
from p3s.watcher.files import Budget, Selector
from p3s.watcher.poll import PollSource

DAY = 86400.0


def make_source(root: Path, stable_scans: int = 2, rescan_age_s: float = 3600.0, newest_dirs: int = 2) -> PollSource:
    settings = SourceSettings(
        name="eos", kind="poll", location=str(root), stable_scans=stable_scans, newest_dirs=newest_dirs
    )
    return PollSource(settings, Selector("*.dat", (".*", "*.tmp")), rescan_age_s)


def names(seen: list[Any]) -> list[str]:
    return sorted(s.path.name for s in seen)


def age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_published_only_after_stable_scans(tmp_path: Path) -> None:
    source = make_source(tmp_path, stable_scans=3)
    assert source.scan(3600) == []
    (tmp_path / "a.dat").write_bytes(b"x" * 10)
    (tmp_path / "a.tmp").write_bytes(b"x")  # ignored name
    assert source.read() == []  # seen once
    assert source.read() == []  # twice
    (seen,) = source.read()  # three times unchanged: published
    assert seen.path == tmp_path / "a.dat" and seen.size == 10
    assert source.healthy


def test_a_growing_file_waits(tmp_path: Path) -> None:
    source = make_source(tmp_path)
    source.scan(3600)
    path = tmp_path / "growing.dat"
    with open(path, "wb") as fh:
        for i in range(4):
            fh.write(b"x" * (i + 1))
            fh.flush()
            assert source.read() == [], f"published while still growing (write {i})"
    assert names(source.read()) == ["growing.dat"]


def test_new_run_directory_is_found(tmp_path: Path) -> None:
    (tmp_path / "run1").mkdir()
    source = make_source(tmp_path, newest_dirs=0)
    source.scan(3600)
    (tmp_path / "run2" / "sub").mkdir(parents=True)
    (tmp_path / "run2" / "sub" / "f.dat").write_bytes(b"1")
    (tmp_path / "run1" / "g.dat").write_bytes(b"2")
    source.read()
    assert names(source.read()) == ["f.dat", "g.dat"]


def test_published_once(tmp_path: Path) -> None:
    source = make_source(tmp_path, stable_scans=1)
    source.scan(3600)
    (tmp_path / "once.dat").write_bytes(b"1")
    assert names(source.read()) == ["once.dat"]
    for _ in range(3):
        assert source.read() == []
    # Even after the file changes: a poll source publishes a name once.
    (tmp_path / "once.dat").write_bytes(b"22")
    assert source.read() == []


def test_start_up_publishes_only_files_newer_than_the_rescan_age(tmp_path: Path) -> None:
    (tmp_path / "run1").mkdir()
    old, recent = tmp_path / "run1" / "old.dat", tmp_path / "run1" / "recent.dat"
    old.write_bytes(b"o")
    recent.write_bytes(b"r")
    age(old, DAY)
    source = make_source(tmp_path, stable_scans=2, rescan_age_s=3600)
    assert source.scan(3600) == []
    assert names(source.read()) == ["recent.dat"]
    assert source.read() == []


def test_a_vanished_root_makes_it_unhealthy_and_its_return_healthy(tmp_path: Path) -> None:
    root = tmp_path / "mount"
    root.mkdir()
    source = make_source(root)
    source.scan(3600)
    root.rename(tmp_path / "away")
    assert source.read() == [] and not source.healthy
    (tmp_path / "away").rename(root)
    source.read()
    assert source.healthy


def test_budget_allows_so_many_per_minute() -> None:
    now = [0.0]
    budget = Budget(3, clock=lambda: now[0])
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 59.9
    assert not budget.take()
    now[0] = 60.0
    assert budget.take()


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"stat": 0, "scandir": 0}

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return counted

    monkeypatch.setattr(poll.os, "stat", wrap("stat", os.stat))
    monkeypatch.setattr(poll.os, "scandir", wrap("scandir", os.scandir))
    return calls


def test_a_scan_lists_only_changed_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 000 old files in 50 directories, then 10 new ones in two: a scan costs tens of calls, not thousands."""
    dirs = [tmp_path / f"run{i:04d}" for i in range(50)]
    for d in dirs:
        d.mkdir()
        for j in range(100):
            (d / f"f{j:03d}.dat").write_bytes(b"")
            age(d / f"f{j:03d}.dat", DAY)
        age(d, DAY)
    age(tmp_path, DAY)
    source = make_source(tmp_path, newest_dirs=2)
    calls = _counting(monkeypatch)
    assert source.scan(3600) == []
    # The first scan lists every directory but stats no file in a directory older than the rescan age.
    assert calls["scandir"] == 51 and calls["stat"] == 52, calls

    for d in (dirs[3], dirs[40]):
        for k in range(5):
            (d / f"new{k}.dat").write_bytes(b"n")
    calls.update(stat=0, scandir=0)
    source.read()
    # Each directory stat'ed once; two changed ones listed; their 100 old files stat'ed once to judge them.
    assert calls["scandir"] == 2, calls
    assert calls["stat"] <= 52 + 2 * 105, calls
    calls.update(stat=0, scandir=0)
    assert len(source.read()) == 10
    # Now only the pending (then published) files' directories are listed, and published files not stat'ed.
    assert calls["scandir"] <= 2 and calls["stat"] <= 52 + 2 * 105, calls
    calls.update(stat=0, scandir=0)
    assert source.read() == []
    # A quiet scan: one stat per directory, the two newest listed, and no file stat'ed again.
    assert calls["scandir"] == 2 and calls["stat"] == 52, calls
