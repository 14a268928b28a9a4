"""Shared pieces of the p3s benchmarks: scratch servers, floors, child processes, statistics.

Not a benchmark by itself.  Every benchmark makes a fresh RabbitMQ vhost and a
fresh PostgreSQL database with :func:`scratch_vhost` and :func:`scratch_database`
and drops them in ``finally`` blocks, also on Ctrl-C and on SIGTERM (turned into
KeyboardInterrupt by :func:`interrupt_on_sigterm`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RABBIT_HOST = os.environ.get("BENCH_RABBIT_HOST", "127.0.0.1:5672")
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


# -- scratch servers ------------------------------------------------------------


def interrupt_on_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C, so ``finally`` blocks drop the scratch vhost and database."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, stdout=subprocess.DEVNULL, timeout=60)


@contextmanager
def scratch_vhost(prefix: str) -> Iterator[str]:
    """A fresh vhost on the local RabbitMQ (guest may use it); yields its AMQP URL, deletes it after."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBIT_HOST}/{quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database; yields its URL, drops it (forcing other sessions out) after."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}".replace("-", "_")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def p3s_environ(broker_url: str, database_url: str, state_dir: Path, log_level: str) -> dict[str, str]:
    """The P3S_* variables for a benchmark's settings, in-process or for child processes."""
    return {
        "P3S_BROKER_URL": broker_url,
        "P3S_DATABASE_URL": database_url,
        "P3S_STATE_DIR": str(state_dir / "state"),
        "P3S_PILOT_WORK_ROOT": str(state_dir / "work"),
        "P3S_LOG_LEVEL": log_level,
    }


def graphml(nodes: Mapping[str, Mapping[str, str]], edges: Sequence[tuple[str, str]] = (), name: str = "bench",
            trigger: str = "*", budget_s: float = 3600) -> str:
    """A GraphML template with string attributes (as tests/stack.py writes them)."""
    keys = sorted({k for attrs in nodes.values() for k in attrs})
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">',
           '<key id="trigger" for="graph" attr.name="trigger" attr.type="string"/>',
           '<key id="budget_s" for="graph" attr.name="budget_s" attr.type="string"/>']
    out += [f'<key id="{k}" for="node" attr.name="{k}" attr.type="string"/>' for k in keys]
    out.append(f'<graph id="{name}" edgedefault="directed">')
    out.append(f'<data key="trigger">{escape(trigger)}</data><data key="budget_s">{budget_s}</data>')
    for node, attrs in nodes.items():
        out.append(f'<node id="{node}">')
        out += [f'<data key="{k}">{escape(v)}</data>' for k, v in attrs.items()]
        out.append("</node>")
    out += [f'<edge source="{a}" target="{b}"/>' for a, b in edges]
    out.append("</graph></graphml>")
    return "\n".join(out)


def prepare_database(database_url: str, template_xml: str, name: str) -> None:
    """Bring the schema to head and import one template, as ``p3s db upgrade; p3s dag import`` would."""
    from sqlalchemy.orm import Session

    from p3s import db
    from p3s.dagengine import parse_graphml
    from p3s.dispatcher import admin

    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        with Session(engine) as s, s.begin():
            admin.import_template(s, parse_graphml(template_xml, name=name))
    finally:
        engine.dispose()


# -- child processes ------------------------------------------------------------


class Children:
    """``python -m p3s ...`` daemons started by a benchmark; stopped by their own Popen objects."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, label: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{label}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "p3s", *args], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=REPO)
        self.procs.append((label, proc, log))
        return proc

    def check(self) -> None:
        for label, proc, log in self.procs:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{label} exited with {proc.returncode}:\n{tail}")

    def stop(self, timeout: float = 15.0) -> None:
        for _label, proc, _log in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for _label, proc, _log in self.procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


# -- floors ---------------------------------------------------------------------


def _echo_server(url: str, queue: str, ready: Any, stop: Any) -> None:
    """Consume ``queue`` (prefetch 1, manual ack) and answer each message to its reply_to."""
    from kombu import Connection, Consumer, Producer, Queue

    with Connection(url) as conn:
        channel = conn.channel()
        producer = Producer(channel)

        def on_message(body: Any, message: Any) -> None:
            producer.publish(body, exchange="", routing_key=message.properties["reply_to"], retry=False)
            message.ack()

        q = Queue(queue, exclusive=False, auto_delete=True)
        with Consumer(channel, queues=[q], callbacks=[on_message], prefetch_count=1, accept=["json"]):
            ready.set()
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass


def amqp_round_trip(url: str, n: int, in_process: bool, warmup: int = 20) -> list[float]:
    """Seconds per publish -> consume -> ack + reply -> consume, ``n`` times, against another thread or process."""
    import multiprocessing

    from kombu import Connection, Consumer, Producer, Queue

    queue = f"bench.echo.{uuid.uuid4().hex[:6]}"
    worker: threading.Thread | multiprocessing.Process
    if in_process:
        ready, stop = threading.Event(), threading.Event()
        worker = threading.Thread(target=_echo_server, args=(url, queue, ready, stop), daemon=True)
    else:
        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        worker = ctx.Process(target=_echo_server, args=(url, queue, ready, stop), daemon=True)
    worker.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the echo server did not start")
        times: list[float] = []
        with Connection(url) as conn:
            channel = conn.channel()
            replies = Queue(f"{queue}.reply", exclusive=True, auto_delete=True)
            got: list[int] = []
            producer = Producer(channel)
            with Consumer(channel, queues=[replies], callbacks=[lambda body, m: (got.append(1), m.ack())],
                          accept=["json"]):
                for i in range(warmup + n):
                    got.clear()
                    t0 = time.perf_counter()
                    producer.publish({"i": i}, exchange="", routing_key=queue, reply_to=replies.name, retry=False)
                    while not got:
                        conn.drain_events(timeout=10)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
        return times
    finally:
        stop.set()
        worker.join(5)


def publish_rate(url: str, n: int, body_size: int = 300) -> tuple[float, float]:
    """Publishing ``n`` persistent messages to a scratch queue without confirms.

    Returns (msg/s of the publish loop alone, msg/s until a passive declare
    counts all ``n`` in the queue, i.e. until RabbitMQ has taken them).
    """
    from kombu import Connection, Producer, Queue

    body = b"x" * body_size
    with Connection(url) as conn:
        channel = conn.channel()
        q = Queue(f"bench.pub.{uuid.uuid4().hex[:6]}", durable=True, auto_delete=False)(channel)
        q.declare()
        producer = Producer(channel)
        t0 = time.perf_counter()
        for _ in range(n):
            producer.publish(body, exchange="", routing_key=q.name, delivery_mode=2, retry=False,
                             content_type="application/json", content_encoding="utf-8")
        loop = time.perf_counter() - t0
        while q.queue_declare(passive=True).message_count < n:
            time.sleep(0.002)
        stored = time.perf_counter() - t0
        q.delete()
    return n / loop, n / stored


def pg_insert_rate(database_url: str, n: int) -> tuple[float, float]:
    """(rows/s for ``n`` rows in one transaction, seconds per one-row transaction) on ``database_url``."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE TABLE bench_floor (id bigserial PRIMARY KEY, name varchar(512) UNIQUE, path text,"
            " stream varchar(128), seen_at float8, received_at float8, decision varchar(16))"
        )
        conn.commit()
        rows = [(f"floor-{i:06d}", f"/data/floor-{i:06d}", "raw", time.time(), time.time(), "accepted")
                for i in range(n)]
        sql = "INSERT INTO bench_floor (name, path, stream, seen_at, received_at, decision) VALUES (%s,%s,%s,%s,%s,%s)"
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            cur.executemany(sql, rows)
        conn.commit()
        batch = n / (time.perf_counter() - t0)
        singles = 200
        t0 = time.perf_counter()
        for i in range(singles):
            conn.execute(sql, (f"single-{i:06d}", "/x", "raw", 0.0, 0.0, "accepted"))
            conn.commit()
        one = (time.perf_counter() - t0) / singles
        conn.execute("DROP TABLE bench_floor")
        conn.commit()
    return batch, one


# -- statistics and output ------------------------------------------------------


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values (nan if empty)."""
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[i]


def summary(values_s: Sequence[float]) -> dict[str, float]:
    """count, p50, p90, p99, max and mean, in milliseconds."""
    v = sorted(values_s)
    out = {"count": float(len(v))}
    for label, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
        out[label] = 1000 * quantile(v, q)
    out["max"] = 1000 * v[-1] if v else float("nan")
    out["mean"] = 1000 * sum(v) / len(v) if v else float("nan")
    return out


def print_table(title: str, rows: Mapping[str, Mapping[str, float]]) -> None:
    """A small fixed-width table of :func:`summary` rows."""
    print(f"\n{title}")
    print(f"  {'':40s} {'count':>6s} {'p50':>8s} {'p90':>8s} {'p99':>8s} {'max':>8s}   (ms)")
    for name, s in rows.items():
        print(f"  {name:40s} {int(s['count']):6d} {s['p50']:8.2f} {s['p90']:8.2f} {s['p99']:8.2f} {s['max']:8.2f}")


def dump_json(path: str, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")
