"""``p3s demo``: the whole pipeline on the embedded default, in a temporary directory."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from p3s.config import SourceSettings, load_settings
from p3s.dagengine import parse_graphml
from p3s.db import FileRecord, Job, Workflow
from p3s.states import WorkflowState
from p3s.tables import print_table

log = logging.getLogger(__name__)

# Two stages: a checksum of the raw file, then a summary that reads what the
# checksum stage wrote.  Plain coreutils, so the demo runs anywhere.
DEMO_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<graphml xmlns="http://graphml.graphdrawing.org/xmlns">
  <key id="trigger" for="graph" attr.name="trigger" attr.type="string"/>
  <key id="budget" for="graph" attr.name="budget_s" attr.type="double"/>
  <key id="command" for="node" attr.name="command" attr.type="string"/>
  <key id="wall" for="node" attr.name="wall_s" attr.type="double"/>
  <key id="expected" for="node" attr.name="expected_s" attr.type="double"/>
  <graph id="demo" edgedefault="directed">
    <data key="trigger">run*.hdf5</data>
    <data key="budget">60</data>
    <node id="checksum">
      <data key="command">cp {input} {outdir}/copy.hdf5</data>
      <data key="wall">30</data>
      <data key="expected">1</data>
    </node>
    <node id="summary">
      <data key="command">ls -l {parent_outdirs}</data>
      <data key="wall">30</data>
      <data key="expected">1</data>
    </node>
    <edge source="checksum" target="summary"/>
  </graph>
</graphml>
"""


def run_demo(
    files: int = 5, pilots: int = 2, keep: bool = False, timeout_s: float = 60.0, web: str | None = None
) -> int:
    """Run watcher, dispatcher and pilots in-process, drop files, wait, print a summary.

    ``web`` (HOST:PORT, or "" for ``web.bind``): serve the web monitor beside them, and keep
    everything running after the files are done, until Ctrl-C.
    """
    from p3s import app
    from p3s.dispatcher import admin

    root = Path(tempfile.mkdtemp(prefix="p3s-demo-"))
    incoming = root / "incoming"
    incoming.mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    environ["P3S_STATE_DIR"] = str(root / "state")
    settings = load_settings(None, environ)
    group = app.build_group(
        settings,
        [SourceSettings(name="demo", kind="inotify", location=str(incoming), pattern="run*.hdf5", stream="raw")],
        pilots,
    )
    assert group.dispatcher is not None
    engine = group.dispatcher.engine
    with Session(engine) as s, s.begin():
        admin.import_template(s, parse_graphml(DEMO_TEMPLATE, name="demo"))
    if web is not None:
        from p3s.web.app import WebServer

        group.web = WebServer(settings, web or None, engine=engine, beside_pipeline=True)
    group.start()
    assert group.watcher is not None
    group.watcher.ready.wait(10)
    print(f"p3s demo in {root}: {pilots} pilot(s), embedded broker and SQLite", flush=True)
    try:
        for i in range(files):
            # Half written in place, half written under a temporary name and renamed,
            # the two ways a DAQ lands a file.
            target = incoming / f"run{1000 + i:05d}.hdf5"
            if i % 2:
                tmp = incoming / f".{target.name}.tmp"
                tmp.write_bytes(os.urandom(4096))
                tmp.rename(target)
            else:
                target.write_bytes(os.urandom(4096))
        print(f"wrote {files} file(s) to {incoming}; waiting for their workflows", flush=True)
        deadline = time.monotonic() + timeout_s
        shown = (-1, -1)
        while time.monotonic() < deadline:
            with Session(engine) as s:
                states = s.scalars(select(Workflow.state)).all()
            done = sum(st != WorkflowState.RUNNING for st in states)
            if (len(states), done) != shown:
                shown = (len(states), done)
                print(f"  {len(states)} of {files} file(s) have a workflow, {done} ended", flush=True)
            if len(states) >= files and done == len(states):
                break
            time.sleep(0.2)
        if group.web is not None:
            print(f"web monitor at {group.web.url}; drop more files into {incoming}; Ctrl-C to stop", flush=True)
            try:
                while group.alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    finally:
        group.stop()
        group.join(10)
    rows = []
    with Session(engine) as s:
        for f in s.scalars(select(FileRecord).order_by(FileRecord.name)):
            wfs = s.scalars(select(Workflow).where(Workflow.file_id == f.id)).all()
            for wf in wfs:
                for job in s.scalars(select(Job).where(Job.workflow_id == wf.id).order_by(Job.id)):
                    rows.append(
                        {
                            "file": f.name,
                            "job": f"{job.id} {job.node}",
                            "state": job.state,
                            "exit_code": job.exit_code,
                            "latency_s": (job.started_at - f.seen_at) if job.started_at else None,
                        }
                    )
            if not wfs:
                rows.append({"file": f.name, "job": "-", "state": f.decision, "exit_code": None, "latency_s": None})
        finished = s.scalars(select(Workflow.state)).all()
    print_table(rows, ["file", "job", "state", "exit_code", "latency_s"])
    ok = len(finished) == files and all(st == WorkflowState.FINISHED for st in finished)
    print(
        f"{sum(st == WorkflowState.FINISHED for st in finished)} of {files} workflow(s) finished"
        " (latency: file seen to job started, seconds)"
    )
    if keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1
