"""Many pilots against one dispatcher: its CPU share and the report-to-record latency, 10 pilots beside 1 000.

Goal stated by the project: at 1 000 pilots the dispatcher stays under a
quarter of a core, and a report is recorded within 100 ms (p99).

One ``python -m p3s dispatcher`` child process, on the local RabbitMQ (a fresh
vhost) and PostgreSQL (a fresh database) of each run.  The pilots are
simulated, in a few child processes (250 pilots each) so that a thousand of
them fit on two cores beside the dispatcher, but every one of them speaks the
real protocol: an AMQP channel of its own consuming ``p3s.tasks.default``
with a prefetch of one through the pilot's own :class:`TaskConsumer` (paused
before the ack, consuming again after the job), a distinct pilot id, a
registration and then a heartbeat every ``--heartbeat`` seconds (the default
pilot rate) at its own phase, a ``running`` report with the task's token when
it takes a task and a ``finished`` report ``--run-s`` seconds later, all
built with ``p3s.messages`` and published with confirms by ``p3s.broker``'s
Publisher (one publishing connection per simulator process; a real pilot has
one of its own).  Up to 200 pilots have a connection each; past that, pilots
share connections (``--per-connection``), because the Debian RabbitMQ of a
default install accepts 832 sockets in all.  Connections cost RabbitMQ, not
the dispatcher, which sees the same messages either way.  No payload runs
and no control queue is declared: neither reaches the dispatcher.  Data events arrive at ``--rate`` per second for
``--seconds`` seconds, the same in every run, so the runs differ only in the
number of pilots.

Measured:

* the dispatcher's CPU share over the window in which events arrive, from
  utime + stime in ``/proc/<pid>/stat`` (1.0 is one whole core);
* report-to-record latency: the time.time() a simulated pilot took just
  before publishing a job report, to the time the transaction that recorded
  it committed.  The commit time comes from a deferred constraint trigger
  (``clock_timestamp()`` at commit) that this benchmark adds to its own
  scratch database; it writes one small row per changed job, which the
  dispatcher's transactions pay for.  Heartbeats likewise, from each
  report's ``sent_at`` to the commit of the update of the pilot's row.

The floor, in the same run: an AMQP round trip to another process
(publish -> consume -> ack + reply -> consume; a report needs one way of it),
a one-row PostgreSQL transaction (a report needs at least one commit), and
the CPU this host takes to parse 10 000 heartbeats with ``p3s.messages`` (a
share of a core is a share of this core: the CPU floor says how fast it was).

``--profile FILE`` runs the dispatcher of the largest run under cProfile, on
each thread's CPU clock, and writes its statistics to FILE (read them with ``python -m pstats FILE``).

Usage::

    python bench/pilots.py                               # 10 and 1000 pilots, 60 s each
    python bench/pilots.py --pilots 10,300,1000 --seconds 120 --json out.json
    python bench/pilots.py --pilots 1000 --profile dispatcher.prof

Run by hand only; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TEMPLATE = "bench_pilots"
PER_PROCESS = 250
# A Debian RabbitMQ under its default ulimit accepts 832 sockets, for every user of the node.
MAX_CONNECTIONS = 200

# Commit-time stamps of every job state change and pilot update (bench database only).
MARKS_SQL = """
CREATE TABLE bench_job_marks (job_id bigint, state text, at float8);
CREATE TABLE bench_pilot_marks (pilot_id text, sent_at float8, at float8);
CREATE FUNCTION bench_job_mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO bench_job_marks VALUES (NEW.id, NEW.state, extract(epoch FROM clock_timestamp()));
  RETURN NULL;
END $$;
CREATE FUNCTION bench_pilot_mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO bench_pilot_marks VALUES (NEW.id, NEW.last_sent_at, extract(epoch FROM clock_timestamp()));
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER bench_job_mark AFTER UPDATE ON jobs DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION bench_job_mark();
CREATE CONSTRAINT TRIGGER bench_pilot_mark AFTER UPDATE ON pilots DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW WHEN (OLD.last_sent_at IS DISTINCT FROM NEW.last_sent_at) EXECUTE FUNCTION bench_pilot_mark();
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pilots", default="10,1000", help="pilot counts, one run each (default 10,1000)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of events per run (default 60)")
    p.add_argument("--rate", type=float, default=10.0, help="data events per second (default 10)")
    p.add_argument("--run-s", type=float, default=0.5, help="simulated run time of a task (default 0.5)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between a pilot's heartbeats (default 10,"
                   " the pilot default)")
    p.add_argument("--per-connection", type=int, default=0, help="pilots per AMQP connection, each on a channel"
                   f" of its own (default: 1, or as many as keep the connections under {MAX_CONNECTIONS})")
    p.add_argument("--floor", type=int, default=500, help="AMQP round trips for the floor (default 500)")
    p.add_argument("--profile", metavar="FILE", help="run the largest run's dispatcher under cProfile, stats to FILE")
    p.add_argument("--log-level", default="WARNING", help="the dispatcher's log level (default WARNING)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE ('-': stdout)")
    return p.parse_args(argv)


# -- the simulated pilots (child processes) ---------------------------------------------


class SimPilot:
    """One pilot: its own channel, consumer and the task it holds, with its own heartbeat phase."""

    def __init__(self, pilot_id: str, conn: Any, on_task: Any) -> None:
        from p3s import topology
        from p3s.pilot.consumer import TaskConsumer

        self.id = pilot_id
        self.conn = conn
        channel = conn.channel()
        channel.basic_qos(0, 1, True)
        self.consumer = TaskConsumer(channel, queues=[topology.task_queue("default")], auto_declare=False,
                                     on_message=lambda message: on_task(self, message))
        self.consumer.consume()
        self.task: Any = None
        self.finish_at = 0.0
        self.jobs_done = 0


def simulate(url: str, ids: list[str], per_connection: int, heartbeat_s: float, run_s: float, stop: Any, ready: Any,
             out: Any) -> None:
    """Run the pilots ``ids``, ``per_connection`` to an AMQP connection, until ``stop``; results on ``out``."""
    from kombu import Connection

    from p3s import topology
    from p3s.broker import Outgoing, Publisher
    from p3s.config import BrokerSettings
    from p3s.messages import JobReport, PilotReport, Task, encode
    from p3s.states import JobState, PilotState

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through ``stop``
    host, pid = socket.gethostname(), os.getpid()
    publisher = Publisher(BrokerSettings(url=url, heartbeat_s=0), exchanges=[topology.status_exchange])
    outbox: list[tuple[Any, str]] = []  # (report, kind) published at the next flush
    sent: list[tuple[int, str, float]] = []
    counts = {"heartbeats": 0, "tasks": 0, "late": 0}

    def pilot_report(p: SimPilot, event: str) -> PilotReport:
        return PilotReport(pilot_id=p.id, event=event, host=host, pid=pid, queues=["default"],
                           state=PilotState.BUSY if p.task else PilotState.IDLE,
                           job_id=p.task.job_id if p.task else None, jobs_done=p.jobs_done)

    def on_task(p: SimPilot, message: Any) -> None:
        p.consumer.pause()  # before the ack, as the pilot does: no second task waits here
        message.ack()
        task = Task.parse(message.body)
        counts["tasks"] += 1
        if task.deadline < time.time():
            counts["late"] += 1
        p.task, p.finish_at = task, time.monotonic() + run_s
        outbox.append((JobReport(task.job_id, JobState.RUNNING, p.id, started_at=time.time(), token=task.token),
                       "job"))

    conns, pilots = [], []
    for i, pilot_id in enumerate(ids):
        if i % per_connection == 0:
            conns.append(Connection(url, heartbeat=0, connect_timeout=30))
            conns[-1].connect()
        pilots.append(SimPilot(pilot_id, conns[-1], on_task))
    by_fd = {int(c.connection.sock.fileno()): c for c in conns}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    now = time.monotonic()
    next_beat = {p.id: now + random.uniform(0, heartbeat_s) for p in pilots}
    for p in pilots:
        outbox.append((pilot_report(p, "register"), "pilot"))
    ready.release()

    def flush() -> None:
        if not outbox:
            return
        messages = []
        stamp = time.time()
        for report, kind in outbox:
            report = dataclasses.replace(report, sent_at=stamp)
            if kind == "job":
                sent.append((report.job_id, JobState(report.state).value, stamp))
                key = topology.status_routing_key("job", report.state)
            else:
                key = topology.status_routing_key("pilot", report.event)
            messages.append(Outgoing(topology.status_exchange, key, encode(report)))
        outbox.clear()
        publisher.publish(messages)

    while not stop.is_set():
        for fd, _event in poller.poll(20):
            conn = by_fd[fd]
            while True:
                try:
                    conn.drain_events(timeout=0)
                except (socket.timeout, TimeoutError):
                    break
        now = time.monotonic()
        for p in pilots:
            if p.task is not None and now >= p.finish_at:
                task, p.task = p.task, None
                p.jobs_done += 1
                outbox.append((JobReport(task.job_id, JobState.FINISHED, p.id, exit_code=0, started_at=None,
                                         ended_at=time.time(), token=task.token), "job"))
                p.consumer.consume()
            if now >= next_beat[p.id]:
                next_beat[p.id] += heartbeat_s
                counts["heartbeats"] += 1
                outbox.append((pilot_report(p, "heartbeat"), "pilot"))
        flush()
    out.put({"sent": sent, **counts})
    for conn in conns:
        conn.release()
    publisher.close()


# -- one run ----------------------------------------------------------------------------


def per_connection(n: int, args: argparse.Namespace) -> int:
    """Pilots sharing one AMQP connection, each on its own channel: ``--per-connection``, or as few as fit."""
    return args.per_connection or max(1, math.ceil(n / MAX_CONNECTIONS))


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (its threads included), in clock ticks."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def count_idle_pilots(engine: Any) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pilots WHERE state IN ('idle', 'busy')")).scalar_one())


def recorded_since(engine: Any, since: float) -> int:
    """Messages the dispatcher recorded since ``since``: pilot updates, job state changes, new files."""
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT (SELECT count(*) FROM bench_pilot_marks WHERE at >= :t)"
            " + (SELECT count(*) FROM bench_job_marks WHERE at >= :t AND state IN ('running', 'finished'))"
            " + (SELECT count(*) FROM files WHERE received_at >= :t)"), {"t": since}).scalar_one())


def settle(engine: Any, broker_url: str, quiet_s: float = 3.0, limit_s: float = 300.0) -> bool:
    """Wait until the status queue is empty and nothing new was recorded for ``quiet_s``; False after ``limit_s``."""
    from kombu import Connection

    from p3s import broker, topology

    end = time.monotonic() + limit_s
    last, since = -1, time.monotonic()
    with Connection(broker_url, connect_timeout=10) as conn:
        while time.monotonic() < end:
            now = recorded_since(engine, 0.0)
            if now != last or broker.queue_depth(conn, topology.status_queue):
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return True
            time.sleep(0.5)
    return False


def open_jobs(engine: Any) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM jobs WHERE state IN ('pending', 'queued', 'running')")).scalar_one())


def one_run(n: int, args: argparse.Namespace, profile: str | None) -> dict[str, Any]:
    import psycopg

    from p3s import db
    from p3s.broker import Publisher
    from p3s.messages import DataEvent
    from p3s.watcher.service import event_message

    nodes = {"dqm": {"command": "/bin/true", "wall_s": "60"}}
    with common.scratch_vhost("bench-pilots") as broker_url, common.scratch_database("bench_pilots") as database_url, \
            tempfile.TemporaryDirectory(prefix="p3s-bench-pilots-") as tmp_name:
        tmp = Path(tmp_name)
        common.prepare_database(database_url, common.graphml(nodes, name=TEMPLATE), TEMPLATE)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(MARKS_SQL)
        env = {**os.environ, **common.p3s_environ(broker_url, database_url, tmp, args.log_level)}
        command = ([sys.executable, __file__, "--profiled-dispatcher", profile] if profile
                   else [sys.executable, "-m", "p3s", "dispatcher"])
        log_path = tmp / "dispatcher.log"
        with open(log_path, "wb") as log_out:
            dispatcher = subprocess.Popen(command, env=env, stdout=log_out, stderr=subprocess.STDOUT,
                                          cwd=common.REPO)
        engine = db.make_engine(database_url)
        ctx = multiprocessing.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        sims: list[Any] = []
        publisher: Any = None
        try:
            # The dispatcher declares the topology: wait for its task queue before the pilots consume it.
            from kombu import Connection

            from p3s import topology
            with Connection(broker_url, connect_timeout=10) as probe:
                end = time.monotonic() + 60
                while True:
                    if dispatcher.poll() is not None:
                        raise RuntimeError("the dispatcher exited:\n" + log_path.read_text()[-2000:])
                    try:
                        topology.task_queue("default")(probe.channel()).queue_declare(passive=True)
                        break
                    except Exception:  # not declared yet
                        if time.monotonic() > end:
                            raise
                        time.sleep(0.2)
            ids = [f"sim{n}-{i:04d}" for i in range(n)]
            groups = [ids[i:i + PER_PROCESS] for i in range(0, n, PER_PROCESS)]
            ready = ctx.Semaphore(0)
            for group in groups:
                proc = ctx.Process(target=simulate, args=(broker_url, group, per_connection(n, args), args.heartbeat,
                                                          args.run_s, stop, ready, out), daemon=True)
                proc.start()
                sims.append(proc)
            connected, end = 0, time.monotonic() + 120
            while connected < len(groups):
                if ready.acquire(timeout=0.5):
                    connected += 1
                elif any(p.exitcode is not None for p in sims) or time.monotonic() > end:
                    raise RuntimeError("a simulator did not connect its pilots")
            end = time.monotonic() + 60
            while count_idle_pilots(engine) < n:
                if time.monotonic() > end:
                    raise RuntimeError(f"only {count_idle_pilots(engine)} of {n} pilots registered")
                time.sleep(0.2)
            time.sleep(min(args.heartbeat, 10))  # settle: every pilot's heartbeats under way

            publisher = Publisher(common_settings(broker_url).broker, exchanges=[])
            sim_ticks = sum(cpu_ticks(p.pid) for p in sims)
            t0, t0_wall, ticks0 = time.monotonic(), time.time(), cpu_ticks(dispatcher.pid)
            sent_events = 0
            while (elapsed := time.monotonic() - t0) < args.seconds:
                due = int(elapsed * args.rate) + 1
                if due > sent_events:
                    stamp = time.time()
                    publisher.publish([event_message(DataEvent(name=f"run{n}-{i:06d}.dat", path=f"/data/run{n}-{i:06d}"
                                                               ".dat", stream="raw", seen_at=stamp, source="bench",
                                                               size=1)) for i in range(sent_events, due)])
                    sent_events = due
                time.sleep(max(0.0, (sent_events / args.rate) - (time.monotonic() - t0)))
            window = time.monotonic() - t0
            busy = (cpu_ticks(dispatcher.pid) - ticks0) / os.sysconf("SC_CLK_TCK")
            sims_busy = (sum(cpu_ticks(p.pid) for p in sims) - sim_ticks) / os.sysconf("SC_CLK_TCK")
            end = time.monotonic() + 120
            while open_jobs(engine) and time.monotonic() < end:
                time.sleep(0.2)
            left_open = open_jobs(engine)
            stop.set()
            results = [out.get(timeout=60) for _ in sims]
            # Then until the dispatcher has recorded every report sent: its CPU time per message
            # from the first event to here does not depend on whether it kept up.
            caught_up = settle(engine, broker_url)
            spent = (cpu_ticks(dispatcher.pid) - ticks0) / os.sysconf("SC_CLK_TCK")
            handled = recorded_since(engine, t0_wall)
        finally:
            stop.set()
            for proc in sims:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            if publisher is not None:
                publisher.close()
            if dispatcher.poll() is None:
                dispatcher.send_signal(signal.SIGTERM)
                try:
                    dispatcher.wait(60)  # cProfile writes its file on the way out
                except subprocess.TimeoutExpired:
                    dispatcher.kill()
                    dispatcher.wait()
        from sqlalchemy import text

        with engine.connect() as conn:
            job_marks = {(int(j), s): at for j, s, at in conn.execute(text(
                "SELECT job_id, state, min(at) FROM bench_job_marks GROUP BY job_id, state"))}
            beats = [at - sent_at for _pid, sent_at, at in conn.execute(text(
                "SELECT pilot_id, sent_at, at FROM bench_pilot_marks WHERE sent_at IS NOT NULL"))]
            states = dict(conn.execute(text("SELECT state, count(*) FROM jobs GROUP BY state")).all())
        engine.dispose()
    sent = [s for r in results for s in r["sent"]]
    lat = {"running": [], "finished": []}
    missing = 0
    for job_id, state, stamp in sent:
        at = job_marks.get((job_id, state))
        if at is None:
            missing += 1
        else:
            lat.setdefault(state, []).append(at - stamp)
    return {
        "pilots": n,
        "pilots_per_connection": per_connection(n, args),
        "window_s": window,
        "events": sent_events,
        "dispatcher_cpu_share": busy / window,
        "dispatcher_cpu_ms_per_message": 1000 * spent / max(1, handled),
        "messages_recorded": handled,
        "caught_up": caught_up,
        "simulators_cpu_share": sims_busy / window,
        "heartbeats_sent": sum(r["heartbeats"] for r in results),
        "tasks_taken": sum(r["tasks"] for r in results),
        "tasks_late": sum(r["late"] for r in results),
        "reports_not_recorded": missing,
        "jobs_left_open": left_open,
        "job_states": states,
        "report_to_record_ms": {k: common.summary(v) for k, v in lat.items()},
        "report_to_record_all_ms": common.summary(lat["running"] + lat["finished"]),
        "heartbeat_to_record_ms": common.summary(beats),
    }


def common_settings(broker_url: str) -> Any:
    from p3s.config import load_settings

    return load_settings(None, {"P3S_BROKER_URL": broker_url})


#: Heartbeats parsed for the CPU floor.
CPU_FLOOR_REPORTS = 10_000


def cpu_floor(reports: int = CPU_FLOOR_REPORTS) -> float:
    """Milliseconds of CPU this host takes to parse ``reports`` heartbeats with p3s.messages (best of three).

    The dispatcher's CPU share is a share of this host's core: a core half as
    fast doubles it.  This fixed piece of the dispatcher's own pure-Python
    work, timed in the same run, says how fast the core was, so that runs on
    different hosts (or on one host whose speed drifts) can be compared.
    """
    from p3s.messages import PilotReport, encode, parse_status
    from p3s.states import PilotState

    bodies = [encode(PilotReport(pilot_id=f"pilot-{i:04d}", event="heartbeat", host="wn01", pid=1000 + i,
                                 queues=["default"], state=PilotState.IDLE, sent_at=1000.0 + i))
              for i in range(reports)]
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        for body in bodies:
            parse_status(body)
        best = min(best, time.process_time() - start)
    return 1000 * best


def floors(rounds: int) -> dict[str, float]:
    with common.scratch_vhost("bench-pilots-floor") as broker_url, \
            common.scratch_database("bench_pilots_floor") as database_url:
        trips = common.amqp_round_trip(broker_url, rounds, in_process=False)
        _rows, one_txn = common.pg_insert_rate(database_url, 1000)
    trip = common.summary(trips)
    return {"amqp_round_trip_p50_ms": trip["p50"], "amqp_round_trip_p99_ms": trip["p99"],
            "pg_one_row_txn_ms": 1000 * one_txn, "cpu_parse_heartbeats_ms": cpu_floor()}


def profiled_dispatcher(path: str) -> int:
    """``p3s dispatcher`` with every thread under cProfile (its work runs in threads); stats to ``path`` at exit.

    Each thread is timed by its own CPU clock (``time.thread_time``), so the
    statistics say where the CPU went, not where the threads waited.
    """
    import cProfile
    import pstats
    import threading

    profiles: list[cProfile.Profile] = []

    def start(*_args: Any) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()

    threading.setprofile(start)
    from p3s.cli import main as p3s_main

    main_profile = cProfile.Profile(time.thread_time)
    profiles.append(main_profile)
    code = main_profile.runcall(p3s_main, ["dispatcher"])
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        stats.add(profile)
    stats.dump_stats(path)
    return int(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--profiled-dispatcher"]:
        return profiled_dispatcher(argv[1])
    args = parse_args(argv)
    common.interrupt_on_sigterm()
    counts = [int(x) for x in args.pilots.split(",") if x.strip()]
    floor_before = floors(args.floor)
    runs = [one_run(n, args, args.profile if args.profile and n == max(counts) else None) for n in counts]
    floor_after = floors(args.floor)
    print(f"p3s pilots: one dispatcher process, {args.rate:g} data events/s for {args.seconds:g}s, "
          f"simulated run time {args.run_s:g}s, a heartbeat every {args.heartbeat:g}s per pilot")
    for label, f in (("before", floor_before), ("after", floor_after)):
        print(f"  floor {label}: AMQP round trip to another process p50 {f['amqp_round_trip_p50_ms']:.2f} ms, "
              f"p99 {f['amqp_round_trip_p99_ms']:.2f} ms; PostgreSQL one-row transaction "
              f"{f['pg_one_row_txn_ms']:.2f} ms; CPU, {CPU_FLOOR_REPORTS:,} heartbeats parsed "
              f"{f['cpu_parse_heartbeats_ms']:.0f} ms")
    for r in runs:
        print(f"\n{r['pilots']} pilots ({r['pilots_per_connection']} per AMQP connection): dispatcher CPU {100 * r['dispatcher_cpu_share']:.1f}% of a core "
              f"(simulators {100 * r['simulators_cpu_share']:.0f}%), {r['events']} events, "
              f"{r['tasks_taken']} tasks taken ({r['tasks_late']} past deadline), "
              f"{r['heartbeats_sent']} heartbeats, {r['reports_not_recorded']} job reports not recorded, "
              f"{r['jobs_left_open']} jobs left open; jobs by state {r['job_states']}")
        need = r["dispatcher_cpu_ms_per_message"] * (r["pilots"] / args.heartbeat + 3 * args.rate) / 1000
        print(f"  dispatcher CPU per message recorded {r['dispatcher_cpu_ms_per_message']:.2f} ms "
              f"({r['messages_recorded']} messages, caught up: {r['caught_up']}): at {r['pilots']} heartbeats per "
              f"{args.heartbeat:g}s and {3 * args.rate:g} events and job reports per second it needs "
              f"{100 * need:.1f}% of a core")
        rows = {f"report -> recorded, {k}": v for k, v in r["report_to_record_ms"].items()}
        rows["report -> recorded, all job reports"] = r["report_to_record_all_ms"]
        rows["heartbeat -> recorded"] = r["heartbeat_to_record_ms"]
        common.print_table("  latency", rows)
    if args.json:
        common.dump_json(args.json, {"args": vars(args), "floor_before": floor_before, "floor_after": floor_after,
                                     "runs": runs})
    return 0 if all(math.isfinite(r["dispatcher_cpu_share"]) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
