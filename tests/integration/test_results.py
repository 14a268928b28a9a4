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


class Events:
    """Publishes the data events a watcher would, for the files of the test, on one connection."""

    def __init__(self, broker_url: str) -> None:
        settings = load_settings(None, {"P3S_BROKER_URL": broker_url})
        self.publisher = Publisher(settings.broker, exchanges=[events_exchange], queues=[invalid_queue, events_queue])

    def publish(self, *paths: Path) -> None:
        self.publisher.publish([event_message(DataEvent(p.name, str(p), "raw", time.time(), source="test"))
                                for p in paths])

    def close(self) -> None:
        self.publisher.close()


def alarm_gauges(port: int) -> dict[tuple[str, str], float]:
    """p3s_dqm_alarm from the dispatcher's /metrics: (template, metric) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.labels["template"], s.labels["metric"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "p3s_dqm_alarm"
            for s in family.samples}


def test_results_of_two_runs_an_alarm_and_its_clearing(tmp_path: Path, broker_url: str, database_url: str,
                                                       request: pytest.FixtureRequest) -> None:
    ranges = json.dumps({"dqm_results": {"mean_adc": [50, 150]}})
    settings = make_settings(tmp_path, broker_url, database_url, P3S_RESULTS_RANGES=ranges)
    shipped = TEMPLATE.read_text()
    assert SHIPPED_COMMAND in shipped
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()

    with Parts(tmp_path, settings, P3S_RESULTS_RANGES=ranges) as parts:
        pilot = parts.start("pilot", "pilot")  # it needs no database: it starts while the template is imported
        # The shipped file names where config/ is installed; here it is this tree, run by this interpreter.
        import_template(settings, shipped.replace(SHIPPED_COMMAND, f"{sys.executable} {PAYLOAD}"),
                        name="dqm_results")
        dispatcher = parts.start("dispatcher", "dispatcher", P3S_METRICS_PORT=str(port))

        events = Events(broker_url)
        request.addfinalizer(events.close)

        def results() -> list[dict[str, Any]]:
            return parts.query(query.list_results, template="dqm_results")

        def process(*files: tuple[str, int]) -> list[dict[str, Any]]:
            """Files whose every byte is the number given: their results once recorded, newest first."""
            paths = []
            for name, byte in files:
                paths.append(data / name)
                paths[-1].write_bytes(bytes([byte]) * 4096)
            before = len(results())
            events.publish(*paths)
            parts.wait_for(lambda: len(results()) >= before + len(files), timeout=30,
                           what=f"the results of {', '.join(name for name, _ in files)}", alive=[dispatcher, pilot])
            newest = results()[: len(files)]
            assert {r["file"] for r in newest} == {name for name, _ in files}
            return newest

        first = min(process(("np04_raw_run000101_0001.hdf5", 100), ("np04_raw_run000101_0002.hdf5", 100)),
                    key=lambda r: r["file"])
        (raising,) = process(("np04_raw_run000102_0001.hdf5", 180))

        listed = parts.json("results", "--template", "dqm_results")
        assert sorted((r["run"], r["subrun"]) for r in listed) == [(101, 1), (101, 2), (102, 1)]
        assert listed[0]["id"] == raising["id"], "newest first"
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

        process(("np04_raw_run000102_0002.hdf5", 100))
        parts.wait_for(lambda: alarm_gauges(port).get(("dqm_results", "mean_adc")) == 0.0, timeout=10,
                       what="the alarm cleared in the dispatcher's /metrics")
        assert parts.query(query.list_alarms) == []
        jobs = parts.db_jobs()
        assert len(jobs) == 4 and all(j["state"] == "finished" and not j["reason"] for j in jobs), jobs
        parts.assert_alive(dispatcher, pilot)
