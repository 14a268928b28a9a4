"""PostgreSQL down at start-up or during the run: the dispatcher waits for it, and loses nothing.

Each test runs a PostgreSQL server of its own (tests/pgserver.py), so that
stopping it leaves the shared server, and every other test, alone.  Only a
wrong URL or refused credentials make the dispatcher give up, with one line
that names the URL, its password masked.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.integration.test_sampling import publish
from tests.pgserver import PgServer, missing
from tests.procs import Part, Parts, finished_names, import_template
from tests.stack import graphml, make_settings, probe_command

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

EXIT_UNAVAILABLE = 3


@pytest.fixture
def pg(postgres_available: None) -> Iterator[PgServer]:
    """A private PostgreSQL server, running, with a database ``p3s``; stopped and removed afterwards."""
    why = missing()
    if why:
        unavailable("PostgreSQL", f"cannot run a server of the test's own: {why}")
    server = PgServer()
    try:
        server.start()
        server.create_database("p3s")
        yield server
    finally:
        server.cleanup()


def prepare(parts: Parts) -> None:
    """The schema, made as an operator makes it, and a one-node template."""
    done = parts.run("db", "upgrade")
    assert done.returncode == 0, done.stdout + done.stderr
    import_template(parts.settings, graphml({"probe": {"command": probe_command()}}))


def names(run: int, count: int) -> list[str]:
    return [f"np04_raw_run{run:06d}_{i:04d}.hdf5" for i in range(count)]


def warnings_about_the_database(part: Part) -> list[str]:
    return [line for line in part.log().splitlines() if " WARNING " in line and "database" in line.lower()]


def test_a_dispatcher_started_while_postgresql_is_down_waits_for_it(
    tmp_path: Path, broker_url: str, pg: PgServer
) -> None:
    settings = make_settings(tmp_path, broker_url, pg.url("p3s"))
    with Parts(tmp_path, settings) as parts:
        prepare(parts)
        pg.stop()

        dispatcher = parts.start("dispatcher", "dispatcher")
        files = names(8100, 50)
        publish(broker_url, files)
        # Waiting, not giving up: a WARNING, then another after its back-off, and still running.
        # Counted in warnings, not seconds: on a busy host the dispatcher's start alone takes seconds.
        parts.wait_for(lambda: len(warnings_about_the_database(dispatcher)) >= 2, timeout=60,
                       what="two WARNINGs that it waits for the database", alive=[dispatcher])
        assert dispatcher.alive(), (
            f"the dispatcher gave up (exit {dispatcher.proc.returncode}) while PostgreSQL was down:\n{dispatcher.log()}"
        )

        pg.start()
        pilots = [parts.start("pilot", "pilot") for _ in range(2)]
        parts.wait_for(lambda: len(parts.db_files()) >= len(files), timeout=60,
                       what="every file to be recorded once PostgreSQL is back", alive=[dispatcher])
        assert sorted(f["name"] for f in parts.db_files()) == sorted(files)
        parts.wait_for(lambda: finished_names(parts.db_jobs()) >= set(files), timeout=60,
                       what="every job to finish", alive=[dispatcher, *pilots])
        checked = parts.audit()
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_postgresql_outage_during_the_run_loses_nothing(tmp_path: Path, broker_url: str, pg: PgServer) -> None:
    settings = make_settings(tmp_path, broker_url, pg.url("p3s"))
    with Parts(tmp_path, settings) as parts:
        prepare(parts)
        dispatcher = parts.start("dispatcher", "dispatcher")
        pilot = parts.start("pilot", "pilot")
        before = names(8200, 5)
        publish(broker_url, before)
        parts.wait_for(lambda: finished_names(parts.db_jobs()) >= set(before), timeout=30,
                       what="the pipeline to run before the outage", alive=[dispatcher, pilot])

        pg.stop()
        during = names(8201, 20)
        publish(broker_url, during)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            parts.assert_alive(dispatcher)
            time.sleep(0.2)
        pg.start()

        everything = set(before) | set(during)
        parts.wait_for(lambda: {f["name"] for f in parts.db_files()} >= everything, timeout=60,
                       what="every file published during the outage to be recorded", alive=[dispatcher])
        assert sorted(f["name"] for f in parts.db_files()) == sorted(everything), "each file recorded once"
        parts.wait_for(lambda: finished_names(parts.db_jobs()) >= everything, timeout=60,
                       what="every job to finish", alive=[dispatcher, pilot])
        checked = parts.audit()
        assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("user", "database"),
    [("nosuchuser", "p3s"), ("postgres", "nosuchdb")],
    ids=["unknown-user", "unknown-database"],
)
def test_refused_credentials_or_a_wrong_url_make_the_dispatcher_exit(
    tmp_path: Path, broker_url: str, pg: PgServer, user: str, database: str
) -> None:
    secret = "s3cret-not-to-be-shown"
    settings = make_settings(tmp_path, broker_url, pg.url(database, user=user, password=secret))
    with Parts(tmp_path, settings) as parts:
        dispatcher = parts.start("dispatcher", "dispatcher")
        try:
            code = dispatcher.proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the dispatcher did not give up on a URL the server refuses:\n{dispatcher.log()}")
        output = dispatcher.log()
    assert code == EXIT_UNAVAILABLE, output
    assert secret not in output, "the password is never shown"
    assert "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    masked = f"{user}:***@127.0.0.1:{pg.port}/{database}"
    assert last.startswith("p3s: ") and masked in last, f"one line naming the URL {masked}, got:\n{output}"
