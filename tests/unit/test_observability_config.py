"""The shipped Prometheus and Grafana configuration uses only what p3s exports, and promtool accepts it."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from p3s import metrics
from tests.conftest import unavailable

CONFIG = Path(__file__).resolve().parents[2] / "config"
PROMETHEUS = CONFIG / "prometheus"
DASHBOARD = CONFIG / "grafana" / "p3s-dashboard.json"

# The sample names prometheus_client exposes for a metric of each type.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
# Labels Prometheus adds to every scraped series, and the histogram's bucket label.
TARGET_LABELS = {"job", "instance"}

METRIC = re.compile(r"\b(p3s_[A-Za-z0-9_]*)")
SELECTOR = re.compile(r"\b(p3s_[A-Za-z0-9_]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def declared() -> list[MetricWrapperBase]:
    return [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]


def exported() -> dict[str, MetricWrapperBase]:
    """Every sample name p3s exposes, mapped to the metric it belongs to."""
    return {m._name + suffix: m for m in declared() for suffix in SUFFIXES[m._type]}


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for group in rules["groups"] for r in group["rules"]]


def _walk(node: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        title = node.get("title") or node.get("name") or where
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield title, value
            elif key == "query" and isinstance(value, str | dict):
                yield from ([(title, value)] if isinstance(value, str) else _walk(value, title))
            else:
                yield from _walk(value, title)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, where)


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(title, expr) for title, expr in _walk(dashboard, "dashboard") if "p3s_" in expr]


def all_expressions() -> list[tuple[str, str]]:
    return [(f"alert {a}", e) for a, e in alert_expressions()] + [
        (f"panel {t!r}", e) for t, e in dashboard_expressions()
    ]


# -- the metrics themselves ----------------------------------------------------------


def test_every_metric_is_named_documented_and_in_seconds() -> None:
    found = declared()
    assert len(found) >= 20
    for m in found:
        assert m._name.startswith("p3s_"), m._name
        assert m._documentation.strip(), f"{m._name} has no help string"
        if m._type == "histogram":
            assert m._name.endswith("_seconds"), f"histogram {m._name} is not in seconds"
        assert not re.search(r"_(ms|millis|milliseconds|minutes|hours)\b", m._name), m._name


def test_metrics_are_declared_only_in_p3s_metrics() -> None:
    for module in ("p3s.cli", "p3s.app", "p3s.dispatcher.service", "p3s.pilot.service", "p3s.watcher.service"):
        importlib.import_module(module)
    in_registry = {f.name for f in REGISTRY.collect() if f.name.startswith("p3s_")}
    assert in_registry == {m._name for m in declared()}


def test_every_hop_has_a_histogram() -> None:
    names = {m._name for m in declared() if m._type == "histogram"}
    assert {
        "p3s_seen_to_created_seconds",
        "p3s_queued_to_started_seconds",
        "p3s_run_seconds",
        "p3s_seen_to_done_seconds",
    } <= names


# -- the configuration uses exactly those --------------------------------------------


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    names = exported()
    used: set[str] = set()
    for where, expr in all_expressions():
        for name in METRIC.findall(QUOTED.sub('""', expr)):
            assert name in names, f"{where}: {name} is not a metric p3s exports (see p3s/metrics.py): {expr}"
            used.add(names[name]._name)
    # The dashboard and the alerts between them show every metric p3s has.
    assert used == {m._name for m in declared()}


def test_label_names_in_expressions_exist() -> None:
    names = exported()
    for where, expr in all_expressions():
        bare = QUOTED.sub('""', expr)
        labels_here = set(TARGET_LABELS)
        for name in METRIC.findall(bare):
            metric = names[name]
            labels_here |= set(metric._labelnames) | ({"le"} if name.endswith("_bucket") else set())
        for name, matchers in SELECTOR.findall(bare):
            allowed = set(names[name]._labelnames) | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            for label in MATCHER.findall(matchers):
                assert label in allowed, f"{where}: {name} has no label {label!r}"
        for group in GROUPING.findall(bare):
            for label in filter(None, (s.strip() for s in group.split(","))):
                assert label in labels_here, f"{where}: no metric of the expression has label {label!r}"


def test_dashboard_shows_each_hop_per_template() -> None:
    exprs = [e for _t, e in dashboard_expressions()]
    for hop in ("p3s_seen_to_created_seconds", "p3s_queued_to_started_seconds", "p3s_run_seconds",
                "p3s_seen_to_done_seconds"):
        per_template = [e for e in exprs if f"{hop}_bucket" in e and "histogram_quantile" in e and "template" in e]
        assert per_template, f"no percentile panel per template for {hop}"


def test_scrape_config_has_a_job_per_daemon() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"p3s-dispatcher", "p3s-watcher", "p3s-pilot"}
    for job in jobs.values():
        [targets] = job["static_configs"]
        assert all(t.startswith("127.0.0.1:") for t in targets["targets"])
    assert config["rule_files"] == ["alerts.yml"]


# -- promtool --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool", "not installed (Debian package prometheus)")
    return str(path)


def run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_config(promtool: str) -> None:
    run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_promtool_check_rules(promtool: str) -> None:
    run(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))


def test_promtool_alerts_fire(promtool: str, tmp_path: Path) -> None:
    """alerts_test.yml shows every rule firing on series shaped like p3s's (labels only)."""
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    assert tested == {name for name, _e in alert_expressions()}, "every alert has a test"
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    run(promtool, "test", "rules", str(tmp_path / "alerts_test.yml"))
