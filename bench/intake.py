"""Intake rate: data events in, workflows created and root tasks enqueued, no pilots.

Goal stated by the project: at least 1000 files/s.

On the local RabbitMQ (a fresh vhost) and PostgreSQL (a fresh database), imports
a 4-node diamond template (a -> b, a -> c, b + c -> d), starts the dispatcher
(``--mode processes``: ``python -m p3s dispatcher``, the default; ``--mode
threads``: a thread of this process), sends one warm-up event and waits for it,
then publishes ``--events`` distinct data events at once to the p3s.events
exchange with :class:`p3s.broker.Publisher` (confirmed, in batches of
``--publish-batch`` like the watcher), and measures the time from the first
publish until every workflow exists in the database and every root task is in
p3s.tasks.default (passive queue declare, :func:`p3s.broker.queue_depth`).

The floor is measured in the same run, before the dispatcher starts: PostgreSQL
inserting ``--events`` rows in one transaction (psycopg executemany) and one-row
transactions, and kombu publishing ``--events`` persistent messages without
confirms.  Afterwards the dispatcher's batches are read back from the database
(every file of one batch has the same ``received_at``): their count, size and
the time each took.

With ``--dispatchers N`` (N > 1, processes only) the same measurement runs
twice in one invocation, each on a fresh vhost and database: once with one
dispatcher and once with N ``python -m p3s dispatcher`` processes sharing the
database and the events queue; the two are printed side by side, with the
CPU seconds the dispatchers used (from /proc, before they are stopped).

Usage::

    python bench/intake.py                      # 10 000 events, dispatcher in a child process
    python bench/intake.py --dispatchers 2      # one, then two dispatchers, in the same run
    python bench/intake.py --row-sizes          # and PostgreSQL's bytes per file, workflow and job row
    python bench/intake.py --reports 30000      # and how fast pilots' heartbeats are recorded
    python bench/intake.py --mode threads --events 5000 --json out.json

Run by hand only; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TEMPLATE = "bench_diamond"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["threads", "processes"], default="processes",
                   help="dispatcher as python -m p3s dispatcher (default) or in a thread of this process")
    p.add_argument("--events", type=int, default=10_000, help="data events published at once (default 10000)")
    p.add_argument("--dispatchers", type=int, default=1,
                   help="also measure with this many dispatcher processes, after one (default 1: one only)")
    p.add_argument("--reports", type=int, default=0,
                   help="after the events, also publish this many pilot heartbeats (from --report-pilots pilots) and"
                        " time their recording (default 0: none)")
    p.add_argument("--report-pilots", type=int, default=300, help="pilots the heartbeats come from (default 300)")
    p.add_argument("--row-sizes", action="store_true",
                   help="after the one-dispatcher run, give the rows production-shaped values (ProtoDUNE-like names"
                        " and paths, every job finished) and print PostgreSQL's bytes per file, workflow and job row")
    p.add_argument("--publish-batch", type=int, default=500, help="events per confirmed publish (default 500)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the dispatcher (default 300)")
    p.add_argument("--log-level", default="WARNING", help="p3s log level (default WARNING)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE ('-': stdout)")
    args = p.parse_args(argv)
    if args.dispatchers < 1:
        p.error("--dispatchers must be at least 1")
    if args.dispatchers > 1 and args.mode != "processes":
        p.error("--dispatchers above 1 needs --mode processes (dispatchers share a database, not a process)")
    return args


def diamond() -> str:
    nodes = {n: {"command": "/bin/true", "wall_s": "60"} for n in "abcd"}
    return common.graphml(nodes, [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")], name=TEMPLATE)


def events(prefix: str, count: int) -> list[Any]:
    from p3s.messages import DataEvent
    from p3s.watcher.service import event_message

    now = time.time()
    return [
        event_message(DataEvent(name=f"{prefix}{i:06d}.dat", path=f"/data/{prefix}{i:06d}.dat", stream="raw",
                                seen_at=now, source="bench", size=1024))
        for i in range(count)
    ]


class Progress:
    """Workflows in the database and tasks in p3s.tasks.default, asked together."""

    def __init__(self, settings: Any, engine: Any) -> None:
        from p3s import broker

        self.engine = engine
        self.connection = broker.ensure_connected(broker.connect(settings.broker))

    def counts(self) -> tuple[int, int]:
        from sqlalchemy import text

        from p3s import broker, topology

        with self.engine.connect() as conn:
            workflows = conn.execute(text("SELECT count(*) FROM workflows")).scalar_one()
        return workflows, broker.queue_depth(self.connection, topology.task_queue("default"))

    def consumers(self) -> int:
        """Consumers on p3s.dispatcher.events: one per running dispatcher."""
        from p3s import topology

        channel = self.connection.channel()
        try:
            return topology.events_queue(channel).queue_declare(passive=True).consumer_count
        except Exception:  # not declared yet: no consumer
            return 0
        finally:
            try:
                channel.close()
            except Exception:
                pass

    def close(self) -> None:
        self.connection.release()


def wait_counts(progress: Progress, target: int, timeout: float, check: Any, t0: float) -> tuple[float, float]:
    """Seconds after ``t0`` when workflows, then tasks, first reached ``target``."""
    t_wf = t_tasks = float("nan")
    end = time.perf_counter() + timeout
    while True:
        workflows, tasks = progress.counts()
        now = time.perf_counter() - t0
        if workflows >= target and t_wf != t_wf:
            t_wf = now
        if tasks >= target and t_tasks != t_tasks:
            t_tasks = now
        if t_wf == t_wf and t_tasks == t_tasks:
            return t_wf, t_tasks
        check()
        if time.perf_counter() > end:
            raise RuntimeError(f"timed out: {workflows} workflows and {tasks} tasks of {target}")
        time.sleep(0.02)


def batches(engine: Any, prefix: str) -> dict[str, float]:
    """The dispatcher's batches, from the received_at that all files of one batch share."""
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT received_at, count(*) FROM files WHERE name LIKE :p GROUP BY received_at ORDER BY received_at"
        ), {"p": prefix + "%"}).all()
    sizes = [n for _t, n in rows]
    gaps = [b[0] - a[0] for a, b in zip(rows, rows[1:], strict=False)]
    return {
        "batches": len(rows),
        "mean_size": sum(sizes) / len(sizes) if sizes else 0,
        "max_size": max(sizes) if sizes else 0,
        "mean_ms_per_batch": 1000 * sum(gaps) / len(gaps) if gaps else float("nan"),
        "ms_per_event_in_batches": 1000 * sum(gaps) / sum(sizes[:-1]) if gaps else float("nan"),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc), nan if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def heartbeats(count: int, pilots: int) -> tuple[list[Any], float]:
    """``count`` heartbeats, round robin from ``pilots`` pilot ids; the sent_at of each pilot's last one."""
    from p3s import topology
    from p3s.broker import Outgoing
    from p3s.messages import PilotReport, encode

    t0 = time.time()
    out = []
    for i in range(count):
        report = PilotReport(pilot_id=f"bench-pilot-{i % pilots:04d}", event="heartbeat", host="bench",
                             pid=1000 + i % pilots,
                             queues=["default"], state="idle", sent_at=t0 + i * 1e-5)
        out.append(Outgoing(topology.status_exchange, topology.status_routing_key("pilot", "heartbeat"), encode(report)))
    return out, t0 + (count - pilots) * 1e-5


def status_reports(args: argparse.Namespace, publisher: Any, engine: Any, check: Any, pids: list[int]) -> dict[str, Any]:
    """Publish --reports heartbeats at once; seconds and dispatcher CPU until every pilot's last one is recorded."""
    from sqlalchemy import text

    messages, last = heartbeats(args.reports, args.report_pilots)
    before = [cpu_seconds(pid) for pid in pids]
    t0 = time.perf_counter()
    for i in range(0, len(messages), args.publish_batch):
        publisher.publish(messages[i : i + args.publish_batch])
    end = time.perf_counter() + args.timeout
    while True:
        with engine.connect() as conn:
            done = conn.execute(text("SELECT count(*) FROM pilots WHERE last_sent_at >= :t"), {"t": last}).scalar_one()
        if done >= args.report_pilots:
            break
        check()
        if time.perf_counter() > end:
            raise RuntimeError(f"timed out: {done} of {args.report_pilots} pilots have their last heartbeat recorded")
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    cpu = sum(cpu_seconds(pid) for pid in pids) - sum(before)
    return {"reports": args.reports, "pilots": args.report_pilots, "seconds": seconds,
            "per_s": args.reports / seconds, "dispatcher_cpu_s": cpu,
            "per_cpu_s": args.reports / cpu if cpu > 0 else float("nan")}


def floor(args: argparse.Namespace, broker_url: str, database_url: str) -> dict[str, float]:
    """The servers' own rates on this run's scratch vhost and database, before any dispatcher starts."""
    pg_rows_s, pg_one_s = common.pg_insert_rate(database_url, args.events)
    pub_loop, pub_stored = common.publish_rate(broker_url, args.events)
    return {
        "pg_rows_per_s_one_txn": pg_rows_s,
        "pg_one_row_txn_ms": 1000 * pg_one_s,
        "publish_no_confirm_loop_per_s": pub_loop,
        "publish_no_confirm_stored_per_s": pub_stored,
    }


def measure(args: argparse.Namespace, broker_url: str, database_url: str, tmp: Path,
            dispatchers: int = 1) -> dict[str, Any]:
    from p3s import app, db
    from p3s.broker import Publisher
    from p3s.config import load_settings

    env = common.p3s_environ(broker_url, database_url, tmp, args.log_level)
    settings = load_settings(None, env)
    common.prepare_database(database_url, diamond(), TEMPLATE)

    engine = db.make_engine(database_url)
    children: common.Children | None = None
    group: Any = None
    progress = Progress(settings, engine)
    publisher = Publisher(settings.broker, exchanges=[])
    cpu_before: list[float] = []
    cpu_after: list[float] = []
    try:
        if args.mode == "processes":
            children = common.Children(env, tmp)
            for i in range(dispatchers):
                children.start(f"dispatcher-{i}", "dispatcher")
            check = children.check
        else:
            group = app.Group(dispatcher=app.make_dispatcher(settings))
            group.start()

            def check() -> None:
                if group.errors:
                    raise RuntimeError(f"the dispatcher stopped: {group.errors[0]!r}")

        end = time.monotonic() + 60
        while progress.consumers() < dispatchers:
            check()
            if time.monotonic() > end:
                raise RuntimeError(f"{dispatchers} dispatcher(s) did not start consuming")
            time.sleep(0.1)
        # Warm-up: opens the publishers' connections and fills the template cache
        # (of every dispatcher: one event each is not guaranteed, so a few).
        publisher.publish(events("warm-", 2 * dispatchers))
        wait_counts(progress, 2 * dispatchers, 60, check, time.perf_counter())

        pids = [proc.pid for _label, proc, _log in children.procs] if children is not None else [os.getpid()]
        cpu_before = [cpu_seconds(pid) for pid in pids]
        messages = events("intake-", args.events)
        t0 = time.perf_counter()
        for i in range(0, len(messages), args.publish_batch):
            publisher.publish(messages[i : i + args.publish_batch])
        t_published = time.perf_counter() - t0
        t_wf, t_tasks = wait_counts(progress, args.events + 2 * dispatchers, args.timeout, check, t0)
        cpu_after = [cpu_seconds(pid) for pid in pids]
        shape = batches(engine, "intake-")
        reports = status_reports(args, publisher, engine, check, pids) if args.reports else {}
    finally:
        publisher.close()
        progress.close()
        if children is not None:
            children.stop()
        if group is not None:
            group.stop()
            group.join(15)
            group.dispatcher.engine.dispose()
        engine.dispose()
    t_done = max(t_wf, t_tasks)
    cpu = [b - a for a, b in zip(cpu_before, cpu_after, strict=True)]
    return {
        "mode": args.mode,
        "dispatchers": dispatchers,
        "events": args.events,
        "published_s": t_published,
        "publish_rate": args.events / t_published,
        "workflows_s": t_wf,
        "tasks_s": t_tasks,
        "done_s": t_done,
        "files_per_s": args.events / t_done,
        # In threads mode this is the whole benchmark process, publisher and poller included.
        "dispatcher_cpu_s": cpu,
        "files_per_cpu_s": args.events / sum(cpu) if cpu and sum(cpu) > 0 else float("nan"),
        "dispatcher_batches": shape,
        "status_reports": reports,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


#: ProtoDUNE-HD-like raw file names and EOS paths, for --row-sizes (lengths are what matters: 78 and 180).
RAW_NAME = "'np04hd_raw_run' || lpad(id::text, 6, '0') || '_0001_dataflow0_datawriter_0_20261202T064014.hdf5'"
RAW_DIR = "/eos/experiment/neutplatform/protodune/dune/hd-protodune/raw/2026/detector/physics/None/00/02/78/05/"
SIZED = ("files", "workflows", "jobs")


def row_sizes(database_url: str) -> dict[str, dict[str, float]]:
    """Bytes per row (heap, TOAST and every index: pg_total_relation_size) once the records look like production's.

    Each job row is updated as a pilot's reports would (pilot, log path,
    times, exit code, token hash); "bloated" is measured right after those
    updates (dead row versions not yet reclaimed), "packed" after VACUUM FULL.
    A table under autovacuum settles between the two.
    """
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"UPDATE files SET name = {RAW_NAME}, dedup_key = {RAW_NAME}, path = '{RAW_DIR}' || {RAW_NAME},"
                     " size = 4000000000, source = 'eos-poll'")
        conn.execute("UPDATE workflows SET state = 'finished', ended_at = created_at + 60")
        conn.execute(
            "UPDATE jobs SET state = 'finished', pilot_id = 'np04-wn-' || lpad((id % 300)::text, 3, '0')"
            " || '.cern.ch-' || (100000 + id % 899999) || '-7f067e', exit_code = 0,"
            " log = '/eos/experiment/neutplatform/protodune/p3s/logs/' || workflow_id || '/' || node || '.log',"
            " queued_at = created_at, published_at = created_at + 0.01, started_at = created_at + 1,"
            " ended_at = created_at + 30, token_hash = md5(id::text) || md5(workflow_id::text)"
        )
        out: dict[str, dict[str, float]] = {}
        for phase in ("bloated", "packed"):
            if phase == "packed":
                conn.execute("VACUUM FULL ANALYZE " + ", ".join(SIZED))
            for table in SIZED:
                rows, size = conn.execute(
                    f"SELECT count(*), pg_total_relation_size('{table}') FROM {table}").fetchone()  # type: ignore[misc]
                out.setdefault(table, {"rows": rows})[f"{phase}_bytes_per_row"] = size / max(rows, 1)
    return out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """One dispatcher, then ``--dispatchers`` of them, each on a scratch vhost and database of its own."""
    runs: dict[int, dict[str, Any]] = {}
    first_floor: dict[str, float] = {}
    sizes: dict[str, dict[str, float]] = {}
    for n in sorted({1, args.dispatchers}):
        with (
            common.scratch_vhost("p3s-bench-intake") as broker_url,
            common.scratch_database("p3s_bench_intake") as database_url,
            tempfile.TemporaryDirectory(prefix="p3s-bench-intake-") as tmp,
        ):
            if not first_floor:
                first_floor = floor(args, broker_url, database_url)
            runs[n] = measure(args, broker_url, database_url, Path(tmp), n)
            if n == 1 and args.row_sizes:
                sizes = row_sizes(database_url)
    # The first run's figures stay at the top level, as before --dispatchers.
    out = {**runs[1], "floor": first_floor, "by_dispatchers": {str(n): r for n, r in runs.items()}}
    if args.row_sizes:
        out["row_sizes"] = sizes
    return out


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    where = "child processes (python -m p3s dispatcher)" if args.mode == "processes" else "a thread of this process"
    runs = [r["by_dispatchers"][k] for k in sorted(r["by_dispatchers"], key=int)]
    f = r["floor"]
    print(f"p3s intake: {r['events']} data events at once, 4-node diamond, no pilots, dispatchers in {where}")
    print(f"  {'':44s}" + "".join(f"{str(x['dispatchers']) + ' dispatcher' + ('s' if x['dispatchers'] > 1 else ''):>16s}"
                                  for x in runs))

    def row(label: str, values: list[str]) -> None:
        print(f"  {label:44s}" + "".join(f"{v:>16s}" for v in values))

    row(f"published (confirmed, batches of {args.publish_batch}), s", [f"{x['published_s']:.2f}" for x in runs])
    row("all workflows in the database, s", [f"{x['workflows_s']:.2f}" for x in runs])
    row("all root tasks in p3s.tasks.default, s", [f"{x['tasks_s']:.2f}" for x in runs])
    row("intake rate, files/s (goal >= 1000)", [f"{x['files_per_s']:.0f}" for x in runs])
    row("dispatcher CPU, s (each)", [" + ".join(f"{c:.1f}" for c in x["dispatcher_cpu_s"]) for x in runs])
    row("files per dispatcher CPU second", [f"{x['files_per_cpu_s']:.0f}" for x in runs])
    row("dispatcher batches", [str(x["dispatcher_batches"]["batches"]) for x in runs])
    row("mean batch size (max)", [f"{x['dispatcher_batches']['mean_size']:.0f} ({x['dispatcher_batches']['max_size']})"
                                  for x in runs])
    if args.reports:
        row(f"{args.reports} heartbeats of {args.report_pilots} pilots, s",
            [f"{x['status_reports']['seconds']:.2f}" for x in runs])
        row("  recorded per second", [f"{x['status_reports']['per_s']:.0f}" for x in runs])
        row("  per dispatcher CPU second", [f"{x['status_reports']['per_cpu_s']:.0f}" for x in runs])
    row("ms per batch, ms per event in batches", [
        f"{x['dispatcher_batches']['mean_ms_per_batch']:.0f}, {x['dispatcher_batches']['ms_per_event_in_batches']:.2f}"
        for x in runs])
    print("floor, same run (before the first dispatcher started):")
    print(f"  PostgreSQL, {r['events']} rows in one transaction {f['pg_rows_per_s_one_txn']:8.0f} rows/s")
    print(f"  PostgreSQL, one-row transaction        {f['pg_one_row_txn_ms']:8.2f} ms")
    print(f"  kombu publish without confirms, loop   {f['publish_no_confirm_loop_per_s']:8.0f} msg/s")
    print(f"  ... until all are in the queue         {f['publish_no_confirm_stored_per_s']:8.0f} msg/s")


def report_sizes(sizes: dict[str, dict[str, float]]) -> None:
    print("PostgreSQL bytes per row, production-shaped (pg_total_relation_size: heap, TOAST, indexes):")
    for table, s in sizes.items():
        print(f"  {table:10s} {int(s['rows']):7d} rows   {s['packed_bytes_per_row']:6.0f} packed   "
              f"{s['bloated_bytes_per_row']:6.0f} right after the jobs' updates")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(threadName)s %(levelname)s %(message)s")
    common.interrupt_on_sigterm()
    try:
        r = run_all(args)
    except KeyboardInterrupt:
        print("interrupted; scratch vhost and database removed", file=sys.stderr)
        return 130
    report(args, r)
    if "row_sizes" in r:
        report_sizes(r["row_sizes"])
    if args.json:
        common.dump_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
