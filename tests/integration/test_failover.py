"""Failover: EOS (an XRootD server) as primary, the online buffer (inotify) as its fallback."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from p3s import metrics
from p3s.config import SourceSettings
from tests.integration.test_xrootd import (  # noqa: F401 (fixtures)
    WatcherThread,
    XrootdServer,
    stack,
    xrootd_available,
    xrootd_server,
    xrootd_source,
)
from tests.stack import Stack, graphml, probe_command, wait_for

pytestmark = [pytest.mark.xrootd, pytest.mark.rabbitmq, pytest.mark.postgres]


def finished_names(s: Stack) -> Counter[str]:
    """How many finished jobs each file name has."""
    return Counter(j["file"].rsplit("/", 1)[-1] for j in s.jobs() if j["state"] == "finished")


def test_fallback_takes_over_and_hands_back(
    stack: Stack,  # noqa: F811 (the fixture imported above)
    xrootd_server: XrootdServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    buffer = tmp_path / "buffer"
    buffer.mkdir()
    eos = xrootd_server.export
    stack.import_template(graphml({"probe": {"command": probe_command("{input}")}}, trigger="*.dat"))
    primary = xrootd_source(xrootd_server)
    fallback = SourceSettings(name="buffer", kind="inotify", location=str(buffer), pattern="*.dat",
                              fallback_for="eos", failover_after_s=2.0, max_files_per_minute=600)
    switches = metrics.SOURCE_SWITCHES.labels("buffer", "active")
    switched_before = switches._value.get()
    runner = WatcherThread(stack.settings, [primary, fallback]).start()
    slot = runner.watcher.slots[1]

    def daq(name: str, to_eos: bool = True) -> None:
        """As the DAQ does: the buffer first, then the copy to EOS."""
        (buffer / name).write_bytes(name.encode() * 10)
        if to_eos:
            shutil.copyfile(buffer / name, eos / name)

    try:
        # 1. Normal running: EOS feeds p3s, the buffer stands by.
        daq("run1_a.dat")
        wait_for(lambda: finished_names(stack)["run1_a.dat"] == 1, what="run1_a.dat from EOS")
        assert not slot.active

        # 2. EOS goes away: after failover_after_s the buffer takes over; new files run from it.
        xrootd_server.stop()
        wait_for(lambda: slot.active, timeout=20, what="the fallback to become active")
        assert switches._value.get() == switched_before + 1
        daq("run1_b.dat", to_eos=False)
        daq("run1_c.dat", to_eos=False)
        wait_for(lambda: finished_names(stack)["run1_b.dat"] == 1 and finished_names(stack)["run1_c.dat"] == 1,
                 what="files from the buffer while EOS is down")

        # 3. EOS is back: the primary resumes, the buffer is idle again; the DAQ catches up its copies.
        xrootd_server.start()
        wait_for(lambda: not slot.active, timeout=20, what="the fallback to become idle")
        shutil.copyfile(buffer / "run1_b.dat", eos / "run1_b.dat")
        shutil.copyfile(buffer / "run1_c.dat", eos / "run1_c.dat")
        daq("run1_d.dat")
        wait_for(lambda: finished_names(stack)["run1_d.dat"] == 1, what="run1_d.dat from EOS again")
        # run1_b and run1_c arrive a second time, from EOS: they must show up as duplicates.
        wait_for(lambda: sum(f["decision"] == "duplicate" for f in stack.files()) >= 2, what="the duplicates")
    finally:
        runner.stop()

    # Each file ran once, though several were seen on both sources.
    assert finished_names(stack) == Counter({n: 1 for n in ("run1_a.dat", "run1_b.dat", "run1_c.dat", "run1_d.dat")})
    decisions = Counter(f["decision"] for f in stack.files())
    assert decisions["accepted"] == 4 and set(decisions) <= {"accepted", "duplicate"}, decisions
    assert len(stack.workflows()) == 4
    report = stack.audit()
    assert report.ok, report.problems
