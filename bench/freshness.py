"""Freshness under overload: p3s against a plain FIFO queue, same workers, same arrivals, four shapes.

Usage::

    python bench/freshness.py [--scenario steady,bursty,lognormal,two] [--seconds 30] [--workers 2]
                              [--task-s 0.5] [--budget-s 10] [--max-queue 0] [--json FILE]

Every scenario arrives on average at twice what the workers can run, for
``--seconds``; each file needs one task that runs ``sh -c 'sleep R'`` (R from
the file's name):

* **steady**: evenly spaced arrivals, every task ``task_s``.
* **bursty**: a run start writes 50 files at once, then a steady trickle for
  60% of a 10 s cycle, then a gap; repeated.
* **lognormal**: steady arrivals; run times log-normal with median ``task_s``
  and a tail ten times longer (p99 = 10 x median); arrivals at twice the
  capacity its mean run time gives.
* **two**: steady arrivals alternating between two templates on one queue,
  with budgets ``budget_s`` and ``3 x budget_s``, the same priority.

* **p3s**: the real dispatcher and pilots (threads of this process) on a fresh
  RabbitMQ vhost and PostgreSQL database, with the shipped defaults (no
  ``max_queue_length`` unless ``--max-queue`` sets one); the nodes give no
  ``expected_s``, so the dispatcher learns the stages' run times.
* **FIFO**: a plain durable RabbitMQ queue and the same number of worker
  threads that run every task in arrival order, with no deadline at all.

For both: the tasks whose result was ready within the budget, as a share of
the workers' capacity (``seconds x workers / mean run time`` tasks) and as a
share of the workers' time (run seconds of on-time results over ``seconds x
workers``); the worker-seconds spent on tasks that started after their
deadline (their result is stale before it exists); and the median time from
a file's arrival to its result.  Run by hand; never part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    dump_json,
    graphml,
    interrupt_on_sigterm,
    p3s_environ,
    prepare_database,
    quantile,
    scratch_database,
    scratch_vhost,
)

SCENARIOS = ("steady", "bursty", "lognormal", "two")
# The payload: sleep for the run time written after the last "_" of the file name.
PAYLOAD = "sh -c 'sleep $(echo \"$1\" | cut -d_ -f2)' sh"
BURST = 50
CYCLE_S = 10.0
TRICKLE_SHARE = 0.6
# p99 of a log-normal is exp(2.326 sigma) times its median.
TAIL_SIGMA = math.log(10) / 2.326


@dataclass(frozen=True)
class Arrival:
    offset: float  # seconds after the start
    name: str  # carries the run time: <template><index>_<run_s>
    template: str
    run_s: float


@dataclass(frozen=True)
class Scenario:
    name: str
    plan: list[Arrival]
    budgets: dict[str, float]  # template -> budget
    mean_run_s: float


def steady(seconds: float, rate: float) -> list[float]:
    """Offsets of a steady arrival stream."""
    return [i / rate for i in range(int(seconds * rate))]


def bursty(seconds: float, rate: float) -> list[float]:
    """A burst of 50 at each cycle's start, a trickle for 60% of it, then a gap; ``rate`` on average."""
    out: list[float] = []
    trickle = max(0, int(round(rate * CYCLE_S)) - BURST)
    cycle = 0
    while cycle * CYCLE_S < seconds:
        t0 = cycle * CYCLE_S
        out += [t0] * BURST
        out += [t0 + (i + 1) * TRICKLE_SHARE * CYCLE_S / (trickle + 1) for i in range(trickle)]
        cycle += 1
    return [t for t in out if t < seconds]


def scenario(name: str, args: argparse.Namespace) -> Scenario:
    rng = random.Random(14)
    capacity_rate = args.workers / args.task_s
    budgets = {"fresh": args.budget_s}
    if name == "lognormal":
        mean = args.task_s * math.exp(TAIL_SIGMA**2 / 2)
        offsets = steady(args.seconds, 2 * args.workers / mean)
        runs = [args.task_s * math.exp(rng.gauss(0, TAIL_SIGMA)) for _ in offsets]
    else:
        offsets = (bursty if name == "bursty" else steady)(args.seconds, 2 * capacity_rate)
        runs = [args.task_s] * len(offsets)
    if name == "two":
        budgets = {"tight": args.budget_s, "loose": 3 * args.budget_s}
    names = sorted(budgets, key=budgets.__getitem__)
    plan = []
    for i, (offset, run) in enumerate(zip(offsets, runs, strict=True)):
        template = names[i % len(names)]
        plan.append(Arrival(offset, f"{template}{i:06d}_{run:.3f}", template, round(run, 3)))
    return Scenario(name, plan, budgets, sum(a.run_s for a in plan) / len(plan))


def paced(plan: list[Arrival]) -> Any:
    """Yield each arrival at its time (a burst: all at once)."""
    start = time.time()
    for arrival in plan:
        delay = start + arrival.offset - time.time()
        if delay > 0:
            time.sleep(delay)
        yield arrival


def figures(sc: Scenario, args: argparse.Namespace, rows: list[tuple[str, float, float | None, float | None, bool]]
            ) -> dict[str, Any]:
    """rows: (template, seen, started, ended, finished) for every file."""
    out: dict[str, Any] = {}
    capacity_s = args.seconds * args.workers
    for template in [*sorted(sc.budgets), "all"]:
        mine = [r for r in rows if template in ("all", r[0])]
        on_time = [r for r in mine if r[4] and r[3] is not None and r[3] - r[1] <= sc.budgets[r[0]]]
        late_starts = [r for r in mine if r[2] is not None and r[3] is not None and r[2] - r[1] > sc.budgets[r[0]]]
        ends = sorted(r[3] - r[1] for r in mine if r[4] and r[3] is not None)
        share_of = len(mine) / len(rows)
        out[template] = {
            "files": len(mine),
            "on_time": len(on_time),
            "share_of_capacity_on_time": len(on_time) / (capacity_s / sc.mean_run_s * share_of),
            "share_of_worker_time_on_time": sum(r[3] - r[2] for r in on_time if r[2] is not None) / capacity_s,
            "wasted_worker_s": sum(r[3] - r[2] for r in late_starts),
            "end_to_arrival_p50_s": quantile(ends, 0.5),
            "ran": len(ends),
        }
    return out


def run_p3s(args: argparse.Namespace, sc: Scenario) -> dict[str, Any]:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from p3s import app, db
    from p3s.broker import Publisher
    from p3s.config import load_settings
    from p3s.dagengine import parse_graphml
    from p3s.dispatcher import admin
    from p3s.messages import DataEvent
    from p3s.topology import events_exchange, events_queue, invalid_queue
    from p3s.watcher.service import event_message

    # No expected_s: the dispatcher learns each stage's run times from its finished jobs.
    templates = {name: graphml({"dqm": {"command": PAYLOAD + " {input_name}", "wall_s": "60"}},
                               budget_s=budget, name=name, trigger=f"{name}*")
                 for name, budget in sc.budgets.items()}
    with scratch_vhost("bench-fresh") as broker_url, scratch_database("bench_fresh") as database_url, \
            tempfile.TemporaryDirectory() as tmp:
        environ = p3s_environ(broker_url, database_url, Path(tmp), "WARNING")
        environ["P3S_DISPATCHER_REAP_INTERVAL_S"] = "1"
        if args.max_queue:
            environ["P3S_BROKER_MAX_QUEUE_LENGTH"] = str(args.max_queue)
        settings = load_settings(None, environ)
        first, *rest = templates
        prepare_database(database_url, templates[first], first)
        engine = db.make_engine(settings.database_url)
        for name in rest:
            with Session(engine) as s, s.begin():
                admin.import_template(s, parse_graphml(templates[name], name=name))
        group = app.build_group(settings, [], args.workers)
        group.start()
        # As the FIFO's workers, p3s's pilots are up before the first file arrives.
        ready = time.time() + 30
        while time.time() < ready:
            with Session(engine) as s:
                if s.scalar(select(func.count()).select_from(db.Pilot).where(db.Pilot.state == "idle")) \
                        >= args.workers:
                    break
            time.sleep(0.2)
        publisher = Publisher(settings.broker, exchanges=[events_exchange], queues=[invalid_queue, events_queue])
        pending: list[Any] = []
        for i, arrival in enumerate(paced(sc.plan)):
            pending.append(event_message(DataEvent(arrival.name, f"/data/{arrival.name}", "raw", time.time())))
            if i + 1 < len(sc.plan) and sc.plan[i + 1].offset == arrival.offset:
                continue  # a burst: published together, as a run start's files are seen together
            publisher.publish(pending)
            pending = []
        publisher.close()
        end = time.time() + max(sc.budgets.values()) + 30
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
            jobs = s.execute(select(db.Job.template, db.Workflow.seen_at, db.Job.started_at, db.Job.ended_at,
                                    db.Job.state).join(db.Workflow)).all()
            reasons = s.execute(select(db.Job.state, db.Job.reason)).all()
        engine.dispose()
    rows = [(t, seen, started, ended, state == "finished") for t, seen, started, ended, state in jobs]
    out = figures(sc, args, rows)
    states: dict[str, int] = {}
    for state, reason in reasons:
        key = f"{state} ({reason.split(':')[0].split(' (')[0]})" if reason else state
        states[key] = states.get(key, 0) + 1
    out["states"] = states
    return out


def run_fifo(args: argparse.Namespace, sc: Scenario) -> dict[str, Any]:
    from kombu import Connection, Consumer, Exchange, Producer, Queue

    results: list[tuple[str, float, float, float]] = []  # (template, seen, started, ended)
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
                    template, name, seen = message.body.decode().split(" ")
                    started = time.time()
                    # The same payload as p3s runs.
                    subprocess.run(["sh", "-c", f"sleep {name.rsplit('_', 1)[1]}"], check=False)
                    ended = time.time()
                    message.ack()
                    with lock:
                        results.append((template, float(seen), started, ended))

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
            for arrival in paced(sc.plan):
                producer.publish(f"{arrival.template} {arrival.name} {time.time()!r}".encode(), exchange=exchange,
                                 routing_key="fifo")
            # Give the FIFO the same grace as p3s: results later than that are worthless anyway.
            end = time.time() + max(sc.budgets.values()) + 30
            while time.time() < end and len(results) < len(sc.plan):
                time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(10)
    rows = [(t, seen, started, ended, True) for t, seen, started, ended in results]
    out = figures(sc, args, rows)
    out["all"]["files"] = len(sc.plan)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=",".join(SCENARIOS), help="comma-separated, of " + ", ".join(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--task-s", type=float, default=0.5)
    parser.add_argument("--budget-s", type=float, default=10.0)
    parser.add_argument("--max-queue", type=int, default=0,
                        help="a hand-set p3s task queue bound (drop-head); default 0: the shipped default, none")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    interrupt_on_sigterm()
    os.environ.setdefault("P3S_LOG_LEVEL", "WARNING")
    out: dict[str, Any] = {"seconds": args.seconds, "workers": args.workers, "max_queue": args.max_queue}
    for name in args.scenario.split(","):
        sc = scenario(name.strip(), args)
        capacity = args.seconds * args.workers / sc.mean_run_s
        print(f"\n{sc.name}: {len(sc.plan)} files in {args.seconds:g}s, mean run {sc.mean_run_s:.3f}s, capacity "
              f"{capacity:.0f} tasks; budgets {sc.budgets}; p3s task queue bound {args.max_queue or 'none'}",
              flush=True)
        res: dict[str, Any] = {"files": len(sc.plan), "capacity": capacity, "budgets": sc.budgets,
                               "mean_run_s": sc.mean_run_s}
        for label, fn in (("fifo", run_fifo), ("p3s", run_p3s)):
            res[label] = fn(args, sc)
            for template, r in res[label].items():
                if template == "states":
                    continue
                print(f"  {label:4s} {template:6s} on time {r['on_time']:4d} = "
                      f"{100 * r['share_of_capacity_on_time']:5.1f}% of capacity, "
                      f"{100 * r['share_of_worker_time_on_time']:5.1f}% of worker time; late-start worker-s "
                      f"{r['wasted_worker_s']:5.1f}; arrival->result p50 {r['end_to_arrival_p50_s']:5.2f}s "
                      f"({r['ran']} ran)", flush=True)
            if "states" in res[label]:
                print(f"  {label:4s} outcomes {res[label]['states']}", flush=True)
        out[sc.name] = res
    if args.json:
        dump_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
