"""How long the read-only commands take on the embedded default, against the interpreter's own floor.

    python bench/cli.py [--runs 15] [--rows 2000]

Makes a scratch state directory with an SQLite database at the current schema,
``--rows`` files with one workflow and one job each and a template, then runs
each command ``--runs`` times as a fresh process (as an operator types it) and
prints the median and the fastest wall time, and the median CPU time (user +
system: the steadier figure on a busy host).  Floors come first: ``python -c
pass`` (starting the interpreter), ``import p3s``, ``import sqlalchemy.orm``
(what a command reading the records through SQLAlchemy must load) and
``import p3s.cli, p3s.config, sqlite3`` (what the embedded default's listings
load: they read SQLite with the standard library, p3s/listings.py).  Run by
hand, never in the test suite; figures go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COMMANDS = [
    ("python -c pass", [sys.executable, "-c", "pass"]),
    ('python -c "import p3s"', [sys.executable, "-c", "import p3s"]),
    # The floor of any command that reads the records through SQLAlchemy.
    ('python -c "import sqlalchemy.orm"', [sys.executable, "-c", "import sqlalchemy.orm"]),
    # The floor of the embedded default's listings, which read SQLite with the standard library.
    ('python -c "import p3s.cli, sqlite3"', [sys.executable, "-c", "import p3s.cli, p3s.config, sqlite3"]),
    ("p3s --help", [sys.executable, "-m", "p3s", "--help"]),
    ("p3s jobs", [sys.executable, "-m", "p3s", "jobs"]),
    ("p3s files", [sys.executable, "-m", "p3s", "files"]),
    ("p3s workflows", [sys.executable, "-m", "p3s", "workflows"]),
    ("p3s pilots", [sys.executable, "-m", "p3s", "pilots"]),
    ("p3s dag list", [sys.executable, "-m", "p3s", "dag", "list"]),
    ("p3s status", [sys.executable, "-m", "p3s", "status"]),
]


def populate(state: Path, rows: int) -> None:
    from sqlalchemy.orm import Session

    from p3s import db
    from p3s.config import load_settings
    from p3s.dagengine import parse_graphml
    from p3s.db import FileRecord, Job, Pilot, Workflow
    from p3s.demo import DEMO_TEMPLATE
    from p3s.dispatcher import admin

    url = load_settings(None, {"P3S_STATE_DIR": str(state)}).database_url
    db.upgrade(url)
    engine = db.make_engine(url)
    now = time.time()
    with Session(engine) as s, s.begin():
        tpl = admin.import_template(s, parse_graphml(DEMO_TEMPLATE, name="demo"))
        for i in range(rows):
            f = FileRecord(name=f"run{i:06d}.hdf5", path=f"/data/run{i:06d}.hdf5", stream="raw", seen_at=now - i,
                           received_at=now - i, decision="accepted")
            s.add(f)
            s.flush()
            w = Workflow(file_id=f.id, template_id=tpl.id, template="demo", state="finished", seen_at=now - i,
                         created_at=now - i, deadline=now - i + 60, ended_at=now - i + 2)
            s.add(w)
            s.flush()
            s.add(Job(workflow_id=w.id, template="demo", node="checksum", state="finished", queue="default",
                      priority=0, deadline=now - i + 60, wall_s=30, created_at=now - i, started_at=now - i + 0.1,
                      ended_at=now - i + 1, exit_code=0))
        s.add(Pilot(id="bench-1", host="h", pid=1, queues="default", state="idle", started_at=now, last_seen=now))
    engine.dispose()


def measure(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) seconds of each run; CPU time is the steadier on a busy host."""
    times, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return times, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="p3s-bench-cli-") as tmp:
        state = Path(tmp) / "state"
        populate(state, args.rows)
        env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
        env.update(P3S_STATE_DIR=str(state), PYTHONPATH=str(REPO))
        print(f"{args.runs} runs each, {args.rows} files/workflows/jobs, embedded default (SQLite)")
        print(f"{'command':34} {'median_s':>9} {'min_s':>7} {'cpu_median_s':>13}")
        for name, argv in COMMANDS:
            times, cpu = measure(argv, env, args.runs)
            print(f"{name:34} {statistics.median(times):9.3f} {min(times):7.3f} {statistics.median(cpu):13.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
