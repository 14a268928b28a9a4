"""DAG workflows on RabbitMQ + PostgreSQL: joins, outputs between stages, priorities, stage caps."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p3s import broker, topology
from tests.scenarios import read_probe
from tests.stack import Stack, env_for, graphml, make_settings, probe_command, terminal_jobs, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


def p3s_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``p3s`` command against the stack's broker and database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    env.update(env_for(stack.settings))
    return subprocess.run([sys.executable, "-m", "p3s", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=True)


def make_stack(tmp_path: Path, broker_url: str, database_url: str, pilots: int) -> tuple[Stack, Path]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    return Stack(make_settings(tmp_path, broker_url, database_url), watch=watch, pilots=pilots).start(), watch


@pytest.fixture
def two_pilots(tmp_path: Path, broker_url: str, database_url: str) -> Iterator[tuple[Stack, Path]]:
    stack, watch = make_stack(tmp_path, broker_url, database_url, pilots=2)
    try:
        yield stack, watch
        assert stack.audit().ok, stack.audit().problems
    finally:
        stack.stop()


@pytest.fixture
def one_pilot(tmp_path: Path, broker_url: str, database_url: str) -> Iterator[tuple[Stack, Path]]:
    stack, watch = make_stack(tmp_path, broker_url, database_url, pilots=1)
    try:
        yield stack, watch
        assert stack.audit().ok, stack.audit().problems
    finally:
        stack.stop()


def test_submit_force_reprocesses(one_pilot: tuple[Stack, Path]) -> None:
    stack, watch = one_pilot
    stack.import_template(graphml({"probe": {"command": probe_command("{input}")}}))
    path = watch / "run7.dat"
    path.write_bytes(b"x")
    wait_for(lambda: terminal_jobs(stack, 1), what="the first run")
    p3s_cli(stack, "submit", str(path))  # without --force: a duplicate
    wait_for(lambda: len(stack.files()) == 2, what="the plain resubmission")
    p3s_cli(stack, "submit", "--force", str(path))
    jobs = wait_for(lambda: terminal_jobs(stack, 2), what="the forced run")
    assert [j["state"] for j in jobs] == ["finished", "finished"]
    files = sorted(stack.files(), key=lambda f: f["id"])
    assert [(f["decision"], f["by_hand"], f["forced"]) for f in files] == [
        ("accepted", False, False),
        ("duplicate", True, False),
        ("accepted", True, True),
    ]
    assert len({j["workflow_id"] for j in jobs}) == 2


def test_diamond_on_two_pilots(two_pilots: tuple[Stack, Path]) -> None:
    stack, watch = two_pilots
    stack.import_template(
        graphml(
            {
                "decode": {"command": probe_command("{input}")},
                "monitor": {"command": probe_command("--sleep", "0.8", "--parents", "{parent_outdirs}")},
                "display": {"command": probe_command("--sleep", "0.8", "--parents", "{parent_outdirs}")},
                "summary": {"command": probe_command("--parents", "{parent_outdirs}")},
            },
            edges=[("decode", "monitor"), ("decode", "display"), ("monitor", "summary"), ("display", "summary")],
        )
    )
    (watch / "run42.dat").write_bytes(b"x" * 100)
    jobs = {j["node"]: j for j in wait_for(lambda: terminal_jobs(stack, 4), what="the diamond to end")}
    assert {n: j["state"] for n, j in jobs.items()} == dict.fromkeys(jobs, "finished")
    (wf,) = stack.workflows()
    assert wf["state"] == "finished" and wf["ended_at"] >= jobs["summary"]["ended_at"]
    seen = {n: read_probe(stack, j) for n, j in jobs.items()}
    # Each child read what its parents wrote, found through {parent_outdirs}.
    assert list(seen["monitor"]["parents"].values()) == [seen["decode"]["pid"]]
    assert list(seen["display"]["parents"].values()) == [seen["decode"]["pid"]]
    assert sorted(seen["summary"]["parents"].values()) == sorted([seen["monitor"]["pid"], seen["display"]["pid"]])
    # The join waited for both parents; the two middle stages ran side by side on two pilots.
    assert jobs["summary"]["started_at"] >= max(jobs["monitor"]["ended_at"], jobs["display"]["ended_at"])
    assert jobs["monitor"]["pilot_id"] != jobs["display"]["pilot_id"]
    assert jobs["monitor"]["started_at"] < jobs["display"]["ended_at"]
    assert jobs["display"]["started_at"] < jobs["monitor"]["ended_at"]


def test_raised_priority_overtakes_earlier_tasks(one_pilot: tuple[Stack, Path]) -> None:
    stack, watch = one_pilot
    release = watch.parent / "release-the-pilot"
    stack.import_template(graphml({"block": {"command": probe_command("--until", str(release))}}, trigger="block*"),
                          "block")
    stack.import_template(graphml({"scan": {"command": probe_command(), "priority": "3"}}, trigger="low*"), "low")
    stack.import_template(graphml({"plots": {"command": probe_command(), "priority": "1"}}, trigger="high*"), "high")
    (watch / "block.dat").write_bytes(b"x")
    wait_for(lambda: any(j["state"] == "running" for j in stack.jobs()), what="the pilot to be busy")
    for i in range(3):
        (watch / f"low{i}.dat").write_bytes(b"x")
    wait_for(lambda: sum(j["state"] == "queued" for j in stack.jobs()) == 3, what="three low tasks queued")
    out = p3s_cli(stack, "priority", "set", "high", "plots", "9").stdout
    assert "priority 9" in out
    listed = p3s_cli(stack, "priority", "list", "--json").stdout
    assert '"priority": 9' in listed
    (watch / "high0.dat").write_bytes(b"x")
    wait_for(lambda: sum(j["state"] == "queued" for j in stack.jobs()) == 4, what="the high task queued")
    release.touch()
    jobs = wait_for(lambda: terminal_jobs(stack, 5), timeout=60, what="all five jobs")
    by_node = {}
    for j in jobs:
        by_node.setdefault(j["node"], []).append(j)
    (high,) = by_node["plots"]
    assert high["priority"] == 9
    assert all(high["started_at"] < low["started_at"] for low in by_node["scan"])


def test_max_running_keeps_a_stage_serial(two_pilots: tuple[Stack, Path]) -> None:
    stack, watch = two_pilots
    stack.import_template(graphml({"purity": {"command": probe_command("--sleep", "0.6"), "max_running": "1"}}))
    for i in range(3):
        (watch / f"run{i}.dat").write_bytes(b"x")
    jobs = wait_for(lambda: terminal_jobs(stack, 3), timeout=60, what="three capped jobs")
    assert [j["state"] for j in jobs] == ["finished"] * 3
    spans = sorted((j["started_at"], j["ended_at"]) for j in jobs)
    for (_s1, e1), (s2, _e2) in zip(spans, spans[1:], strict=False):
        assert s2 >= e1, f"two jobs of a max_running=1 stage overlapped: {spans}"
    with broker.connect(stack.settings.broker) as conn:
        assert broker.queue_depth(conn, topology.task_queue("default")) == 0
