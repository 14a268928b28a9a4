"""A quiet spell between runs loses nothing: the files after it run as the files before it.

Dispatcher, watcher and pilot run as separate processes, as in production,
with a negotiated AMQP heartbeat of 2 s: RabbitMQ then closes a connection
that stays silent for about 4 to 6 s, so a quiet spell of 12 s is longer than
any connection may stay silent without heartbeats.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.procs import Parts, finished_names, import_template
from tests.stack import graphml, make_settings, probe_command

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

HEARTBEAT_S = "2"
QUIET_S = 12.0


def test_files_after_a_quiet_spell_all_run(tmp_path: Path, broker_url: str, database_url: str) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = make_settings(tmp_path, broker_url, database_url)
    import_template(settings, graphml({"probe": {"command": probe_command()}}, budget_s=60))
    first = [f"np04_raw_run000100_{i:04d}.dat" for i in range(3)]
    second = [f"np04_raw_run000101_{i:04d}.dat" for i in range(3)]

    with Parts(tmp_path, settings, P3S_BROKER_HEARTBEAT_S=HEARTBEAT_S) as parts:
        dispatcher = parts.start("dispatcher", "dispatcher")
        parts.wait_for(lambda: dispatcher.log_has("dispatcher: consuming on"), alive=[dispatcher],
                       what="the dispatcher to consume")
        pilot = parts.start("pilot", "pilot", "--queues", "default", "--id", "quiet-pilot")
        watcher = parts.start("watcher", "watcher", "--watch", str(watch))
        every = [dispatcher, pilot, watcher]
        parts.wait_for(lambda: pilot.log_has("waiting for tasks") and watcher.log_has("watcher: following"),
                       alive=every, what="the pilot and the watcher to start")

        for name in first:
            (watch / name).write_bytes(b"first run")
        parts.wait_for(lambda: finished_names(parts.db_jobs()) >= set(first), alive=every,
                       what="the jobs of the files before the quiet spell to finish")

        # Nothing arrives: every connection must heartbeat, or RabbitMQ closes it.
        time.sleep(QUIET_S)
        parts.assert_alive(*every)

        for name in second:
            (watch / name).write_bytes(b"second run")
        parts.wait_for(lambda: finished_names(parts.db_jobs()) >= set(first + second), timeout=30, alive=every,
                       what="the jobs of the files after the quiet spell to finish")

        files = parts.files()
        assert sorted(f["name"] for f in files) == sorted(first + second), files
        assert {f["decision"] for f in files} == {"accepted"}, files
        jobs = parts.jobs()
        assert len(jobs) == 6 and {j["state"] for j in jobs} == {"finished"}, jobs
        audit = parts.audit()
        assert audit.returncode == 0, audit.stdout + audit.stderr
        parts.assert_alive(*every)

        trouble = {p.name: p.trouble() for p in every}
        assert not any(trouble.values()), trouble
