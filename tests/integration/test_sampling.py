"""Sampling: a deterministic fraction per stream, the same in every dispatcher, changed by SIGHUP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from p3s import db
from p3s.broker import Publisher
from p3s.config import load_settings
from p3s.dispatcher.sampling import keep
from p3s.messages import DataEvent
from p3s.topology import events_exchange, events_queue, invalid_queue
from p3s.watcher.service import event_message
from tests.stack import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


def decisions(database_url: str) -> dict[str, str]:
    engine = db.make_engine(database_url)
    try:
        with Session(engine) as s:
            return dict(s.execute(select(db.FileRecord.name, db.FileRecord.decision)).all())
    except ProgrammingError:  # the dispatcher has not made the schema yet
        return {}
    finally:
        engine.dispose()


class DispatcherProcess:
    def __init__(self, config: Path, broker_url: str, database_url: str, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
        env.update(P3S_BROKER_URL=broker_url, P3S_DATABASE_URL=database_url, P3S_STATE_DIR=str(tmp_path / "state"))
        self.log = open(tmp_path / f"dispatcher-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "p3s", "--config", str(config), "dispatcher"],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.seek(0)
        return self.log.read()


@pytest.fixture
def dispatchers(tmp_path: Path) -> Iterator[list[DispatcherProcess]]:
    started: list[DispatcherProcess] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.stop()


def publish(broker_url: str, names: list[str]) -> None:
    settings = load_settings(None, {"P3S_BROKER_URL": broker_url})
    publisher = Publisher(settings.broker, exchanges=[events_exchange], queues=[invalid_queue, events_queue])
    try:
        now = time.time()
        publisher.publish(event_message(DataEvent(n, f"/data/{n}", "raw", now, source="test")) for n in names)
    finally:
        publisher.close()


def test_sampling_fraction_second_dispatcher_and_sighup(
    tmp_path: Path, broker_url: str, new_database: Callable[[], str], dispatchers: list[DispatcherProcess]
) -> None:
    config = tmp_path / "p3s.toml"
    config.write_text("[sampling]\nraw = 0.1\n")
    names = [f"np04_raw_run{5000 + i // 10:06d}_{i % 10:04d}.hdf5" for i in range(1000)]

    first_db = new_database()
    first = DispatcherProcess(config, broker_url, first_db, tmp_path)
    dispatchers.append(first)
    publish(broker_url, names)
    got = wait_for(lambda: (d := decisions(first_db)) and len(d) == 1000 and d, timeout=60, what="1000 decisions")
    accepted = sorted(n for n, d in got.items() if d == "accepted")
    assert 70 <= len(accepted) <= 130, len(accepted)
    assert set(got.values()) == {"accepted", "sampled_out"}
    assert accepted == sorted(n for n in names if keep(n, 0.1))
    first.stop()

    # A second dispatcher, its own process and database, takes the same decisions.
    second_db = new_database()
    second = DispatcherProcess(config, broker_url, second_db, tmp_path)
    dispatchers.append(second)
    publish(broker_url, names)
    again = wait_for(lambda: (d := decisions(second_db)) and len(d) == 1000 and d, timeout=60, what="the rerun")
    assert again == got

    # A new fraction takes effect on SIGHUP, with events arriving throughout the reload.
    config.write_text("[sampling]\nraw = 0.5\n")
    more = [f"np04_raw_run{7000 + i // 10:06d}_{i % 10:04d}.hdf5" for i in range(1000)]
    sender = threading.Thread(target=lambda: [publish(broker_url, more[i:i + 50]) or time.sleep(0.05)
                                              for i in range(0, 1000, 50)])
    time.sleep(0.5)  # let the reload land while the second batch is in flight
    second.proc.send_signal(signal.SIGHUP)
    sender.start()
    sender.join()
    final = wait_for(lambda: (d := decisions(second_db)) and len(d) == 2000 and d, timeout=60, what="2000")
    log = second.stop()
    assert second.proc.returncode == 0, log
    assert "sampling now" in log and "0.5" in log
    late = {n: final[n] for n in more}
    assert sorted(n for n, d in late.items() if d == "accepted") == sorted(n for n in more if keep(n, 0.5))
    assert 420 <= sum(d == "accepted" for d in late.values()) <= 580
