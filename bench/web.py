"""Every page of ``p3s web`` on a real history: a million jobs in PostgreSQL, fifty concurrent clients.

    python bench/web.py [--jobs 1000000] [--clients 50] [--requests 10] [--keep | --reuse] [--explain]
                        [--workers N] [--distinct]

Fills a PostgreSQL database of its own (``p3s_bench_web``, never the one the
tests use) with ``--jobs`` jobs of a realistic shape, in plain SQL
(``INSERT ... SELECT generate_series``): four weeks of files from two streams,
every decision; the shipped templates (``config/templates/*.graphml``), one
workflow per matching template; every job and workflow state, failures with
their reasons; a few hundred pilots, some lost.  The history is filled at
schema revision 0004 and then upgraded, so the time migration 0005 takes on it
is measured too.  ``--keep`` leaves the database for a later ``--reuse``.

Then it runs ``python -m p3s web`` as a separate process (uvicorn) on it, with
a scratch RabbitMQ vhost as its broker, and drives each page (HTML and its
``/api`` twin) with ``--clients`` concurrent clients (asyncio, one keep-alive
connection each), each sending ``--requests`` requests one after another; it
prints p50 and p95 per page, and the CPU the server and the clients spent on
each request.  The floor, measured in the same run: a bare ``SELECT 1`` round trip
through psycopg from as many concurrent clients (threads, one connection
each), and ``/healthz`` (the web stack without the database).

Fifty clients asking for the same page share its answer (``web.cache_s``),
as fifty shifters watching one page do; ``--distinct`` makes every request
unlike the others (a parameter the pages ignore), so that each costs its own
queries and rendering: the cost of fifty clients all asking for different
things.  ``--workers`` sets ``web.workers``; the server's CPU is that of all
its processes.

``--explain`` runs the queries behind the pages in this process instead and
prints PostgreSQL's EXPLAIN ANALYZE of each statement slower than
``--explain-ms``.  Run by hand, never in the test suite; figures go in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PG_ADMIN_URL,
    REPO,
    Children,
    interrupt_on_sigterm,
    p3s_environ,
    quantile,
    scratch_vhost,
)

DATABASE = "p3s_bench_web"
WEEKS = 4
PILOTS = 300
TEMPLATES = ("tpc_dqm", "multi_root", "monitor")
GOAL_MS = {"overview": 100.0}
DEFAULT_GOAL_MS = 200.0


# -- the history ------------------------------------------------------------------


def database_url() -> str:
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{DATABASE}"


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


def filled(url: str) -> int:
    """How many jobs the kept database holds (0 if there is none)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])
    except psycopg.Error:
        return 0


# A file's decision and stream from its number: about 3% duplicates, shed and refused,
# the rest half from each stream, raw sampled at 70% and pds at 50%.
FILE_ROWS = """
WITH n AS (
  SELECT i,
         %(t0)s + (%(t1)s - %(t0)s) * (i - 1)::float8 / greatest(%(n)s - 1, 1) AS t,
         CASE WHEN i %% 2 = 0 THEN 'raw' ELSE 'pds' END AS stream,
         CASE WHEN i %% 40 = 5 THEN 'duplicate'
              WHEN i %% 500 = 7 THEN 'shed'
              WHEN i %% 1000 = 13 THEN 'refused'
              WHEN i %% 2 = 0 AND (i * 7919) %% 10 < 3 THEN 'sampled_out'
              WHEN i %% 2 = 1 AND (i * 7919) %% 10 < 5 THEN 'sampled_out'
              ELSE 'accepted' END AS decision
  FROM generate_series(1::bigint, %(n)s) AS i
), numbered AS (
  -- a duplicate names the file before it again
  SELECT n.*, CASE WHEN decision = 'duplicate' THEN i - 1 ELSE i END AS k FROM n
), named AS (
  SELECT numbered.*,
         'np04_' || stream || '_run' || lpad((k / 50)::text, 6, '0') || '_' || lpad((k %% 50)::text, 4, '0')
           || '_dl' || (k %% 4)::text || '.hdf5' AS name
  FROM numbered
)
"""

FILES_SQL = FILE_ROWS + """
INSERT INTO files (id, name, dedup_key, path, stream, source, size, seen_at, received_at, decision, by_hand,
                   forced, reason)
SELECT i, name, CASE WHEN decision = 'duplicate' THEN NULL ELSE name END, '/data/buffer/' || name, stream, 'buffer',
       4000000000 + (i * 7919) %% 1000000000, t - 0.4, t, decision, false, false,
       CASE decision WHEN 'duplicate' THEN 'seen before as file ' || (i - 1)::text
                     WHEN 'shed' THEN 'queue dqm over its limit of 2000 tasks'
                     WHEN 'refused' THEN 'path outside the roots of source buffer'
                     WHEN 'sampled_out' THEN 'sampled out at ' || CASE stream WHEN 'raw' THEN '0.7' ELSE '0.5' END
                     ELSE '' END
FROM named
"""

# Jobs one file brings: raw files match all three shipped templates, pds files only monitor.
JOBS_PER_FILE_SQL = FILE_ROWS + """
SELECT avg(CASE WHEN decision <> 'accepted' THEN 0 WHEN stream = 'raw' THEN %(raw_jobs)s ELSE %(pds_jobs)s END)
FROM named
"""

# Running: the last five minutes; incomplete: 4% of the rest, the others finished (3% of them late).
WORKFLOWS_SQL = """
INSERT INTO workflows (file_id, template_id, template, state, seen_at, created_at, deadline, ended_at)
SELECT f.id, t.id, t.name,
       CASE WHEN f.received_at > %(now)s - 300 THEN 'running'
            WHEN (f.id * 31 + t.id * 7) %% 100 < 4 THEN 'incomplete' ELSE 'finished' END,
       f.seen_at, f.received_at + 0.05, f.seen_at + t.budget_s,
       CASE WHEN f.received_at > %(now)s - 300 THEN NULL
            WHEN (f.id * 31 + t.id * 7) %% 100 BETWEEN 4 AND 6 THEN f.seen_at + t.budget_s + 30
            ELSE f.received_at + 0.05 + 25 * t.stages END
FROM files f
JOIN (SELECT *, (SELECT count(*) FROM bench_nodes b WHERE b.template_id = templates.id) AS stages FROM templates) t
  ON (f.stream = 'raw' OR t.name = 'monitor')
WHERE f.decision = 'accepted'
ORDER BY f.id, t.id
"""

# A job's state follows its workflow's: an incomplete workflow fails at one stage (failed, timeout,
# expired or lost), the stages before it finished and the ones after are dropped; a running one has
# its first stage running and the others pending.
JOBS_SQL = """
WITH j AS (
  SELECT w.id AS workflow_id, w.template, w.state AS wstate, w.created_at, w.deadline, n.*,
         CASE w.state
           WHEN 'finished' THEN 'finished'
           WHEN 'running' THEN CASE WHEN n.ord = 0 THEN 'running' WHEN n.ord = 1 THEN 'queued' ELSE 'pending' END
           ELSE CASE WHEN n.ord < w.id %% n.stages THEN 'finished'
                     WHEN n.ord = w.id %% n.stages THEN
                       (ARRAY['failed', 'timeout', 'expired', 'lost'])[1 + (w.id / 7) %% 4]
                     ELSE 'dropped' END
         END AS state
  FROM workflows w JOIN bench_nodes n ON n.template_id = w.template_id
)
INSERT INTO jobs (workflow_id, template, node, state, held, queue, priority, deadline, wall_s, pilot_id, exit_code,
                  log, reason, created_at, queued_at, published_at, token_hash, started_at, ended_at)
SELECT workflow_id, template, node, state, false, queue, priority, deadline, wall_s,
       CASE WHEN state IN ('pending', 'queued', 'expired', 'dropped') THEN NULL
            ELSE 'pilot-' || lpad(((workflow_id * 5 + ord) %% 200)::text, 3, '0') END,
       CASE state WHEN 'finished' THEN 0 WHEN 'failed' THEN 1 + workflow_id %% 3 WHEN 'timeout' THEN -9 END,
       CASE WHEN state IN ('pending', 'queued', 'expired', 'dropped') THEN ''
            ELSE '/var/log/p3s/jobs/' || workflow_id::text || '/' || node || '.log' END,
       CASE state WHEN 'failed' THEN 'exit code ' || (1 + workflow_id %% 3)::text
                  WHEN 'timeout' THEN 'killed at its wall-clock limit of ' || wall_s::text || 's'
                  WHEN 'expired' THEN 'deadline passed 12.5s before start'
                  WHEN 'lost' THEN 'its pilot stopped sending heartbeats'
                  WHEN 'dropped' THEN 'a parent did not finish'
                  ELSE '' END,
       created_at,
       CASE WHEN state = 'pending' THEN NULL ELSE created_at + 20 * ord END,
       CASE WHEN state = 'pending' THEN NULL ELSE created_at + 20 * ord + 0.002 END,
       md5(workflow_id::text || node),
       CASE WHEN state IN ('pending', 'queued', 'expired', 'dropped') THEN NULL ELSE created_at + 20 * ord + 2 END,
       CASE WHEN state IN ('pending', 'queued', 'running') THEN NULL
            WHEN state = 'expired' THEN deadline
            ELSE created_at + 20 * ord + 17 END
FROM j
ORDER BY workflow_id, ord
"""

PILOTS_SQL = """
INSERT INTO pilots (id, host, pid, queues, state, started_at, last_seen, last_sent_at, job_id, jobs_done, problem,
                    "user")
SELECT 'pilot-' || lpad(i::text, 3, '0'), 'wn' || lpad((i / 8)::text, 3, '0') || '.example.org', 10000 + i,
       'dqm,display,default',
       CASE WHEN i < 200 THEN CASE WHEN i %% 3 = 0 THEN 'busy' ELSE 'idle' END
            WHEN i < 260 THEN 'stopped' ELSE 'lost' END,
       %(now)s - 86400 * 7 + i,
       CASE WHEN i < 200 THEN %(now)s - (i %% 10) WHEN i < 290 THEN %(now)s - 3600 * (i - 190) ELSE %(now)s - 600 END,
       %(now)s - (i %% 10), NULL, 500 + i * 13, '', 'p3s-pilot'
FROM generate_series(0, %(pilots)s - 1) AS i
"""


def fill(url: str, jobs: int) -> dict[str, float]:
    """Fill a fresh database at ``url`` with about ``jobs`` jobs; returns the seconds each step took."""
    import psycopg
    from psycopg.types.json import Jsonb

    from p3s import db
    from p3s.dagengine import parse_graphml

    took: dict[str, float] = {}
    start = time.perf_counter()
    db.upgrade(url, "0004")
    now = time.time()
    templates = {n: parse_graphml((REPO / "config" / "templates" / f"{n}.graphml").read_text(), name=n)
                 for n in TEMPLATES}
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TEMPORARY TABLE bench_nodes (template_id int, node text, ord int, stages int,"
                     " queue text, priority int, wall_s float8)")
        stages = {}
        for name in TEMPLATES:
            tpl = templates[name]
            tid = conn.execute(
                "INSERT INTO templates (name, version, trigger, budget_s, spec, created_at) VALUES"
                " (%s, 1, %s, %s, %s, %s) RETURNING id",
                (name, tpl.trigger, tpl.budget_s, Jsonb(tpl.to_dict()), now - WEEKS * 7 * 86400 - 3600),
            ).fetchone()[0]
            order = _topological(tpl)
            stages[name] = len(order)
            for ord_, node in enumerate(order):
                spec = tpl.node(node)
                conn.execute("INSERT INTO bench_nodes VALUES (%s, %s, %s, %s, %s, %s, %s)",
                             (tid, node, ord_, len(order), spec.queue, spec.priority, spec.wall_s))
        raw_jobs = sum(stages.values())
        per_file = float(conn.execute(JOBS_PER_FILE_SQL, {"t0": 0.0, "t1": 1.0, "n": 100_000, "raw_jobs": raw_jobs,
                                                          "pds_jobs": stages["monitor"]}).fetchone()[0])
        nfiles = max(1, round(jobs / per_file))
        t1 = time.perf_counter()
        conn.execute(FILES_SQL, {"t0": now - WEEKS * 7 * 86400, "t1": now - 1, "n": nfiles})
        conn.execute("SELECT setval(pg_get_serial_sequence('files', 'id'), %s)", (nfiles,))
        took["files"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        conn.execute(WORKFLOWS_SQL, {"now": now})
        took["workflows"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        conn.execute(JOBS_SQL, {})  # {}: the %% in it are then read as %
        took["jobs"] = time.perf_counter() - t1
        conn.execute(PILOTS_SQL, {"now": now, "pilots": PILOTS})
        conn.commit()
    t1 = time.perf_counter()
    db.upgrade(url)
    took["upgrade 0004 -> head"] = time.perf_counter() - t1
    with psycopg.connect(url, autocommit=True) as conn:
        t1 = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        took["vacuum analyze"] = time.perf_counter() - t1
    took["total"] = time.perf_counter() - start
    return took


def _topological(tpl: Any) -> list[str]:
    """The template's nodes, parents before children (stable by name)."""
    done: list[str] = []
    left = sorted(n.name for n in tpl.nodes)
    while left:
        ready = [n for n in left if all(p in done for p in tpl.parents(n))]
        done += ready
        left = [n for n in left if n not in ready]
    return done


def counts(url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url) as conn:
        return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("files", "workflows", "jobs", "pilots")}


# -- what the pages are asked -------------------------------------------------------


def sample_ids(url: str, log_file: Path) -> dict[str, Any]:
    """Ids to ask the detail pages about: a running workflow, a failed job (given a real log), a rare name."""
    import psycopg

    with psycopg.connect(url) as conn:
        workflow = conn.execute("SELECT id FROM workflows WHERE template = 'tpc_dqm'"
                                " ORDER BY state = 'running' DESC, id DESC LIMIT 1").fetchone()[0]
        job = conn.execute("SELECT id FROM jobs WHERE state = 'failed' ORDER BY id DESC LIMIT 1").fetchone()[0]
        conn.execute("UPDATE jobs SET log = %s WHERE id = %s", (str(log_file), job))
        name = conn.execute("SELECT name FROM files WHERE decision = 'accepted' ORDER BY id LIMIT 1"
                            " OFFSET (SELECT count(*) / 3 FROM files WHERE decision = 'accepted')").fetchone()[0]
        two_weeks = time.time() - 14 * 86400
    log_file.write_text("".join(f"event {i}: decoded 2048 channels, 3 noisy\n" for i in range(4000)))
    return {"workflow": workflow, "job": job, "name": name.split("_dl")[0][5:], "since": two_weeks,
            "until": two_weeks + 86400}


def pages(ids: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, path) of every page, HTML and JSON; the label groups a page with its goal."""
    w, j = ids["workflow"], ids["job"]
    day = f"since={ids['since']:.0f}&until={ids['until']:.0f}"
    out = [("healthz (no database)", "/healthz")]
    for html, api in [
        ("/", "/api/overview"),
        ("/status", "/api/status"),
        ("/files", "/api/files"),
        (f"/files?name={ids['name']}", f"/api/files?name={ids['name']}"),
        ("/files?decision=shed", "/api/files?decision=shed"),
        (f"/files?{day}", f"/api/files?{day}"),
        ("/workflows", "/api/workflows"),
        ("/workflows?state=incomplete&template=multi_root", "/api/workflows?state=incomplete&template=multi_root"),
        (f"/workflows/{w}", f"/api/workflows/{w}"),
        ("/jobs", "/api/jobs"),
        ("/jobs?state=lost", "/api/jobs?state=lost"),
        ("/jobs?template=monitor&node=monitor", "/api/jobs?template=monitor&node=monitor"),
        ("/jobs?pilot=pilot-123", "/api/jobs?pilot=pilot-123"),
        (f"/jobs?workflow={w}", f"/api/jobs?workflow={w}"),
        (f"/jobs/{j}", f"/api/jobs/{j}"),
        ("/pilots", "/api/pilots"),
        ("/templates", "/api/templates"),
        ("/priorities", "/api/priorities"),
        ("/sampling", "/api/sampling"),
    ]:
        label = "overview" if html == "/" else html
        out += [(label, html), (label, api)]
    out += [(p, p) for p in (f"/workflows/{w}/dag.svg", "/templates/tpc_dqm", "/templates/tpc_dqm/graphml",
                             "/templates/tpc_dqm/dag.svg", "/openapi.json")]
    return out


# -- load -------------------------------------------------------------------------------


class Client:
    """One HTTP/1.1 keep-alive connection, as small as a client can be, so that on two cores the
    load generator leaves the CPU to the server (httpx costs about as much per request as a page).

    It reads exactly what the server says (Content-Length or chunked) and opens the connection
    again where the server closed an idle one, as a browser does.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, int]:
        """(status, body bytes) of ``GET path``."""
        for attempt in (1, 2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                return await self._get(path)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _get(self, path: str) -> tuple[int, int]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            size = 0
            while True:
                chunk = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(chunk + 2)
                size += chunk
                if chunk == 0:
                    break
        else:
            size = int(headers.get("content-length", "0"))
            await self.reader.readexactly(size)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, size

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


def distinct(path: str, client: int, request: int) -> str:
    """``path`` made unlike any other request's by a parameter the pages ignore, so that no answer is
    shared: each request costs its own queries and rendering (``--distinct``)."""
    return f"{path}{'&' if '?' in path else '?'}_={client}.{request}"


async def _drive(host: str, port: int, path: str, clients: int, requests: int, unshared: bool = False
                 ) -> tuple[list[float], dict[int | str, int], float]:
    """``clients`` clients each asking ``path`` ``requests`` times in a row; latencies, statuses, seconds taken."""
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    conns = [Client(host, port) for _ in range(clients)]
    # Warm up: connections and caches.
    await asyncio.gather(*(c.get(distinct(path, n, -1) if unshared else path) for n, c in enumerate(conns)),
                         return_exceptions=True)

    async def one(n: int, client: Client) -> None:
        for i in range(requests):
            t0 = time.perf_counter()
            try:
                code: int | str = (await client.get(distinct(path, n, i) if unshared else path))[0]
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:  # counted; the server's log says why
                code = type(exc).__name__
            latencies.append(time.perf_counter() - t0)
            statuses[code] = statuses.get(code, 0) + 1

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(n, c) for n, c in enumerate(conns)))
        return latencies, statuses, time.perf_counter() - t0
    finally:
        for c in conns:
            await c.close()


def select1_floor(url: str, clients: int, requests: int) -> list[float]:
    """Seconds per ``SELECT 1`` round trip, ``clients`` threads at once, each on its own psycopg connection."""
    import psycopg

    conns = [psycopg.connect(url, autocommit=True) for _ in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def run(conn: Any) -> None:
        mine = []
        barrier.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    try:
        threads = [threading.Thread(target=run, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for c in conns:
            c.close()
    return latencies


def wait_ready(base: str, children: Children, timeout: float = 60.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        children.check()
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"p3s web did not answer on {base} within {timeout:.0f}s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_speed() -> float:
    """CPU milliseconds a fixed pure-Python loop takes now: on a shared machine, how much of a core
    a process gets (the other processes' cache and memory traffic slow it too); compare runs by it."""
    t0 = time.process_time()
    total = 0
    for i in range(3_000_000):
        total += i
    return 1000 * (time.process_time() - t0)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time so far of process ``pid`` and of its children (``web.workers``; Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def ms(values: list[float], q: float) -> float:
    return 1000 * quantile(sorted(values), q)


def run_load(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    print(f"  a fixed Python loop took {python_speed():.0f} ms of CPU; load average {os.getloadavg()[0]:.1f}")
    floor = select1_floor(url, args.clients, args.requests * 4)
    out.append({"label": "floor", "path": "floor: SELECT 1 (psycopg)", "p50": ms(floor, 0.5),
                "p95": ms(floor, 0.95), "count": len(floor), "statuses": {}, "rps": float("nan"), "goal": None})
    _print_row(out[0])
    with tempfile.TemporaryDirectory(prefix="p3s-bench-web-") as tmp, scratch_vhost("p3s-bench-web") as broker:
        state = Path(tmp)
        ids = sample_ids(url, state / "job.log")
        env = {**p3s_environ(broker, url, state, "WARNING"), "P3S_WEB_NOMINAL_PILOTS": "200",
               "P3S_WEB_WORKERS": str(args.workers)}
        port = free_port()
        children = Children(env, state)
        server = children.start("web", "web", "--bind", f"127.0.0.1:{port}")
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, children)
            for label, path in pages(ids):
                if args.only and not any(o in path for o in args.only):
                    continue
                cpu0, server0 = time.process_time(), cpu_seconds(server.pid)
                latencies, statuses, took = asyncio.run(_drive("127.0.0.1", port, path, args.clients,
                                                               args.requests, args.distinct))
                cpu, server_cpu = time.process_time() - cpu0, cpu_seconds(server.pid) - server0
                goal = None if label.startswith("healthz") else GOAL_MS.get(label, DEFAULT_GOAL_MS)
                row = {"label": label, "path": path, "p50": ms(latencies, 0.5), "p95": ms(latencies, 0.95),
                       "count": len(latencies), "statuses": statuses, "rps": len(latencies) / took, "goal": goal,
                       "client_cpu_ms": 1000 * cpu / max(1, len(latencies)),
                       # The warm-up requests are in it too: one more per client.
                       "server_cpu_ms": 1000 * server_cpu / max(1, len(latencies) + args.clients)}
                out.append(row)
                _print_row(row)
                children.check()
        finally:
            children.stop()
            if any(set(r["statuses"]) - {200} for r in out):
                print("\nthe server's log ends:\n" + (state / "web.log").read_text(errors="replace")[-3000:])
    return out


def _print_row(r: dict[str, Any]) -> None:
    bad = {k: v for k, v in r["statuses"].items() if k != 200}
    verdict = "" if r["goal"] is None else ("ok" if r["p95"] <= r["goal"] else f"OVER {r['goal']:.0f}")
    print(f"  {r['path'][:58]:58s} {r['p50']:8.1f} {r['p95']:8.1f} {r.get('rps', 0):7.0f}"
          f" {r.get('server_cpu_ms', 0):7.2f} {r.get('client_cpu_ms', 0):7.2f}  {verdict}"
          f"{'  non-200: ' + str(bad) if bad else ''}", flush=True)


# -- EXPLAIN ANALYZE of the pages' statements -----------------------------------------------


def explain(url: str, threshold_ms: float) -> None:
    """Run the pages' queries here, catching each statement, and EXPLAIN ANALYZE the slow ones."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from p3s import db
    from p3s.config import load_settings
    from p3s.dispatcher import admin
    from p3s.web import queries

    engine = db.make_engine(url)
    caught: list[tuple[str, str, Any]] = []
    current = ["?"]

    @event.listens_for(engine, "before_cursor_execute")
    def _catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        caught.append((current[0], statement, parameters))

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, {"P3S_DATABASE_URL": url, "P3S_STATE_DIR": tmp})
        ids = sample_ids(url, Path(tmp) / "job.log")
        now = time.time()
        calls = {
            "overview": lambda s: queries.overview(s, settings, now, ask_broker=False),
            "files": lambda s: admin.list_files(s),
            "files name": lambda s: admin.list_files(s, name=ids["name"]),
            "files shed": lambda s: admin.list_files(s, decision="shed"),
            "files day": lambda s: admin.list_files(s, since=ids["since"], until=ids["until"]),
            "workflows": lambda s: admin.list_workflows(s),
            "workflows state+template": lambda s: admin.list_workflows(s, state="incomplete", template="multi_root"),
            "workflow": lambda s: queries.workflow(s, ids["workflow"]),
            "jobs": lambda s: admin.list_jobs(s),
            "jobs lost": lambda s: admin.list_jobs(s, state="lost"),
            "jobs template+node": lambda s: admin.list_jobs(s, template="monitor", node="monitor"),
            "jobs pilot": lambda s: admin.list_jobs(s, pilot_id="pilot-123"),
            "job": lambda s: queries.job(s, settings, ids["job"]),
            "pilots": lambda s: queries.pilot_rows(s, now),
            "templates": lambda s: admin.list_templates(s),
            "priorities": lambda s: admin.list_priorities(s),
            "sampling": lambda s: queries.sampling(s, settings, now),
        }
        for label, call in calls.items():
            current[0] = label
            t0 = time.perf_counter()
            try:
                with Session(engine) as s:
                    call(s)
            except Exception as exc:  # a query that changed shape is reported, the others still run
                print(f"{label}: {type(exc).__name__}: {exc}")
            print(f"{label:28s} {1000 * (time.perf_counter() - t0):8.1f} ms in Python and SQL")
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        per_page: dict[str, list[float]] = {}
        for label, statement, parameters in caught:
            # The fastest of three: the machine is shared, and the others' noise only adds.
            took = float("inf")
            for _ in range(3):
                cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters)
                plan = cur.fetchone()[0][0]
                took = min(took, plan["Execution Time"] + plan.get("Planning Time", 0.0))
            per_page.setdefault(label, []).append(took)
            if took >= threshold_ms:
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
                text = "\n".join("    " + r[0] for r in cur.fetchall())
                print(f"\n[{label}] {took:.1f} ms: {' '.join(statement.split())[:300]}\n{text}")
        raw.rollback()
        print("\nin PostgreSQL (planning and execution), per page: statements, total ms, slowest ms")
        for label, times in per_page.items():
            print(f"  {label:28s} {len(times):3d} {sum(times):8.1f} {max(times):8.1f}")
    finally:
        raw.close()
        engine.dispose()


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=10, help="requests per client per page")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep", action="store_true", help=f"leave the database {DATABASE} for --reuse")
    keep.add_argument("--reuse", action="store_true", help=f"use the kept {DATABASE} if it is filled, and keep it")
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the pages' statements, no load")
    parser.add_argument("--explain-ms", type=float, default=2.0)
    parser.add_argument("--only", action="append", help="drive only the pages whose path contains this")
    parser.add_argument("--distinct", action="store_true",
                        help="make every request unlike the others (an ignored parameter), so no answer is shared")
    parser.add_argument("--workers", type=int, default=1, help="web.workers of the server (default 1)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    interrupt_on_sigterm()
    url = database_url()
    keep_it = args.keep or args.reuse or args.explain
    try:
        have = filled(url) if args.reuse else 0
        if have:
            print(f"reusing {DATABASE}: {have} jobs")
            from p3s import db

            db.upgrade(url)  # a newer p3s may have added revisions since it was kept
        else:
            _admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            _admin(f'CREATE DATABASE "{DATABASE}"')
            took = fill(url, args.jobs)
            print("filled in " + ", ".join(f"{k} {v:.1f}s" for k, v in took.items()))
        print("rows: " + ", ".join(f"{k} {v}" for k, v in counts(url).items()))
        if args.explain:
            explain(url, args.explain_ms)
            return 0
        print(f"\n{args.clients} concurrent clients, {args.requests} requests each per page; ms; goal on p95")
        print(f"  {'page':58s} {'p50':>8s} {'p95':>8s} {'req/s':>7s} {'srvCPU':>7s} {'cliCPU':>7s}"
              "  (CPU: ms per request, of the server process and of this one)")
        rows = run_load(url, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"clients": args.clients, "requests": args.requests,
                                                   "counts": counts(url), "rows": rows}, indent=2) + "\n")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if not keep_it:
            _admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        else:
            print(f"kept database {DATABASE} (drop it with: DROP DATABASE {DATABASE})")


if __name__ == "__main__":
    sys.exit(main())
