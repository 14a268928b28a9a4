"""DQM results on RabbitMQ and PostgreSQL, with the shipped example: runs, ``p3s results``, an alarm and its end.

The dispatcher and a pilot run as ``p3s`` processes.  The example template
(config/templates/dqm_results.graphml) runs the example payload on files of
two runs; each job leaves a PNG, a summary and a manifest with two metrics.
The config's range for ``mean_adc`` ([50, 150]) wins over the manifest's
([10, 200]): a file whose mean is 180 raises an alarm, which the dispatcher's
/metrics shows, and the next file, back at 100, clears it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from p3s.broker import Publisher
from p3s.config import load_settings
from p3s.messages import DataEvent
from p3s.results import query
from p3s.topology import events_exchange, events_queue, invalid_queue
from p3s.watcher.service import event_message
from tests.integration.test_outage import free_port
from tests.procs import ROOT, Parts, import_template
from tests.stack import make_settings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

TEMPLATE = ROOT / "config" / "templates" / "dqm_results.graphml"
PAYLOAD = ROOT / "config" / "templates" / "dqm_payload.py"
SHIPPED_COMMAND = "python3 /opt/p3s/config/templates/dqm_payload.py"


def publish(broker_url: str, path: Path) -> None:
    """The data event a watcher would publish for ``path``."""
    settings = load_settings(None, {"P3S_BROKER_URL": broker_url})
    publisher = Publisher(settings.broker, exchanges=[events_exchange], queues=[invalid_queue, events_queue])
    try:
        publisher.publish([event_message(DataEvent(path.name, str(path), "raw", time.time(), source="test"))])
    finally:
        publisher.close()


def alarm_gauges(port: int) -> dict[tuple[str, str], float]:
    """p3s_dqm_alarm from the dispatcher's /metrics: (template, metric) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.labels["template"], s.labels["metric"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "p3s_dqm_alarm"
            for s in family.samples}


def test_results_of_two_runs_an_alarm_and_its_clearing(tmp_path: Path, broker_url: str, database_url: str) -> None:
    ranges = json.dumps({"dqm_results": {"mean_adc": [50, 150]}})
    settings = make_settings(tmp_path, broker_url, database_url, P3S_RESULTS_RANGES=ranges)
    shipped = TEMPLATE.read_text()
    assert SHIPPED_COMMAND in shipped
    # The shipped file names where config/ is installed; here it is this tree, run by this interpreter.
    import_template(settings, shipped.replace(SHIPPED_COMMAND, f"{sys.executable} {PAYLOAD}"), name="dqm_results")
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()

    with Parts(tmp_path, settings, P3S_RESULTS_RANGES=ranges) as parts:
        dispatcher = parts.start("dispatcher", "dispatcher", P3S_METRICS_PORT=str(port))
        pilot = parts.start("pilot", "pilot")

        def results() -> list[dict[str, Any]]:
            return parts.query(query.list_results, template="dqm_results")

        def process(name: str, byte: int) -> dict[str, Any]:
            """One file whose every byte is ``byte``: its result once recorded."""
            path = data / name
            path.write_bytes(bytes([byte]) * 4096)
            before = len(results())
            publish(broker_url, path)
            parts.wait_for(lambda: len(results()) > before, timeout=30, what=f"the result of {name}",
                           alive=[dispatcher, pilot])
            newest = results()[0]
            assert newest["file"] == name
            return newest

        first = process("np04_raw_run000101_0001.hdf5", 100)
        process("np04_raw_run000101_0002.hdf5", 100)
        raising = process("np04_raw_run000102_0001.hdf5", 180)

        listed = parts.json("results", "--template", "dqm_results")
        assert [(r["run"], r["subrun"]) for r in listed] == [(102, 1), (101, 2), (101, 1)]
        assert [r["run"] for r in parts.query(query.list_results, run=101)] == [101, 101]
        assert all(r["on_time"] and 0 <= r["age_s"] <= r["budget_s"] == 300 for r in listed)
        metrics = {m["name"]: m for m in raising["metrics"]}
        assert (metrics["mean_adc"]["value"], metrics["mean_adc"]["lo"], metrics["mean_adc"]["hi"]) == (180, 50, 150)
        assert metrics["mean_adc"]["alarm"] and not metrics["occupancy"]["alarm"]
        # The files stay where the payload wrote them, recorded by size and checksum.
        plot = next(f for f in first["files"] if f["category"] == "adc")
        png = Path(first["outdir"]) / plot["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (plot["size"], plot["sha256"]) == (png.stat().st_size, hashlib.sha256(png.read_bytes()).hexdigest())

        (alarm,) = parts.query(query.list_alarms)
        assert (alarm["template"], alarm["metric"], alarm["value"], alarm["result_id"]) == (
            "dqm_results", "mean_adc", 180, raising["id"])
        parts.wait_for(lambda: alarm_gauges(port).get(("dqm_results", "mean_adc")) == 1.0, timeout=10,
                       what="the alarm in the dispatcher's /metrics")
        assert alarm_gauges(port).get(("dqm_results", "occupancy"), 0.0) == 0.0

        process("np04_raw_run000102_0002.hdf5", 100)
        parts.wait_for(lambda: alarm_gauges(port).get(("dqm_results", "mean_adc")) == 0.0, timeout=10,
                       what="the alarm cleared in the dispatcher's /metrics")
        assert parts.query(query.list_alarms) == []
        jobs = parts.db_jobs()
        assert len(jobs) == 4 and all(j["state"] == "finished" and not j["reason"] for j in jobs), jobs
        parts.assert_alive(dispatcher, pilot)
