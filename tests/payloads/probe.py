"""A test payload: records what it was given, then behaves as asked.

    probe.py --out DIR [--exit N] [--sleep S] [--grandchild] [ARGS...]

Writes DIR/probe.json with its argv, the P3S_* environment, its working
directory and the time it started, so a test can check what p3s substituted.
"""

import argparse
import json
import os
import subprocess
import sys
import time

started = time.time()
parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--exit", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--grandchild", action="store_true")
parser.add_argument("--until", help="hold on until this file exists (at most 60 s)")
parser.add_argument("--read", help="a file to read and count the bytes of")
parser.add_argument("--parents", action="store_true", help="the rest are parent output dirs: read their records")
parser.add_argument("rest", nargs="*")
args = parser.parse_args()
record = {
    "argv": sys.argv[1:],
    "rest": args.rest,
    "env": {k: v for k, v in os.environ.items() if k.startswith("P3S_") or k.startswith("DQM_")},
    "cwd": os.getcwd(),
    "started": started,
    "pid": os.getpid(),
    "pgid": os.getpgid(0),
}
if args.read:
    with open(args.read, "rb") as fh:
        record["read_bytes"] = len(fh.read())
if args.parents:
    record["parents"] = {}
    for directory in args.rest:
        with open(os.path.join(directory, "probe.json")) as fh:
            record["parents"][directory] = json.load(fh)["pid"]
if args.grandchild:
    child = subprocess.Popen(["sleep", "1000"])
    record["grandchild"] = child.pid
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "probe.json"), "w") as fh:
    json.dump(record, fh)
print("probe: started", flush=True)
if args.sleep:
    time.sleep(args.sleep)
if args.until:
    end = time.time() + 60
    while not os.path.exists(args.until) and time.time() < end:
        time.sleep(0.05)
print("probe: exiting with", args.exit, flush=True)
sys.exit(args.exit)
