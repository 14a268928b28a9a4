"""Running p3s's parts as separate processes, as an operator runs them.

A :class:`Parts` starts ``python -m p3s <command>`` subprocesses with the
P3S_* variables of a test's settings (broker, database, directories) and
short heartbeats, writes each one's output to a file in the test's directory,
and stops them all (SIGTERM, then SIGKILL) when the test ends.  The
subprocesses run the code of the tree the tests come from.  A failed wait
names the parts that died and shows the end of every part's log.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kombu import Connection, Producer
from sqlalchemy.orm import Session

from p3s import db, topology
from p3s.config import Settings
from p3s.dagengine import parse_graphml
from p3s.dispatcher import admin
from tests.stack import env_for

ROOT = Path(__file__).resolve().parent.parent

#: Short intervals, so that a test waits for little.
FAST = {
    "P3S_PILOT_HEARTBEAT_S": "1",
    "P3S_PILOT_KILL_GRACE_S": "1",
    "P3S_DISPATCHER_REAP_INTERVAL_S": "0.5",
    "P3S_LOG_LEVEL": "INFO",
}

#: The start of a log record as ``p3s.cli`` formats it: time, level, logger.
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) ")

#: Log words that mean a part lost a connection or could not publish something.
TROUBLE = ("missed heartbeats", "connection reset", "not published", "connection to broker lost",
           "broker connection lost")


def base_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a p3s subprocess: no P3S_* of ours, the test's settings, ``extra`` last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(env_for(settings))
    env.update(FAST)
    env.update(extra or {})
    return env


class Part:
    """One ``p3s`` daemon in a subprocess; its stdout and stderr go to one log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self._terminated = False
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "p3s", *args], env=env, cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_has(self, text: str) -> bool:
        return text in self.log()

    def records(self) -> list[tuple[str, str]]:
        """The log as (level, text) records; a traceback belongs to the record it follows."""
        out: list[tuple[str, str]] = []
        for line in self.log().splitlines():
            start = RECORD.match(line)
            if start:
                out.append((start.group(1), line))
            elif out:
                out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        return out

    def trouble(self, words: Iterable[str] = TROUBLE) -> list[str]:
        """Records at WARNING or above (their tracebacks included) that contain one of ``words``."""
        words = [w.lower() for w in words]
        return [text for level, text in self.records()
                if level in ("WARNING", "ERROR", "CRITICAL") and any(w in text.lower() for w in words)]

    def terminate(self) -> None:
        """One SIGTERM (a second one would tell a pilot to kill its payloads)."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit status."""
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def describe(self, tail: int = 3000) -> str:
        state = "running" if self.alive() else f"exited {self.proc.returncode}"
        text = self.log()
        return f"--- {self.name} (pid {self.pid}, {state}) {self.log_path}\n{text[-tail:]}"


class Parts:
    """The subprocesses of one test, stopped together at the end."""

    def __init__(self, tmp_path: Path, settings: Settings, **extra: str) -> None:
        self.tmp_path = tmp_path
        self.settings = settings
        self.extra = dict(extra)
        self.started: list[Part] = []
        self.logs = tmp_path / "logs-of-parts"
        self.logs.mkdir(exist_ok=True)
        self._engine: Any = None

    def query(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """Read the test's database in this process (faster than a ``p3s`` command, for polling)."""
        if self._engine is None:
            self._engine = db.make_engine(self.settings.database_url)
        with Session(self._engine) as s:
            return fn(s, **kwargs)

    def db_jobs(self) -> list[dict[str, Any]]:
        return self.query(admin.list_jobs, limit=100000)

    def db_files(self) -> list[dict[str, Any]]:
        return self.query(admin.list_files, limit=100000)

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(self.settings, {**self.extra, **extra})

    def start(self, name: str, *args: str, **extra: str) -> Part:
        """Start ``p3s <args>`` (e.g. ``"dispatcher"`` or ``"watcher", "--watch", DIR``)."""
        n = sum(p.name == name for p in self.started)
        part = Part(name, list(args), self.env(**extra), self.logs / f"{name}-{n}.log")
        self.started.append(part)
        return part

    def run(self, *args: str, timeout: float = 60.0, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run a ``p3s`` command to its end (``audit``, ``files --json`` ...)."""
        return subprocess.run(
            [sys.executable, "-m", "p3s", *args], env=self.env(**extra), cwd=ROOT,
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def json(self, *args: str, **extra: str) -> Any:
        """The parsed output of ``p3s <args> --json``; fails the test if the command fails."""
        done = self.run(*args, "--json", **extra)
        assert done.returncode == 0, f"p3s {' '.join(args)} exited {done.returncode}: {done.stderr[-3000:]}"
        return json.loads(done.stdout)

    def files(self) -> list[dict[str, Any]]:
        return self.json("files", "--limit", "100000")

    def jobs(self, **extra: str) -> list[dict[str, Any]]:
        return self.json("jobs", "--limit", "100000", **extra)

    def audit(self) -> subprocess.CompletedProcess[str]:
        return self.run("audit", "--grace", "1")

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.started)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
                 every: float = 0.2, alive: Iterable[Part] = ()) -> Any:
        """tests.stack.wait_for, with the parts' logs in the failure; fails at once if one of ``alive`` dies."""
        alive = list(alive)
        end = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            dead = [p.name for p in alive if not p.alive()]
            if dead:
                raise AssertionError(f"{', '.join(dead)} died while waiting for {what}\n{self.describe()}")
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.describe()}")
            time.sleep(every)

    def assert_alive(self, *parts: Part) -> None:
        dead = [p for p in parts if not p.alive()]
        assert not dead, "part(s) died: " + ", ".join(p.name for p in dead) + "\n" + self.describe()

    def stop_all(self) -> None:
        """SIGTERM to every part at once, then wait for each (SIGKILL for one that hangs)."""
        for part in self.started:
            part.terminate()
        for part in reversed(self.started):
            part.stop()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> Parts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def import_template(settings: Settings, text: str, name: str = "probe") -> None:
    """Bring the test's database to the current schema and import a GraphML template into it."""
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    try:
        with Session(engine) as s, s.begin():
            admin.import_template(s, parse_graphml(text, name=name))
    finally:
        engine.dispose()


def finished_names(jobs: list[dict[str, Any]]) -> set[str]:
    """Names of the files whose jobs finished, from ``p3s jobs --json`` rows."""
    return {Path(j["file"]).name for j in jobs if j["state"] == "finished"}


# -- raw AMQP, beside the parts --------------------------------------------------------


@contextmanager
def amqp(url: str) -> Iterator[Connection]:
    """A plain kombu connection to ``url``, with the whole topology declared."""
    with Connection(url, connect_timeout=5) as conn:
        topology.declare_all(conn, ["default"])
        yield conn


def publish_raw(conn: Connection, exchange: Any, routing_key: str, bodies: Iterable[bytes]) -> None:
    """Publish bodies exactly as given (no serialisation), persistent, with confirms."""
    channel = conn.channel()
    try:
        channel.confirm_select()
        producer = Producer(channel)
        for body in bodies:
            producer.publish(body, exchange=exchange, routing_key=routing_key, content_type="application/json",
                             content_encoding="utf-8", delivery_mode=2)
    finally:
        channel.close()


def event_body(name: str, path: str, stream: str = "raw", **fields: Any) -> bytes:
    """A data event's JSON body as a watcher writes it, with ``fields`` added or replaced."""
    body = {"v": 1, "name": name, "path": path, "stream": stream, "seen_at": time.time(), "source": "test",
            "size": 1, **fields}
    return json.dumps(body).encode()


class InvalidReader:
    """Reads ``p3s.invalid`` with basic.get and keeps what it took, body and headers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.got: list[tuple[bytes, dict[str, Any]]] = []

    def read(self) -> list[tuple[bytes, dict[str, Any]]]:
        with Connection(self.url, connect_timeout=5) as conn:
            queue = topology.invalid_queue(conn.default_channel)
            while (message := queue.get(no_ack=True)) is not None:
                body = message.body
                # py-amqp decodes a body whose content_encoding it knows.
                raw = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else bytes(body)
                self.got.append((raw, dict(message.headers or {})))
        return self.got

    def find(self, body: bytes) -> dict[str, Any] | None:
        """The headers of ``body`` if it has reached ``p3s.invalid``."""
        for got, headers in self.read():
            if got == body:
                return headers
        return None
