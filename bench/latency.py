"""Latency from "file closed" to "payload started", through watcher, dispatcher and pilots.

Goal stated by the project: p50 <= 10 ms and p99 <= 50 ms on a 2-core machine.

Runs the dispatcher, the watcher (inotify on a temporary directory) and
``--pilots`` pilots against the local RabbitMQ (a fresh vhost) and PostgreSQL
(a fresh database), imports a one-node template running ``/bin/true``, writes
``--files`` files at ``--rate`` files/s into the watched directory, and for each
file takes ``started_at`` of its job (stamped by the pilot right after the
payload process started) minus the time.time() the writer took right after
closing the file.  Warm-up files (``--warmup``) open the connections first and
are not counted.

``--mode threads`` runs every part in threads of this process (as ``p3s run``
does; they share the GIL, and the writer too); ``--mode processes`` runs
``python -m p3s dispatcher``, ``python -m p3s watcher --watch DIR`` and
``python -m p3s pilot`` as child processes (as in production).

The floor is measured in the same run, before and after the pipeline: a plain
kombu publish -> consume -> ack + reply -> consume round trip on the same
broker, against a thread (threads mode) or another process (processes mode).

The breakdown uses the database's own stamps: ``files.seen_at`` (watcher read
the inotify event) and ``files.received_at`` (= ``jobs.queued_at``: the
dispatcher started recording the batch).  In threads mode the benchmark also
wraps, without changing p3s, the dispatcher's task publisher (stamp after the
confirms), the pilot's message callback and the pilot's ``_execute``.

Usage::

    python bench/latency.py                      # threads, 500 files at 20/s, 2 pilots
    python bench/latency.py --mode processes --json out.json
    python bench/latency.py --files 200 --rate 50 --pilots 1

Run by hand only; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TEMPLATE = "bench_latency"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["threads", "processes"], default="threads",
                   help="parts in threads of this process, or python -m p3s child processes (default threads)")
    p.add_argument("--files", type=int, default=500, help="files measured (default 500)")
    p.add_argument("--rate", type=float, default=20.0, help="files written per second (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="files written and waited for first, not counted (default 5)")
    p.add_argument("--pilots", type=int, default=2, help="pilots (default 2)")
    p.add_argument("--command", default="/bin/true", help="the payload (default /bin/true)")
    p.add_argument("--floor", type=int, default=500, help="AMQP round trips for the floor, before and after (500)")
    p.add_argument("--size", type=int, default=1024, help="bytes per file (default 1024)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the last payloads (default 60)")
    p.add_argument("--log-level", default="WARNING", help="p3s log level (default WARNING)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE ('-': stdout)")
    return p.parse_args(argv)


# -- the pipeline -----------------------------------------------------------------


class Marks:
    """Wall-clock stamps per job id, taken by wrappers around p3s methods (threads mode only)."""

    def __init__(self) -> None:
        self.committed: dict[int, float] = {}  # the dispatcher's publish() called: batch committed
        self.delivered: dict[int, float] = {}  # the pilot's message callback entered
        self.execute: dict[int, float] = {}  # the pilot's _execute entered
        self.dispatcher_publish: list[float] = []  # seconds per task publish + confirms
        self.pilot_publish: list[float] = []  # seconds per report publish + confirm

    def instrument(self, group: Any) -> None:
        dispatcher_publish = group.dispatcher.publisher.publish

        def publish(messages: Any) -> int:
            batch = list(messages)
            t = time.time()
            for m in batch:
                job_id = m.headers.get("p3s-job-id")
                if job_id is not None:
                    self.committed[int(job_id)] = t
            n = dispatcher_publish(batch)
            self.dispatcher_publish.append(time.time() - t)
            return n

        group.dispatcher.publisher.publish = publish
        for pilot in group.pilots:
            self._wrap_pilot(pilot)

    def _wrap_pilot(self, pilot: Any) -> None:
        on_task, execute, pilot_publish = pilot._on_task, pilot._execute, pilot.publisher.publish

        def _on_task(message: Any) -> None:
            t = time.time()
            job_id = (getattr(message, "headers", None) or {}).get("p3s-job-id")
            on_task(message)
            if job_id is not None:
                self.delivered[int(job_id)] = t

        def _execute(task: Any) -> None:
            self.execute[task.job_id] = time.time()
            execute(task)

        def publish(messages: Any) -> int:
            t = time.perf_counter()
            n = pilot_publish(messages)
            self.pilot_publish.append(time.perf_counter() - t)
            return n

        pilot._on_task, pilot._execute, pilot.publisher.publish = _on_task, _execute, publish


class Pipeline:
    """Watcher, dispatcher and pilots, in threads or in child processes."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], watch: Path, log_dir: Path) -> None:
        self.args, self.env, self.watch, self.log_dir = args, env, watch, log_dir
        self.group: Any = None
        self.children: common.Children | None = None
        self.marks = Marks()

    def start(self) -> None:
        if self.args.mode == "threads":
            from p3s import app
            from p3s.config import SourceSettings, load_settings

            settings = load_settings(None, self.env)
            sources = [SourceSettings(name="bench", location=str(self.watch), pattern="*")]
            self.group = app.build_group(settings, sources, self.args.pilots, reload_settings=None)
            self.marks.instrument(self.group)
            self.group.start()
        else:
            self.children = common.Children(self.env, self.log_dir)
            self.children.start("dispatcher", "dispatcher")
            for i in range(self.args.pilots):
                self.children.start(f"pilot{i}", "pilot")
            self.children.start("watcher", "watcher", "--watch", str(self.watch))

    def check(self) -> None:
        if self.children is not None:
            self.children.check()
        elif self.group is not None and self.group.errors:
            raise RuntimeError(f"a part stopped: {self.group.errors[0]!r}")

    def stop(self) -> None:
        if self.group is not None:
            self.group.stop()
            self.group.join(15)
            self.group.dispatcher.engine.dispose()
            self.group = None
        if self.children is not None:
            self.children.stop()
            self.children = None


# -- measuring --------------------------------------------------------------------


def query_rows(engine: Any, prefix: str) -> dict[str, dict[str, Any]]:
    from sqlalchemy import text

    sql = text(
        "SELECT f.name, f.seen_at, f.received_at, j.id AS job_id, j.queued_at, j.started_at, j.state"
        " FROM files f JOIN workflows w ON w.file_id = f.id JOIN jobs j ON j.workflow_id = w.id"
        " WHERE f.name LIKE :prefix"
    )
    with engine.connect() as conn:
        return {r.name: dict(r._mapping) for r in conn.execute(sql, {"prefix": prefix + "%"})}


def count_started(engine: Any, prefix: str) -> int:
    return sum(1 for r in query_rows(engine, prefix).values() if r["started_at"] is not None)


def wait_until(predicate: Any, timeout: float, what: str, pipeline: Pipeline) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        pipeline.check()
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def write_files(directory: Path, prefix: str, count: int, rate: float, size: int) -> dict[str, float]:
    """Write ``count`` files at a steady ``rate``; the time.time() right after each close, by name."""
    closed: dict[str, float] = {}
    payload = b"\0" * size
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        name = f"{prefix}{i:05d}.dat"
        with open(directory / name, "wb") as f:
            f.write(payload)
        closed[name] = time.time()
    return closed


def measure(args: argparse.Namespace, broker_url: str, database_url: str, tmp: Path) -> dict[str, Any]:
    from p3s import db

    in_process = args.mode == "threads"
    watch = tmp / "watch"
    watch.mkdir()
    env = common.p3s_environ(broker_url, database_url, tmp, args.log_level)
    xml = common.graphml({"run": {"command": args.command, "wall_s": "60"}}, name=TEMPLATE)
    common.prepare_database(database_url, xml, TEMPLATE)

    floor_before = common.amqp_round_trip(broker_url, args.floor, in_process=in_process)
    engine = db.make_engine(database_url)
    pipeline = Pipeline(args, env, watch, tmp)
    try:
        pipeline.start()

        def pilots_registered() -> bool:
            from sqlalchemy import text

            with engine.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM pilots")).scalar_one() >= args.pilots

        wait_until(pilots_registered, 60, "the pilots to register", pipeline)
        if args.warmup:
            write_files(watch, "warm-", args.warmup, args.rate, args.size)
            wait_until(lambda: count_started(engine, "warm-") >= args.warmup, 60, "the warm-up files", pipeline)
        closed = write_files(watch, "lat-", args.files, args.rate, args.size)
        try:
            wait_until(lambda: count_started(engine, "lat-") >= args.files, args.timeout, "the payloads", pipeline)
        except RuntimeError as exc:
            print(f"warning: {exc}", file=sys.stderr)
        rows = query_rows(engine, "lat-")
    finally:
        pipeline.stop()
        engine.dispose()
    floor_after = common.amqp_round_trip(broker_url, args.floor, in_process=in_process)

    total, watcher, dispatch, rest = [], [], [], []
    to_committed, to_delivered, to_execute, to_started = [], [], [], []
    marks = pipeline.marks
    for name, t_closed in closed.items():
        r = rows.get(name)
        if r is None or r["started_at"] is None:
            continue
        total.append(r["started_at"] - t_closed)
        watcher.append(r["seen_at"] - t_closed)
        dispatch.append(r["received_at"] - r["seen_at"])
        rest.append(r["started_at"] - r["received_at"])
        job = r["job_id"]
        if job in marks.committed and job in marks.delivered and job in marks.execute:
            to_committed.append(marks.committed[job] - r["received_at"])
            to_delivered.append(marks.delivered[job] - marks.committed[job])
            to_execute.append(marks.execute[job] - marks.delivered[job])
            to_started.append(r["started_at"] - marks.execute[job])
    stages = {
        "closed -> seen (watcher read inotify)": common.summary(watcher),
        "seen -> received (event to dispatcher)": common.summary(dispatch),
        "received -> payload started": common.summary(rest),
    }
    if to_committed:
        stages.update({
            "  received -> committed (dispatcher DB)": common.summary(to_committed),
            "  committed -> pilot callback": common.summary(to_delivered),
            "  callback -> pilot _execute": common.summary(to_execute),
            "  _execute -> payload started": common.summary(to_started),
            "dispatcher: task publish + confirm": common.summary(marks.dispatcher_publish),
            "pilot: report publish + confirm": common.summary(marks.pilot_publish),
        })
    return {
        "mode": args.mode,
        "files": args.files,
        "rate": args.rate,
        "pilots": args.pilots,
        "command": args.command,
        "started": len(total),
        "missing": args.files - len(total),
        "latency": common.summary(total),
        "stages": stages,
        "floor_before": common.summary(floor_before),
        "floor_after": common.summary(floor_after),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(threadName)s %(levelname)s %(message)s")
    common.interrupt_on_sigterm()
    try:
        with (
            common.scratch_vhost("p3s-bench-latency") as broker_url,
            common.scratch_database("p3s_bench_latency") as database_url,
            tempfile.TemporaryDirectory(prefix="p3s-bench-latency-") as tmp,
        ):
            result = measure(args, broker_url, database_url, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted; scratch vhost and database removed", file=sys.stderr)
        return 130
    where = "threads of one process" if args.mode == "threads" else "separate processes"
    print(f"p3s latency, file closed -> payload started: {args.files} files at {args.rate:g}/s, "
          f"{args.pilots} pilot(s), {args.command}, parts in {where}")
    print(f"started {result['started']}, missing {result['missing']}")
    common.print_table("latency", {"closed -> payload started": result["latency"], **result["stages"]})
    common.print_table("floor: kombu publish -> consume -> reply round trip", {
        "before the pipeline": result["floor_before"], "after the pipeline": result["floor_after"]})
    if args.json:
        common.dump_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
