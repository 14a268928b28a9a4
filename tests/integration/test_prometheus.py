"""Debian's Prometheus, run with the shipped scrape config and alert rules, scrapes real p3s daemons.

The dispatcher, a watcher and a pilot run as ``p3s`` subprocesses, each serving
/metrics on its own loopback port (prometheus_client serves the whole registry
of a process, so one process per daemon is how they run in production too).
Files dropped into the watched directory run a two-stage workflow each; the
Prometheus HTTP API then answers for the latency histograms and the outcome
counters with exactly what happened.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.orm import Session

from p3s import db
from p3s.dispatcher import admin
from tests.conftest import unavailable
from tests.stack import env_for, graphml, make_settings, probe_command, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "prometheus"
FILES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bytes(response.read())
    except (urllib.error.URLError, OSError):
        return None


class Processes:
    """Subprocesses started by the test, each stopped by its own PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def tails(self, lines: int = 15) -> str:
        """The end of every log, for a failure message."""
        return "\n".join(
            f"--- {name} (exit {proc.poll()}):\n" + "\n".join(self.log(name).splitlines()[-lines:])
            for name, proc in self.started
        )

    def stop(self) -> None:
        for _name, proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in reversed(self.started):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        unavailable("Prometheus", "the prometheus binary is not installed (Debian package prometheus)")
    return str(path)


def scrape_config(ports: dict[str, int]) -> dict[str, Any]:
    """The shipped config, its targets replaced by the test's ports, scraping every second."""
    config = yaml.safe_load((SHIPPED / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    config["rule_files"] = [str(SHIPPED / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    return config


class PromAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def get(self, path: str, **params: str) -> Any:
        body = http_get(f"{self.base}/{path}?{urllib.parse.urlencode(params)}")
        if body is None:
            return None
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query's vector as {sorted labels: value}; empty if Prometheus has nothing."""
        data = self.get("query", query=expr)
        if data is None:
            return {}
        assert data["resultType"] == "vector", data
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, result
        return next(iter(result.values()), None)


def test_prometheus_scrapes_p3s(
    tmp_path: Path, broker_url: str, database_url: str, prometheus_binary: str, processes: Processes
) -> None:
    settings = make_settings(tmp_path, broker_url, database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env.update(env_for(settings))
    env["P3S_DISPATCHER_REAP_INTERVAL_S"] = "0.5"  # gauges refresh with the reaper
    p3s = [sys.executable, "-m", "p3s"]

    template = tmp_path / "probe.graphml"
    template.write_text(
        graphml(
            {"decode": {"command": probe_command("{input}")}, "monitor": {"command": probe_command()}},
            edges=[("decode", "monitor")],
            budget_s=120,
        )
    )
    # Only `p3s db upgrade` creates the schema on a server database; `dag import` then records into it.
    subprocess.run([*p3s, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=60)
    subprocess.run([*p3s, "dag", "import", "--name", "probe", str(template)], env=env, check=True,
                   capture_output=True, timeout=60)

    ports = {"p3s-dispatcher": free_port(), "p3s-watcher": free_port(), "p3s-pilot": free_port()}
    watch = tmp_path / "incoming"
    watch.mkdir()
    processes.start("dispatcher", [*p3s, "dispatcher"], {**env, "P3S_METRICS_PORT": str(ports["p3s-dispatcher"])})
    processes.start("watcher", [*p3s, "watcher", "--watch", str(watch)],
                    {**env, "P3S_METRICS_PORT": str(ports["p3s-watcher"])})
    processes.start("pilot", [*p3s, "pilot", "--metrics-port", str(ports["p3s-pilot"])], env)

    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(ports)))
    processes.start("prometheus", [
        prometheus_binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ])
    prom = PromAPI(prom_port)

    for job, port in ports.items():
        wait_for(lambda port=port: http_get(f"http://127.0.0.1:{port}/metrics"), timeout=30, what=f"{job} /metrics")
    wait_for(lambda: "watcher: following" in processes.log("watcher"), timeout=30, what="the watcher to start")
    up = wait_for(lambda: (q := prom.query("up == 1")) and len(q) == 3 and q, timeout=30, what="all targets up")
    assert {dict(labels)["job"] for labels in up} == set(ports)
    # The dispatcher exports the template's budget, and its latency series at zero, before any file:
    # so rate() sees the first workflows too.
    wait_for(lambda: prom.value('p3s_template_budget_seconds{template="probe"}') == 120, timeout=20,
             what="the template's budget in Prometheus")
    assert prom.value('sum(p3s_seen_to_done_seconds_count{template="probe"})') == 0

    for i in range(FILES):
        (watch / f"run{i}.dat").write_bytes(b"x" * 10)

    engine = db.make_engine(database_url)
    try:
        def finished() -> bool:
            with Session(engine) as s:
                flows = admin.list_workflows(s, limit=100)
            return len(flows) == FILES and all(w["state"] == "finished" for w in flows)

        try:
            wait_for(finished, timeout=40, what=f"{FILES} workflows to finish")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{processes.tails()}") from None
    finally:
        engine.dispose()

    # The latency histogram: one observation per workflow, as scraped from the dispatcher.
    done = 'sum(p3s_seen_to_done_seconds_count{job="p3s-dispatcher", template="probe", state="finished"})'
    wait_for(lambda: prom.value(done) == FILES, timeout=20, what=f"Prometheus to count {FILES} workflows done")
    # As the dashboard and the latency alert compute it: a quantile of the rate over a window.
    median = wait_for(
        lambda: (v := prom.value('histogram_quantile(0.5, sum by (le) (rate(p3s_seen_to_done_seconds_bucket[1m])))'))
        and not math.isnan(v) and v,
        timeout=10, what="a median seen -> done latency",
    )
    assert 0 < median < 60, median
    hops = {
        "p3s_seen_to_created_seconds": FILES,
        "p3s_queued_to_started_seconds": 2 * FILES,
        "p3s_run_seconds": 2 * FILES,
    }
    for hop, count in hops.items():
        assert prom.value(f'sum({hop}_count{{template="probe"}})') == count, hop
        p95 = prom.value(f"histogram_quantile(0.95, sum by (le) ({hop}_bucket))")
        assert p95 is not None and 0 <= p95 < 60, (hop, p95)

    # Outcome counters: every job finished, by stage; files accepted; the pilot's own view agrees.
    # (Every terminal state of every stage is exported, at zero until it happens.)
    jobs = prom.query('sum by (node, state) (p3s_jobs_total{job="p3s-dispatcher"}) > 0')
    assert jobs == {(("node", "decode"), ("state", "finished")): FILES,
                    (("node", "monitor"), ("state", "finished")): FILES}, jobs
    assert prom.query('sum by (state) (p3s_workflows_total{template="probe"})') == {
        (("state", "finished"),): FILES, (("state", "incomplete"),): 0
    }
    assert prom.query("sum by (stream, decision) (p3s_files_total)") == {
        (("decision", "accepted"), ("stream", "raw")): FILES
    }
    assert prom.value('sum(p3s_tasks_enqueued_total{queue="p3s.tasks.default"})') == 2 * FILES
    # The pilot's and the watcher's own counters, from their own targets (scraped at their own pace).
    pilot_done = 'sum(p3s_pilot_tasks_total{job="p3s-pilot", outcome="finished"})'
    wait_for(lambda: prom.value(pilot_done) == 2 * FILES, timeout=10, what="the pilot's own count")
    published = 'sum(p3s_watcher_events_published_total{job="p3s-watcher"})'
    wait_for(lambda: prom.value(published) == FILES, timeout=10, what="the watcher's own count")
    assert prom.value("sum(p3s_invalid_messages_total) or vector(0)") == 0

    # Gauges, refreshed by the dispatcher's reaper: one live pilot, nothing left queued.
    for expr, expected in (
        ('sum(p3s_pilots{state=~"idle|busy"})', 1),
        ('max(p3s_oldest_queued_task_age_seconds{job="p3s-dispatcher"})', 0),
        ('max(p3s_queue_depth{queue="p3s.tasks.default"})', 0),
    ):
        wait_for(lambda expr=expr, expected=expected: prom.value(expr) == expected, timeout=10, what=expr)

    # The shipped alert rules loaded, and none of them fires on this healthy system.
    groups = prom.get("rules")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    shipped = yaml.safe_load((SHIPPED / "alerts.yml").read_text())
    assert loaded == {r["alert"] for g in shipped["groups"] for r in g["rules"]}
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    assert prom.get("alerts")["alerts"] == []
