"""Running p3s's parts in a test, on the embedded default or on real servers."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from sqlalchemy.orm import Session

from p3s import app, db
from p3s.config import Settings, SourceSettings, load_settings
from p3s.dagengine import parse_graphml
from p3s.dispatcher import admin

PROBE = Path(__file__).parent / "payloads" / "probe.py"


def probe_command(*extra: str) -> str:
    """A command line running the probe payload, recording into its {outdir}."""
    return " ".join([sys.executable, str(PROBE), "--out", "{outdir}", *extra])


def make_settings(tmp_path: Path, broker_url: str = "", database_url: str = "", **env: str) -> Settings:
    environ = {
        "P3S_STATE_DIR": str(tmp_path / "state"),
        "P3S_PILOT_WORK_ROOT": str(tmp_path / "work"),
        "P3S_PILOT_HEARTBEAT_S": "1",
        "P3S_PILOT_KILL_GRACE_S": "1",
        "P3S_DISPATCHER_REAP_INTERVAL_S": "0.5",
        "P3S_BROKER_URL": broker_url,
        "P3S_DATABASE_URL": database_url,
        **env,
    }
    return load_settings(None, environ)


def env_for(settings: Settings) -> dict[str, str]:
    """The P3S_* variables that give a subprocess the same broker, database and directories."""
    return {
        "P3S_BROKER_URL": settings.broker.url,
        "P3S_DATABASE_URL": settings.database.url,
        "P3S_STATE_DIR": settings.state_dir,
        "P3S_PILOT_WORK_ROOT": settings.pilot.work_root,
        "P3S_PILOT_HEARTBEAT_S": str(settings.pilot.heartbeat_s),
    }


def graphml(nodes: Mapping[str, Mapping[str, Any]], edges: list[tuple[str, str]] = (),  # type: ignore[assignment]
            trigger: str = "*", budget_s: float = 120, name: str = "probe") -> str:
    """A GraphML template: every attribute declared as a string, as a hand-written file may."""
    keys = sorted({k for attrs in nodes.values() for k in attrs})
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">',
           '<key id="trigger" for="graph" attr.name="trigger" attr.type="string"/>',
           '<key id="budget_s" for="graph" attr.name="budget_s" attr.type="string"/>']
    out += [f'<key id="{k}" for="node" attr.name="{k}" attr.type="string"/>' for k in keys]
    out.append(f'<graph id="{name}" edgedefault="directed">')
    out.append(f'<data key="trigger">{escape(trigger)}</data><data key="budget_s">{budget_s}</data>')
    for node, attrs in nodes.items():
        out.append(f'<node id="{node}">')
        for k, v in attrs.items():
            value = json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else str(v)
            out.append(f'<data key="{k}">{escape(value)}</data>')
        out.append("</node>")
    out += [f'<edge source="{a}" target="{b}"/>' for a, b in edges]
    out.append("</graph></graphml>")
    return "\n".join(out)


class Stack:
    """Dispatcher, watcher and pilots in threads of this process."""

    def __init__(self, settings: Settings, watch: Path | None = None, pilots: int = 1,
                 pattern: str = "*") -> None:
        self.settings = settings
        sources = [SourceSettings(name="test", location=str(watch), pattern=pattern)] if watch else []
        self.group = app.build_group(settings, sources, pilots, reload_settings=None)
        assert self.group.dispatcher is not None
        self.engine = self.group.dispatcher.engine
        self.started = False

    def start(self) -> Stack:
        self.group.start()
        self.started = True
        return self

    def import_template(self, text: str, name: str = "probe") -> None:
        with Session(self.engine) as s, s.begin():
            admin.import_template(s, parse_graphml(text, name=name))

    def query(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with Session(self.engine) as s:
            return fn(s, *args, **kwargs)

    def jobs(self, **kwargs: Any) -> list[dict[str, Any]]:
        return self.query(admin.list_jobs, limit=100000, **kwargs)

    def files(self) -> list[dict[str, Any]]:
        return self.query(admin.list_files, limit=100000)

    def workflows(self) -> list[dict[str, Any]]:
        return self.query(admin.list_workflows, limit=100000)

    def pilots(self) -> list[dict[str, Any]]:
        return self.query(admin.list_pilots, limit=100000)

    def pilots_by_id(self) -> dict[str, dict[str, Any]]:
        return {p["id"]: p for p in self.pilots()}

    def audit(self, grace_s: float = 60.0) -> Any:
        from p3s.dispatcher.audit import run_audit

        return self.query(run_audit, time.time(), grace_s)

    def stop(self) -> None:
        if self.started:
            self.group.stop()
            self.group.join(15)
            assert not self.group.alive(), "a part did not stop"
            assert not self.group.errors, self.group.errors
        self.engine.dispose()


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the timeout."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def terminal_jobs(stack: Stack, count: int) -> list[dict[str, Any]] | None:
    jobs = stack.jobs()
    done = [j for j in jobs if j["state"] not in ("pending", "queued", "running")]
    return sorted(done, key=lambda j: j["id"]) if len(done) >= count else None


def upgrade(settings: Settings) -> None:
    db.upgrade(settings.database_url)
