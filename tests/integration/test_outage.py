"""A RabbitMQ outage while files arrive: nothing written during it is lost.

The test runs a RabbitMQ node of its own (own node name, ports, mnesia and log
directories) so that stopping it leaves the shared broker, and every other
test, alone.  The node is stopped and started by the PID of the process this
test started, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.stack import Stack, graphml, make_settings, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

# The Debian package's /usr/sbin/rabbitmq-server switches to the rabbitmq user
# through su, which hides the server's PID; the script it runs does not.
SERVER_SCRIPTS = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class RabbitNode:
    """A RabbitMQ node in a temporary directory, started and stopped by this test only."""

    def __init__(self, base: Path, server: str) -> None:
        self.server = server
        self.base = base
        self.name = f"p3s-outage-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        dist = free_port()
        while dist == self.port:
            dist = free_port()
        (base / "enabled_plugins").write_text("[].\n")
        # Not /etc/rabbitmq/rabbitmq.conf: that one names the shared broker's listener.
        (base / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
        self.env = {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie of this node lives here
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 90.0) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        out = open(self.base / f"server-{self.starts}.out", "wb")  # noqa: SIM115 - owned by the process
        # Its own session: a Ctrl-C of pytest reaches the node only through stop().
        self.process = subprocess.Popen(
            [self.server], env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        end = time.monotonic() + timeout
        while not port_open(self.port):
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"RabbitMQ node {self.name} exited while starting: {self.log_tail()}")
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"RabbitMQ node {self.name} did not listen within {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to the server script this test started: it stops its own beam and waits for it."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                self._kill_beam()
                process.kill()
                process.wait(10)
        self._kill_beam()  # only if it outlived its script
        wait_for(lambda: not port_open(self.port), timeout=30, what=f"{self.name} to close its port")

    def _kill_beam(self) -> None:
        try:
            pid = int((self.base / "node.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return
        if self.name.encode() in cmdline:  # a reused PID is left alone
            os.kill(pid, signal.SIGKILL)

    def log_tail(self) -> str:
        logs = sorted((self.base / "log").glob("*.log")) + sorted(self.base.glob("server-*.out"))
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in logs)


def server_script() -> str | None:
    for candidate in SERVER_SCRIPTS:
        found = shutil.which(candidate)
        if found and (os.geteuid() == 0 or not found.startswith("/usr/lib/")):
            return found
    return None


@pytest.fixture
def rabbit_node(tmp_path_factory: pytest.TempPathFactory, rabbitmq_available: None) -> Iterator[RabbitNode]:
    server = server_script()
    if server is None:
        unavailable("RabbitMQ", "no rabbitmq-server script to start a node of the test's own")
    # A short directory: the node's Unix sockets and paths stay well within limits.
    node = RabbitNode(tmp_path_factory.mktemp("rmq"), server)
    try:
        node.start()
        yield node
    finally:
        node.stop()


class Writer(threading.Thread):
    """Writes a file into ``watch`` every ``every`` seconds until stopped."""

    def __init__(self, watch: Path, every: float = 0.1) -> None:
        super().__init__(name="writer", daemon=True)
        self.watch, self.every = watch, every
        self.written: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            name = f"run000042_{len(self.written):05d}.dat"
            (self.watch / name).write_bytes(b"d" * 100)
            self.written.append(name)

    def count(self) -> int:
        return len(self.written)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(10)


def test_files_written_during_a_broker_outage_all_reach_the_database(
    tmp_path: Path, rabbit_node: RabbitNode, database_url: str
) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = make_settings(tmp_path, rabbit_node.url, database_url)
    stack = Stack(settings, watch=watch, pilots=1)
    writer = Writer(watch)

    def recorded() -> set[str]:
        return {f["name"] for f in stack.files()}

    def finished() -> set[str]:
        return {Path(j["file"]).name for j in stack.jobs(state="finished")}

    try:
        stack.start()
        # A payload that costs next to nothing, so the pilot keeps up with the writer.
        stack.import_template(graphml({"quick": {"command": shutil.which("true") or "true"}}))
        writer.start()

        # Before: files are recorded and their jobs run.
        wait_for(lambda: len(recorded()) >= 5 and finished(), timeout=30, what="the pipeline to run before the outage")

        # The outage: files keep arriving, and the watcher holds their events.
        rabbit_node.stop()
        during_from = writer.count()
        wait_for(lambda: writer.count() >= during_from + 20, timeout=30, what="files written during the outage")
        during_to = writer.count()
        assert recorded() <= set(writer.written[:during_from]), "nothing new is recorded while the broker is down"

        # Back: same node name and mnesia directory, so durable queues and their messages survive.
        rabbit_node.start()
        after_from = writer.count()
        wait_for(lambda: writer.count() >= after_from + 10, timeout=30, what="files written after the outage")
        writer.stop()
        written = set(writer.written)
        assert len(written) == writer.count() > during_to > during_from

        wait_for(lambda: recorded() >= written, timeout=60, what="every file written to be recorded")
        files = stack.files()
        assert {f["name"] for f in files} == written, "nothing outside what was written"
        # Each file decided once; a rescan or a redelivery may add records, all marked duplicate.
        firsts = Counter(f["name"] for f in files if f["decision"] != "duplicate")
        assert firsts == Counter(written), "each file has exactly one decision besides duplicates"
        assert {f["decision"] for f in files} <= {"accepted", "duplicate"}
        # And work flows again: a file written after the outage becomes a finished job.
        after = set(writer.written[after_from:])
        wait_for(lambda: finished() & after, timeout=60, what="a job of a file written after the outage to finish")
    finally:
        writer.stop()
        stack.stop()
