"""Freshness under overload: p3s against a plain FIFO queue, same workers, same arrivals.

Usage::

    python bench/freshness.py [--seconds 60] [--workers 2] [--task-s 0.5] [--budget-s 10] [--json FILE]

Arrivals come at twice what the workers can run (``2 * workers / task_s`` per
second) for ``--seconds``.  Each file needs one task that sleeps ``task_s``.

* **p3s**: the real dispatcher and pilots (threads of this process) on a fresh
  RabbitMQ vhost and PostgreSQL database; the node says ``expected_s = task_s``,
  so pilots refuse a task whose time left cannot cover its run.
* **FIFO**: a plain durable RabbitMQ queue and the same number of worker
  threads that run every task in arrival order, with no deadline at all.

For both: the share of the workers' capacity (``seconds * workers / task_s``
files) whose result was ready within the budget, and the worker-seconds spent
on tasks that started after their deadline (wasted: their result is stale
before it exists).  Run by hand; never part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    dump_json,
    graphml,
    interrupt_on_sigterm,
    p3s_environ,
    prepare_database,
    scratch_database,
    scratch_vhost,
)


def arrivals(seconds: float, rate: float) -> list[float]:
    """Offsets of a steady arrival stream."""
    return [i / rate for i in range(int(seconds * rate))]


def run_p3s(args: argparse.Namespace, plan: list[float]) -> dict[str, Any]:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from p3s import app, db
    from p3s.broker import Publisher
    from p3s.config import load_settings
    from p3s.messages import DataEvent
    from p3s.topology import events_exchange, events_queue, invalid_queue
    from p3s.watcher.service import event_message

    template = graphml(
        # No expected_s: the dispatcher learns the stage's p95 run time from finished jobs.
        {"dqm": {"command": f"sleep {args.task_s}", "wall_s": "60"}},
        budget_s=args.budget_s,
        name="fresh",
    )
    with scratch_vhost("bench-fresh") as broker_url, scratch_database("bench_fresh") as database_url, \
            tempfile.TemporaryDirectory() as tmp:
        environ = p3s_environ(broker_url, database_url, Path(tmp), "WARNING")
        environ["P3S_DISPATCHER_REAP_INTERVAL_S"] = "1"
        environ["P3S_BROKER_MAX_QUEUE_LENGTH"] = str(args.max_queue)
        settings = load_settings(None, environ)
        prepare_database(database_url, template, "fresh")
        group = app.build_group(settings, [], args.workers)
        group.start()
        publisher = Publisher(settings.broker, exchanges=[events_exchange], queues=[invalid_queue, events_queue])
        start = time.time()
        for i, offset in enumerate(plan):
            delay = start + offset - time.time()
            if delay > 0:
                time.sleep(delay)
            now = time.time()
            publisher.publish([event_message(DataEvent(f"f{i:06d}.dat", f"/data/f{i:06d}.dat", "raw", now))])
        publisher.close()
        engine = db.make_engine(settings.database_url)
        end = time.time() + args.budget_s + 30
        while time.time() < end:
            with Session(engine) as s:
                active = s.scalar(select(func.count()).select_from(db.Job).where(
                    db.Job.state.in_(["pending", "queued", "running"])))
            if not active:
                break
            time.sleep(0.5)
        group.stop()
        group.join(30)
        with Session(engine) as s:
            rows = s.execute(select(db.Job.state, db.Job.started_at, db.Job.ended_at, db.Job.deadline,
                                    db.Workflow.seen_at).join(db.Workflow)).all()
        engine.dispose()
    on_time = sum(1 for st, _s, e, dl, _seen in rows if st == "finished" and e is not None and e <= dl)
    wasted = sum((e - s_) for st, s_, e, dl, _seen in rows if s_ is not None and e is not None and s_ > dl)
    states: dict[str, int] = {}
    for st, *_ in rows:
        states[st] = states.get(st, 0) + 1
    return {"on_time": on_time, "wasted_worker_s": wasted, "states": states, "files": len(rows)}


def run_fifo(args: argparse.Namespace, plan: list[float]) -> dict[str, Any]:
    from kombu import Connection, Consumer, Exchange, Producer, Queue

    results: list[tuple[float, float, float]] = []  # (seen, started, ended)
    lock = threading.Lock()
    stop = threading.Event()
    with scratch_vhost("bench-fifo") as url:
        exchange = Exchange("fifo", "direct", durable=True)
        queue = Queue("fifo", exchange, routing_key="fifo", durable=True)

        def worker() -> None:
            with Connection(url) as conn:
                channel = conn.channel()
                channel.basic_qos(0, 1, False)

                def on_message(message: Any) -> None:
                    seen = float(message.body)
                    started = time.time()
                    subprocess.run(["sleep", str(args.task_s)], check=False)
                    ended = time.time()
                    message.ack()
                    with lock:
                        results.append((seen, started, ended))

                with Consumer(channel, queues=[queue], on_message=on_message):
                    while not stop.is_set():
                        try:
                            conn.drain_events(timeout=0.5)
                        except TimeoutError:
                            continue

        with Connection(url) as conn:
            queue(conn.default_channel).declare()
            producer = Producer(conn.default_channel)
            threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
            for t in threads:
                t.start()
            start = time.time()
            for offset in plan:
                delay = start + offset - time.time()
                if delay > 0:
                    time.sleep(delay)
                producer.publish(repr(time.time()).encode(), exchange=exchange, routing_key="fifo")
            # Give the FIFO the same grace as p3s: results later than that are worthless anyway.
            end = time.time() + args.budget_s + 30
            while time.time() < end and len(results) < len(plan):
                time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(10)
    on_time = sum(1 for seen, _s, e in results if e - seen <= args.budget_s)
    wasted = sum(e - s for seen, s, e in results if s - seen > args.budget_s)
    return {"on_time": on_time, "wasted_worker_s": wasted, "ran": len(results), "files": len(plan)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--task-s", type=float, default=0.5)
    parser.add_argument("--budget-s", type=float, default=10.0)
    parser.add_argument("--max-queue", type=int, default=-1,
                        help="p3s task queue bound (drop-head); default: capacity x budget / 2; 0: unbounded")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.max_queue < 0:
        # Half the budget's worth of work: a task then waits at most ~budget/2,
        # leaving the other half for its run and the report.
        args.max_queue = max(1, int(args.workers / args.task_s * args.budget_s / 2))
    interrupt_on_sigterm()
    os.environ.setdefault("P3S_LOG_LEVEL", "WARNING")
    capacity_rate = args.workers / args.task_s
    plan = arrivals(args.seconds, 2 * capacity_rate)
    capacity = int(args.seconds * capacity_rate)
    print(f"arrivals: {len(plan)} files in {args.seconds:g}s ({2 * capacity_rate:g}/s, twice the capacity); "
          f"capacity {capacity} tasks; budget {args.budget_s:g}s; p3s task queue bound {args.max_queue or 'none'}")
    out: dict[str, Any] = {"arrivals": len(plan), "capacity": capacity, "budget_s": args.budget_s,
                           "max_queue": args.max_queue}
    for name, fn in (("fifo", run_fifo), ("p3s", run_p3s)):
        res = fn(args, plan)
        res["share_of_capacity_on_time"] = res["on_time"] / capacity
        out[name] = res
        print(f"{name:5s} on time {res['on_time']:4d} = {100 * res['share_of_capacity_on_time']:5.1f}% of capacity; "
              f"worker-seconds on tasks started late: {res['wasted_worker_s']:.1f}  {res.get('states', '')}")
    if args.json:
        dump_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
