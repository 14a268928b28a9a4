"""A daemon started while the broker is away says, at WARNING, that it waits, and goes on when it is back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_outage import RabbitNode, SERVER_SCRIPTS
from tests.conftest import unavailable
from tests.stack import make_settings, env_for, wait_for

pytestmark = [pytest.mark.rabbitmq]


def test_a_pilot_waits_for_the_broker_with_warnings_and_ctrl_c_ends_it_quietly(tmp_path: Path) -> None:
    import shutil

    server = next((s for s in SERVER_SCRIPTS if shutil.which(s) or os.path.exists(s)), None)
    if server is None:
        unavailable("RabbitMQ", "no rabbitmq-server script to start a node of the test's own")
    base = tmp_path / "node"
    base.mkdir()
    node = RabbitNode(base, server)  # not started yet: the pilot must wait for it
    settings = make_settings(tmp_path, broker_url=node.url)
    env = {**os.environ, **env_for(settings)}

    def start(log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "p3s", "pilot", "--max-jobs", "1"], env=env,
                                    stdout=out, stderr=subprocess.STDOUT)

    # Ctrl-C while it waits: an exit, not a traceback.
    first = tmp_path / "first.log"
    pilot = start(first)
    try:
        wait_for(lambda: "waiting for the broker" in first.read_text(), timeout=20, what="the waiting WARNING")
        text = first.read_text()
        assert "WARNING" in text and "guest:**" in text and "guest:guest@" not in text, text
        assert pilot.poll() is None, "it waits, it does not give up"
        pilot.send_signal(signal.SIGINT)
        assert pilot.wait(20) == 130
        assert "Traceback" not in first.read_text()
    finally:
        if pilot.poll() is None:
            pilot.kill()
    # And when the broker comes, the waiting pilot goes on.
    second = tmp_path / "second.log"
    pilot = start(second)
    try:
        wait_for(lambda: "waiting for the broker" in second.read_text(), timeout=20, what="the waiting WARNING")
        node.start()
        wait_for(lambda: "waiting for tasks" in second.read_text(), timeout=60, what="the pilot to connect")
        pilot.send_signal(signal.SIGTERM)
        pilot.wait(30)
    finally:
        if pilot.poll() is None:
            pilot.kill()
        node.stop()
