"""The Phase I end-to-end scenarios on the real RabbitMQ and PostgreSQL of this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import scenarios
from tests.stack import Stack, graphml, make_settings, probe_command, terminal_jobs, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
def stack(tmp_path: Path, broker_url: str, database_url: str) -> Iterator[tuple[Stack, Path]]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    s = Stack(make_settings(tmp_path, broker_url, database_url), watch=watch, pilots=1).start()
    try:
        yield s, watch
    finally:
        s.stop()


@pytest.mark.parametrize(
    "scenario",
    scenarios.PHASE_ONE,
    ids=lambda f: f.__name__,
)
def test_real_servers(stack: tuple[Stack, Path], scenario: Callable[[Stack, Path], None]) -> None:
    scenario(*stack)


def test_pilot_needs_no_database(tmp_path: Path, broker_url: str, database_url: str) -> None:
    """A pilot process given only the broker URL registers and runs jobs; it creates no database."""
    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = make_settings(tmp_path, broker_url, database_url)
    stack = Stack(settings, watch=watch, pilots=0).start()
    pilot_home = tmp_path / "pilot-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env.update(
        P3S_BROKER_URL=broker_url,
        P3S_STATE_DIR=str(pilot_home),
        P3S_LOG_ROOT=str(settings.log_path),
        P3S_OUTPUT_ROOT=str(settings.output_path),
        P3S_PILOT_HEARTBEAT_S="1",
        HOME=str(pilot_home),
    )
    pilot = subprocess.Popen([sys.executable, "-m", "p3s", "pilot", "--queues", "default", "--id", "dbless"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stack.import_template(graphml({"probe": {"command": probe_command("{input}")}}))
        wait_for(lambda: any(p["id"] == "dbless" for p in stack.pilots()), what="the pilot to register")
        for i in range(3):
            (watch / f"f{i}.dat").write_bytes(b"x")
        jobs = wait_for(lambda: terminal_jobs(stack, 3), what="three jobs to end")
        assert [j["state"] for j in jobs] == ["finished"] * 3
        assert {j["pilot_id"] for j in jobs} == {"dbless"}
    finally:
        pilot.send_signal(signal.SIGTERM)
        out, _ = pilot.communicate(timeout=20)
        stack.stop()
    assert pilot.returncode == 0, out
    assert not (pilot_home / "p3s.db").exists(), "a pilot must not open a database"
    assert not list(pilot_home.rglob("*.db"))
    assert "p3s.db" not in out and "sqlite" not in out.lower()
