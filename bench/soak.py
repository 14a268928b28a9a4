"""Soak: files in bursts with quiet spells, a dispatcher killed, a broker restarted; nothing may be lost.

Runs, as separate processes, ``python -m p3s dispatcher``, ``python -m p3s
watcher --watch DIR`` and two ``python -m p3s pilot`` on a RabbitMQ node of its
own (own node name, ports and directories, started and stopped by the PID of
the process this script started, never by name) and a fresh PostgreSQL
database (dropped at the end).  The template is a two-node chain of
``/bin/true``.

For ``--minutes`` the writer puts ``--burst`` files at ``--rate`` files/s into
the watched directory, then stays quiet for ``--gap`` seconds, longer than
twice the AMQP heartbeat (``P3S_BROKER_HEARTBEAT_S``, ``--heartbeat``), so
every idle connection must keep its heartbeats or be dropped by RabbitMQ.  A
third of the way in, during a burst, the dispatcher gets SIGKILL and is
started again ``--down`` seconds later; two thirds in, during a burst, the
RabbitMQ node is stopped and started again (same node name and data
directory, so durable queues and persistent messages survive).

Then it waits for everything to settle and prints files written, decisions by
kind, jobs by state, the jobs that did not finish by state and reason, and
``lost``: files written that have no decision plus jobs not in a terminal
state.  ``lost`` must be 0, and so must the files decided twice (besides
``duplicate`` records).  Last it runs ``p3s audit``.

Usage::

    python bench/soak.py                 # 10 minutes
    python bench/soak.py --minutes 2     # a quick try
    python bench/soak.py --minutes 3 --json out.json

Run by hand only; nothing here asserts on time.  Exit status 1 if anything
was lost or decided twice, or the audit failed (the logs are then kept and
their directory printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TEMPLATE = "soak"
TERMINAL = ("finished", "failed", "timeout", "expired", "lost", "dropped")
# The Debian package's /usr/sbin/rabbitmq-server switches user through su,
# which hides the server's PID; the script it runs does not.
SERVER_SCRIPTS = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long files arrive (default 10)")
    p.add_argument("--burst", type=int, default=40, help="files per burst (default 40)")
    p.add_argument("--rate", type=float, default=20.0, help="files/s within a burst (default 20)")
    p.add_argument("--gap", type=float, default=15.0, help="quiet seconds between bursts (default 15)")
    p.add_argument("--heartbeat", type=float, default=5.0, help="P3S_BROKER_HEARTBEAT_S (default 5)")
    p.add_argument("--down", type=float, default=3.0, help="seconds the killed dispatcher stays down (default 3)")
    p.add_argument("--budget", type=float, default=120.0, help="template latency budget in seconds (default 120)")
    p.add_argument("--settle", type=float, default=300.0, help="longest wait for the end to settle (default 300)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--json", default="", help="also write the figures as JSON here ('-' for stdout)")
    p.add_argument("--keep", action="store_true", help="keep the logs and the watched directory")
    return p.parse_args(argv)


# -- a RabbitMQ node of its own ---------------------------------------------------


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


def server_script() -> str:
    for candidate in SERVER_SCRIPTS:
        found = shutil.which(candidate)
        if found and (os.geteuid() == 0 or not found.startswith("/usr/lib/")):
            return found
    raise SystemExit("no rabbitmq-server script to start a node of the soak's own")


class RabbitNode:
    """A RabbitMQ node in ``base``, started and stopped by this script only (by PID, never by name)."""

    def __init__(self, base: Path) -> None:
        self.server = server_script()
        self.base = base
        self.name = f"p3s-soak-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        dist = free_port()
        while dist == self.port:
            dist = free_port()
        (base / "enabled_plugins").write_text("[].\n")
        # Not /etc/rabbitmq/rabbitmq.conf: that one names the shared broker's listener.
        (base / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
        self.env = {
            **os.environ,
            "HOME": str(base),  # this node's Erlang cookie lives here
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
        with open(self.base / f"server-{self.starts}.out", "wb") as out:
            # Its own session: a Ctrl-C of this script reaches the node only through stop().
            self.process = subprocess.Popen([self.server], env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
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
        """SIGTERM to the server script started here: it stops its own beam and waits for it."""
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
        end = time.monotonic() + 30
        while port_open(self.port) and time.monotonic() < end:
            time.sleep(0.1)

    def _kill_beam(self) -> None:
        try:
            pid = int((self.base / "node.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError):
            return
        if self.name.encode() in cmdline:  # a reused PID is left alone
            os.kill(pid, signal.SIGKILL)

    def log_tail(self) -> str:
        logs = sorted((self.base / "log").glob("*.log")) + sorted(self.base.glob("server-*.out"))
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in logs)


# -- files ----------------------------------------------------------------------


class Writer(threading.Thread):
    """Bursts of files with quiet gaps between them, until stopped."""

    def __init__(self, watch: Path, burst: int, rate: float, gap: float) -> None:
        super().__init__(name="writer", daemon=True)
        self.watch, self.burst, self.rate, self.gap = watch, burst, rate, gap
        self.written: list[str] = []
        self.bursts = 0
        self.in_burst = threading.Event()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.bursts += 1
            self.in_burst.set()
            start = time.monotonic()
            for i in range(self.burst):
                if self.stopped.wait(max(0.0, start + i / self.rate - time.monotonic())):
                    break
                name = f"soak_{self.bursts:04d}_{i:04d}.dat"
                (self.watch / name).write_bytes(b"s" * 1024)
                self.written.append(name)
            self.in_burst.clear()
            self.stopped.wait(self.gap)

    def mid_burst(self, after: float = 0.5) -> None:
        """Return ``after`` seconds into the next (or current) burst."""
        while not self.in_burst.wait(0.1) and not self.stopped.is_set():
            pass
        time.sleep(after)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(10)


# -- the run --------------------------------------------------------------------


def sql(database_url: str, statement: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(database_url) as conn:
        return list(conn.execute(statement).fetchall())


def declared(url: str) -> bool:
    """True once p3s.dispatcher.events exists on the broker at ``url``."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.channel().queue_declare("p3s.dispatcher.events", passive=True)
    except Exception:  # noqa: BLE001 - not there yet, whatever the reason
        return False
    return True


def wait_until(predicate: Any, timeout: float, what: str, step: float = 0.5) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            print(f"warning: timed out after {timeout:.0f}s waiting for {what}", file=sys.stderr)
            return False
        time.sleep(step)
    return True


def stamp(t0: float, what: str) -> None:
    print(f"[{time.monotonic() - t0:7.1f}s] {what}", flush=True)


class Parts:
    """The p3s daemons as child processes; the dispatcher can be killed and started again."""

    def __init__(self, children: common.Children, watch: Path) -> None:
        self.children = children
        self.watch = watch
        self.dispatcher: subprocess.Popen[bytes] | None = None
        self.dispatcher_starts = 0

    def start_dispatcher(self) -> None:
        self.dispatcher_starts += 1
        self.dispatcher = self.children.start(f"dispatcher-{self.dispatcher_starts}", "dispatcher")

    def kill_dispatcher(self) -> None:
        assert self.dispatcher is not None
        self.dispatcher.send_signal(signal.SIGKILL)
        self.dispatcher.wait()
        # Its end is intended: no longer one of the children that must stay up.
        self.children.procs = [c for c in self.children.procs if c[1] is not self.dispatcher]
        self.dispatcher = None

    def start_others(self, pilots: int) -> None:
        for i in range(pilots):
            self.children.start(f"pilot-{i + 1}", "pilot", "--id", f"soak-pilot-{i + 1}")
        self.children.start("watcher", "watcher", "--watch", str(self.watch), "--pattern", "*.dat")


def figures(database_url: str, written: list[str]) -> dict[str, Any]:
    files = sql(database_url, "SELECT name, decision FROM files")
    recorded = {name for name, _d in files}
    decisions: dict[str, int] = {}
    for _name, decision in files:
        decisions[decision] = decisions.get(decision, 0) + 1
    jobs = dict(sql(database_url, "SELECT state, count(*) FROM jobs GROUP BY state"))
    ended_otherwise = [
        {"state": s, "reason": r, "jobs": n}
        for s, r, n in sql(database_url, "SELECT state, reason, count(*) FROM jobs WHERE state NOT IN "
                                         "('finished', 'pending', 'queued', 'running') "
                                         "GROUP BY state, reason ORDER BY count(*) DESC")
    ]
    workflows = dict(sql(database_url, "SELECT state, count(*) FROM workflows GROUP BY state"))
    no_decision = sorted(set(written) - recorded)
    firsts: dict[str, int] = {}
    for name, decision in files:
        if decision != "duplicate":
            firsts[name] = firsts.get(name, 0) + 1
    twice = sorted(name for name, n in firsts.items() if n > 1)
    active = sum(n for s, n in jobs.items() if s not in TERMINAL)
    return {
        "files_written": len(written),
        "files_recorded": len(files),
        "decisions": decisions,
        "jobs": jobs,
        "workflows": workflows,
        "not_finished": ended_otherwise,
        "no_decision": no_decision[:20],
        "decided_twice": len(twice),
        "lost": len(no_decision) + active,
        "lost_files": len(no_decision),
        "lost_jobs": active,
    }


def settled(database_url: str, written: list[str]) -> bool:
    f = figures(database_url, written)
    return f["lost"] == 0


def run(args: argparse.Namespace, database_url: str, tmp: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    watch = tmp / "watch"
    logs = tmp / "logs"
    rmq = tmp / "rmq"
    for d in (watch, logs, rmq):
        d.mkdir()
    xml = common.graphml({"first": {"command": "/bin/true", "wall_s": "30"},
                          "second": {"command": "/bin/true", "wall_s": "30"}},
                         edges=[("first", "second")], name=TEMPLATE, trigger="soak_*", budget_s=args.budget)
    common.prepare_database(database_url, xml, TEMPLATE)

    node = RabbitNode(rmq)
    node.start()
    stamp(t0, f"RabbitMQ node {node.name} listening on port {node.port}")
    env = common.p3s_environ(node.url, database_url, tmp, args.log_level)
    env.update({
        "P3S_BROKER_HEARTBEAT_S": f"{args.heartbeat:g}",
        "P3S_PILOT_HEARTBEAT_S": "2",
        "P3S_DISPATCHER_REAP_INTERVAL_S": "1",
    })
    children = common.Children(env, logs)
    parts = Parts(children, watch)
    writer = Writer(watch, args.burst, args.rate, args.gap)
    events: list[dict[str, Any]] = []

    def event(what: str) -> None:
        stamp(t0, what)
        events.append({"at_s": round(time.monotonic() - t0, 1), "what": what})

    try:
        parts.start_dispatcher()
        # The dispatcher declares the topology the others publish into.
        if not wait_until(lambda: declared(node.url), 60, "the dispatcher to declare its queues"):
            children.check()
        parts.start_others(pilots=2)
        if not wait_until(lambda: sql(database_url, "SELECT count(*) FROM pilots")[0][0] >= 2, 60,
                          "the pilots to register"):
            children.check()
        event("dispatcher, watcher and 2 pilots running; files start")

        length = args.minutes * 60
        start = time.monotonic()
        writer.start()

        def until(fraction: float) -> None:
            while time.monotonic() < start + fraction * length:
                children.check()
                time.sleep(0.2)

        until(1 / 3)
        writer.mid_burst()
        parts.kill_dispatcher()
        event(f"dispatcher killed with SIGKILL during burst {writer.bursts} ({len(writer.written)} files written)")
        time.sleep(args.down)
        parts.start_dispatcher()
        event("dispatcher started again")

        until(2 / 3)
        writer.mid_burst()
        event(f"RabbitMQ node stopping during burst {writer.bursts} ({len(writer.written)} files written)")
        node.stop()
        node.start()
        event("RabbitMQ node started again")

        until(1.0)
        writer.stop()
        event(f"files stop: {len(writer.written)} written in {writer.bursts} bursts")

        ok = wait_until(lambda: (children.check(), settled(database_url, writer.written))[1], args.settle,
                        "every file to be decided and every job to end", step=1.0)
        event("settled" if ok else "not settled")
        result = figures(database_url, writer.written)
        audit = subprocess.run([sys.executable, "-m", "p3s", "audit", "--json"], env=children.env,
                               capture_output=True, text=True, timeout=120, cwd=common.REPO)
        try:
            result["audit"] = json.loads(audit.stdout)
        except json.JSONDecodeError:
            result["audit"] = {"ok": False, "problems": [audit.stdout[-2000:] + audit.stderr[-2000:]]}
        result["audit_exit"] = audit.returncode
    finally:
        writer.stop()
        children.stop()
        node.stop()
    warnings = {}
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace")
        warnings[log.stem] = {"WARNING": text.count(" WARNING "), "ERROR": text.count(" ERROR "),
                              "CRITICAL": text.count(" CRITICAL ")}
    result.update({
        "minutes": args.minutes, "burst": args.burst, "rate": args.rate, "gap_s": args.gap,
        "heartbeat_s": args.heartbeat, "bursts": writer.bursts, "events": events, "log_lines": warnings,
        "dispatcher_starts": parts.dispatcher_starts, "rabbitmq_starts": node.starts,
        "seconds": round(time.monotonic() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    return result


def report(r: dict[str, Any]) -> None:
    print(f"\np3s soak: {r['minutes']:g} min of bursts of {r['burst']} files at {r['rate']:g}/s with "
          f"{r['gap_s']:g} s quiet gaps, AMQP heartbeat {r['heartbeat_s']:g} s; dispatcher, watcher and "
          f"2 pilots as processes; 1 dispatcher SIGKILL, 1 RabbitMQ restart")
    print(f"  files written        {r['files_written']:6d}  in {r['bursts']} bursts")
    print(f"  file records         {r['files_recorded']:6d}  "
          + ", ".join(f"{k} {v}" for k, v in sorted(r["decisions"].items())))
    print(f"  decided twice        {r['decided_twice']:6d}  (files with more than one decision besides duplicate)")
    print("  jobs                 " + ", ".join(f"{k} {v}" for k, v in sorted(r["jobs"].items())))
    print("  workflows            " + ", ".join(f"{k} {v}" for k, v in sorted(r["workflows"].items())))
    print("  not finished, by reason:")
    for row in r["not_finished"] or [{"state": "-", "reason": "none", "jobs": 0}]:
        print(f"    {row['jobs']:6d}  {row['state']:8s} {row['reason']}")
    print(f"  LOST                 {r['lost']:6d}  ({r['lost_files']} files with no decision, "
          f"{r['lost_jobs']} jobs not in a terminal state)")
    if r["no_decision"]:
        print(f"    e.g. {', '.join(r['no_decision'][:5])}")
    audit = r["audit"]
    print(f"  p3s audit            {'ok' if audit.get('ok') else 'FAILED'} (exit {r['audit_exit']})")
    for problem in audit.get("problems", []):
        print(f"    {problem}")
    print("  log lines (WARNING/ERROR/CRITICAL): "
          + "; ".join(f"{k} {v['WARNING']}/{v['ERROR']}/{v['CRITICAL']}" for k, v in r["log_lines"].items()))
    print("  timeline: " + "; ".join(f"{e['at_s']:.0f}s {e['what']}" for e in r["events"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.interrupt_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="p3s-soak-"))
    result: dict[str, Any] | None = None
    try:
        with common.scratch_database("p3s_bench_soak") as database_url:
            result = run(args, database_url, tmp)
    except KeyboardInterrupt:
        print(f"interrupted; scratch database removed; logs in {tmp}", file=sys.stderr)
        return 130
    except Exception:
        print(f"failed; logs in {tmp}", file=sys.stderr)
        raise
    report(result)
    if args.json:
        common.dump_json(args.json, result)
    bad = result["lost"] != 0 or result["decided_twice"] != 0 or not result["audit"].get("ok")
    if bad or args.keep:
        print(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
