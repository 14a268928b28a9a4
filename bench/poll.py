"""Cost of one scan of the poll source on a large tree, against a full walk as the floor.

    python bench/poll.py [--files 100000] [--dirs 1000] [--new 10] [--scans 5] [--dir DIR]

Builds DIR (default: a temporary directory) with FILES old files in DIRS run
directories, starts a poll source on it (the start-up scan), then for each of
SCANS rounds writes NEW files into the two newest run directories and times one
scan.  The floor is a full os.walk + os.stat of the same tree in the same run.
System calls are counted by wrapping os.stat and os.scandir (each listing also
costs a few getdents64 calls per 1 000 entries); with --strace, each measured
phase is also run under ``strace -c -f`` in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p3s.config import SourceSettings
from p3s.watcher import poll
from p3s.watcher.files import Selector
from p3s.watcher.poll import PollSource

DAY = 86400.0


def build(root: Path, files: int, dirs: int) -> None:
    old = time.time() - DAY
    per_dir = files // dirs
    for i in range(dirs):
        d = root / f"run{i:06d}"
        d.mkdir()
        for j in range(per_dir):
            p = d / f"f{j:05d}.dat"
            p.touch()
            os.utime(p, (old, old))
        os.utime(d, (old + i, old + i))  # run directories in order of age
    os.utime(root, (old, old))


def counting() -> dict[str, int]:
    calls = {"stat": 0, "scandir": 0}

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return counted

    poll.os.stat = wrap("stat", os.stat)  # type: ignore[attr-defined]
    poll.os.scandir = wrap("scandir", os.scandir)  # type: ignore[attr-defined]
    return calls


def full_walk(root: Path) -> int:
    n = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            os.stat(os.path.join(dirpath, name))
            n += 1
    return n


def measure(root: Path, scans: int, new: int) -> dict[str, Any]:
    real_stat, real_scandir = os.stat, os.scandir
    calls = counting()
    try:
        source = PollSource(
            SourceSettings(name="bench", kind="poll", location=str(root), pattern="*.dat"),
            Selector("*.dat", (".*",)),
            3600.0,
        )
        t0 = time.perf_counter()
        source.scan(3600.0)
        first = {"seconds": time.perf_counter() - t0, **calls}
        newest = sorted(p for p in root.iterdir() if p.is_dir())[-2:]
        per_scan = []
        for k in range(scans):
            for i in range(new):
                (newest[i % 2] / f"new{k:03d}_{i:03d}.dat").write_bytes(b"x")
            calls.update(stat=0, scandir=0)
            t0 = time.perf_counter()
            source.read()
            per_scan.append({"seconds": time.perf_counter() - t0, **calls})
    finally:
        os.stat, os.scandir = real_stat, real_scandir  # type: ignore[misc]
    t0 = time.perf_counter()
    n = full_walk(root)
    floor = {"seconds": time.perf_counter() - t0, "files": n}
    return {"first_scan": first, "scans": per_scan, "floor_walk": floor}


def strace_counts(root: Path, new: int) -> dict[str, Any]:
    """Syscalls of one steady-state scan and of one full walk, each traced alone with strace -c -f.

    The child prepares (imports, start-up scan), stops itself, and strace
    attaches before it goes on, so interpreter start-up is not counted.
    """
    child = """
import os, sys
from pathlib import Path
from p3s.config import SourceSettings
from p3s.watcher.files import Selector
from p3s.watcher.poll import PollSource
root = Path(sys.argv[1]); mode = sys.argv[2]; new = int(sys.argv[3])
if mode == "scan":
    src = PollSource(SourceSettings(name="b", kind="poll", location=str(root), pattern="*.dat"),
                     Selector("*.dat", (".*",)), 3600.0)
    src.scan(3600.0)
    src.read()
    newest = sorted(p for p in root.iterdir() if p.is_dir())[-2:]
    for i in range(new):
        (newest[i % 2] / f"strace{i:03d}.dat").write_bytes(b"x")
sys.stderr.write("ready\\n"); sys.stderr.flush()
os.kill(os.getpid(), 19)  # SIGSTOP: the parent attaches strace now
if mode == "scan":
    src.read()
else:
    for d, _s, names in os.walk(root):
        for n in names:
            os.stat(os.path.join(d, n))
"""
    out: dict[str, Any] = {}
    for mode in ("scan", "walk"):
        proc = subprocess.Popen([sys.executable, "-c", child, str(root), mode, str(new)], stderr=subprocess.PIPE,
                                text=True)
        assert proc.stderr is not None
        proc.stderr.readline()
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as report:
            tracer = subprocess.Popen(["strace", "-c", "-f", "-U", "name,calls", "-o", report.name,
                                       "-p", str(proc.pid)])
            time.sleep(1.0)  # let strace attach before the child goes on
            os.kill(proc.pid, 18)  # SIGCONT
            proc.wait()
            tracer.wait(60)
            out[mode] = _calls(Path(report.name).read_text())
    return out


def _calls(report: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            calls[parts[0]] = int(parts[1])
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dirs", type=int, default=1_000)
    parser.add_argument("--new", type=int, default=10)
    parser.add_argument("--scans", type=int, default=5)
    parser.add_argument("--dir", default="")
    parser.add_argument("--strace", action="store_true", help="also count syscalls with strace -c -f")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="p3s-bench-poll-"))
    try:
        if not any(root.iterdir()):
            build(root, args.files, args.dirs)
        result = measure(root, args.scans, args.new)
        scans = result["scans"]
        result["summary"] = {
            "files": args.files,
            "dirs": args.dirs,
            "new_per_scan": args.new,
            "scan_seconds_median": statistics.median(s["seconds"] for s in scans),
            "scan_stat_calls_median": statistics.median(s["stat"] for s in scans),
            "scan_scandir_calls_median": statistics.median(s["scandir"] for s in scans),
            "floor_walk_seconds": result["floor_walk"]["seconds"],
        }
        if args.strace and shutil.which("strace"):
            result["strace"] = strace_counts(root, args.new)
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
