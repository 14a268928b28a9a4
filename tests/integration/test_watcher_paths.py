"""On the real RabbitMQ: a symlink to /etc/shadow in a watched tree is never published, live or at rescan.

A Watcher runs in a thread; the events queue is read back with a plain kombu
connection.  Regular files written before and after each link mark when the
watcher has looked: once the later file's event is there, the link's decision
has been taken, and it is a refusal, logged and counted.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest

from p3s import metrics
from p3s.config import SourceSettings
from tests.integration.test_watcher_faults import EventReader, events  # noqa: F401 (fixture)
from tests.integration.test_xrootd import WatcherThread
from tests.stack import make_settings, wait_for

pytestmark = [pytest.mark.rabbitmq]

SHADOW = Path("/etc/shadow")
OUTSIDE_ROOT = "symlink outside root"


@pytest.mark.parametrize("kind", ["inotify", "poll"])
def test_a_symlink_to_etc_shadow_is_not_published_moved_in_or_found_at_rescan(
    tmp_path: Path, broker_url: str, events: EventReader, kind: str, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    if not SHADOW.exists():
        pytest.skip("no /etc/shadow on this host")
    caplog.set_level(logging.WARNING, logger="p3s")
    root, outside = tmp_path / "buffer", tmp_path / "staging"
    root.mkdir()
    outside.mkdir()
    # There before the watcher starts: found by its start-up rescan.
    os.symlink(SHADOW, root / "found.dat")
    (root / "before.dat").write_bytes(b"b")
    name = f"{kind}-{uuid.uuid4().hex[:8]}"
    source = SourceSettings(name=name, kind=kind, location=str(root), pattern="*.dat",
                            scan_interval_s=0.1, stable_scans=1)
    runner = WatcherThread(make_settings(tmp_path, broker_url, P3S_WATCHER_RESCAN_AGE_S="3600"), [source]).start()

    def refused() -> float:
        return metrics.WATCHER_FILES_REFUSED.labels(name, OUTSIDE_ROOT)._value.get()

    try:
        wait_for(lambda: "before.dat" in events.names(), timeout=15, what="the rescan's regular file")
        # Both were found by the same scan, and published (or not) in the same batch.
        assert events.names() == ["before.dat"], [(e.name, e.path) for e in events.read()]
        assert refused() == 1

        # Made beside the tree and renamed into it while the watcher runs, as a write-then-rename would.
        os.symlink(SHADOW, outside / "moved.dat")
        os.rename(outside / "moved.dat", root / "moved.dat")
        (root / "after.dat").write_bytes(b"a")
        wait_for(lambda: "after.dat" in events.names(), timeout=15, what="the live regular file")
        # The link was renamed in before after.dat was written: its event was read first.
        assert sorted(events.names()) == ["after.dat", "before.dat"], [(e.name, e.path) for e in events.read()]
        assert refused() == 2
        assert {e.path for e in events.read()} == {str(root / "before.dat"), str(root / "after.dat")}
        assert all(str(SHADOW) not in e.path for e in events.read())
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum(OUTSIDE_ROOT in line and str(SHADOW) in line for line in lines) == 2, lines
        # Later scans (poll) and events do not count the same links again.
        (root / "last.dat").write_bytes(b"l")
        wait_for(lambda: "last.dat" in events.names(), timeout=15, what="one more file")
        assert refused() == 2
    finally:
        runner.stop()
