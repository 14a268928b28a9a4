"""A transaction the dispatcher retries is counted once in its metrics.

The dispatcher retries a batch when PostgreSQL refuses it with a unique
violation (taken for a race with another dispatcher).  To make that happen on
demand, the test installs a trigger that refuses, once, the first transaction
that inserts two or more files, and once the first that finishes two or more
jobs (a sequence remembers that it fired: sequences are not rolled back).  The
dispatcher runs as a process of its own, so its /metrics start from zero and
must agree, counter by counter, with what the database and ``p3s audit`` hold.
"""

from __future__ import annotations

import signal
import urllib.request
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from p3s import topology
from p3s.dispatcher import admin
from p3s.dispatcher.audit import run_audit
from p3s.states import TERMINAL_JOB_STATES
from tests.conftest import rabbitmqctl
from tests.integration.test_outage import free_port
from tests.integration.test_sampling import publish
from tests.procs import Parts, import_template
from tests.stack import graphml, make_settings, probe_command

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

TERMINAL = {s.value for s in TERMINAL_JOB_STATES}

# Refuses, once per table, the second row a transaction writes, so the refused
# transaction always holds two or more: a dispatcher that splits a refused
# batch instead of retrying it whole still records every row.
REFUSE_ONCE = """
CREATE SEQUENCE p3s_test_refused_files;
CREATE SEQUENCE p3s_test_refused_jobs;
CREATE FUNCTION p3s_test_refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    setting text := 'p3s_test.rows_' || TG_TABLE_NAME;
    n integer := coalesce(nullif(current_setting(setting, true), ''), '0')::integer + 1;
BEGIN
    PERFORM set_config(setting, n::text, true);  -- local to the transaction
    IF n = 2 THEN
        IF nextval('p3s_test_refused_' || TG_TABLE_NAME) = 1 THEN
            RAISE unique_violation USING MESSAGE = 'refused once by the test, so that the dispatcher retries';
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER p3s_test_files BEFORE INSERT ON files
    FOR EACH ROW EXECUTE FUNCTION p3s_test_refuse_once();
CREATE TRIGGER p3s_test_jobs BEFORE UPDATE ON jobs
    FOR EACH ROW WHEN (NEW.state = 'finished' AND OLD.state IS DISTINCT FROM 'finished')
    EXECUTE FUNCTION p3s_test_refuse_once();
"""


def fired(database_url: str, table: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(f"SELECT is_called FROM p3s_test_refused_{table}").fetchone()
    return bool(row and row[0])


def scrape(port: int) -> dict[str, dict[tuple[str, ...], float]]:
    """Every sample of the dispatcher's /metrics: name -> label values -> value; zeros left out."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.value:
                key = tuple(v for _k, v in sorted(sample.labels.items()) if _k != "le")
                if "le" not in sample.labels:
                    out.setdefault(sample.name, {})[key] = sample.value
    return out


def messages_in(broker_url: str, queue: str) -> int:
    """Ready plus unacknowledged messages of a queue of the test's vhost."""
    vhost = unquote(urlsplit(broker_url).path[1:])
    out = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "messages").stdout
    counts = dict(line.split("\t") for line in out.splitlines() if "\t" in line)
    return int(counts.get(queue, 0))


def expected(parts: Parts) -> dict[str, dict[tuple[str, ...], float]]:
    """What each counter must say, from the records and the audit."""
    report = parts.query(lambda s: run_audit(s, 0.0, 60.0))
    jobs = parts.db_jobs()
    workflows = parts.query(admin.list_workflows, limit=100000)
    ended = [w for w in workflows if w["state"] != "running"]
    files = Counter[tuple[str, ...]]()
    for row in report.streams:
        for decision, count in row.items():
            if decision not in ("stream", "seen") and count:
                files[(decision, row["stream"])] += count

    def count(items: list[dict[str, Any]], *keys: str) -> dict[tuple[str, ...], float]:
        return dict(Counter(tuple(str(i[k]) for k in keys) for i in items))

    terminal = [j for j in jobs if j["state"] in TERMINAL]
    assert sum(report.jobs.get(s, 0) for s in TERMINAL) == len(terminal), report.jobs
    # Label values sorted by label name, as scrape() gives them.
    return {
        "p3s_files_total": dict(files),
        "p3s_jobs_total": count(terminal, "node", "state", "template"),
        "p3s_workflows_total": count(ended, "state", "template"),
        "p3s_seen_to_created_seconds_count": count(workflows, "template"),
        "p3s_queued_to_started_seconds_count": count([j for j in jobs if j["started_at"] and j["queued_at"]],
                                                     "node", "template"),
        "p3s_run_seconds_count": count([j for j in terminal if j["started_at"] and j["state"] in
                                        ("finished", "failed", "timeout")], "node", "template"),
        "p3s_seen_to_done_seconds_count": count(ended, "state", "template"),
    }


def counted(scraped: Mapping[str, Mapping[tuple[str, ...], float]], names: Mapping[str, Any]) -> dict[str, Any]:
    return {name: dict(scraped.get(name, {})) for name in names}


def test_a_retried_batch_is_counted_once(tmp_path: Path, broker_url: str, database_url: str) -> None:
    files = 20
    settings = make_settings(tmp_path, broker_url, database_url)
    import_template(settings, graphml({"probe": {"command": probe_command()}}))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(REFUSE_ONCE)
    port = free_port()
    # Published before the dispatcher starts, so its first batch holds several.
    names = [f"np04_raw_run{7100:06d}_{i:04d}.hdf5" for i in range(files)]
    publish(broker_url, names)
    tasks = topology.task_queue("default").name

    with Parts(tmp_path, settings) as parts:
        dispatcher = parts.start("dispatcher", "dispatcher", P3S_METRICS_PORT=str(port))
        parts.wait_for(lambda: len(parts.db_files()) >= files, timeout=30, what="every file to be recorded",
                       alive=[dispatcher])
        assert fired(database_url, "files"), "the batch of files was refused once and retried"
        parts.wait_for(lambda: messages_in(broker_url, tasks) >= files, timeout=30,
                       what="every task to be published", alive=[dispatcher])

        # The pilot's reports pile up while the dispatcher is stopped, so that
        # they are taken in one batch: one transaction finishing many jobs.
        dispatcher.proc.send_signal(signal.SIGSTOP)
        try:
            pilot = parts.start("pilot", "pilot")
            outputs = settings.output_path
            parts.wait_for(lambda: len(list(outputs.glob("*/probe/probe.json"))) >= files, timeout=60,
                           what="every payload to run", alive=[pilot])
            # A running and a finished report per job, and the pilot's own.
            parts.wait_for(lambda: messages_in(broker_url, topology.status_queue.name) >= 2 * files + 1,
                           timeout=30, what="the pilot's reports", alive=[pilot])
        finally:
            dispatcher.proc.send_signal(signal.SIGCONT)

        def done() -> bool:
            jobs = parts.db_jobs()
            return len(jobs) >= files and all(j["state"] == "finished" for j in jobs)

        parts.wait_for(done, timeout=60, what="every job to finish", alive=[dispatcher, pilot])
        assert fired(database_url, "jobs"), "the batch of reports was refused once and retried"

        want = expected(parts)
        assert sum(want["p3s_files_total"].values()) == files
        assert sum(want["p3s_jobs_total"].values()) == files

        # Counters applied after the commit may trail the records by a moment.
        def caught_up() -> bool:
            got = counted(scrape(port), want)
            return all(sum(got[name].values()) >= sum(values.values()) for name, values in want.items())

        parts.wait_for(caught_up, timeout=10, what="the dispatcher's counters to reach its records")
        got = counted(scrape(port), want)
        wrong = [f"{name} counted {sum(got[name].values()):g}, recorded {sum(values.values()):g}"
                 for name, values in want.items() if got[name] != values]
        assert not wrong, "counters disagree with the records and the audit: " + "; ".join(wrong)
        checked = parts.audit()
        assert checked.returncode == 0, checked.stdout + checked.stderr
        parts.assert_alive(dispatcher, pilot)
