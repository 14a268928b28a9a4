"""Fixtures shared by every tier.

Integration fixtures give each test its own RabbitMQ vhost and its own
PostgreSQL database, so tests never see each other's messages or rows.  A
missing server skips the test on a laptop and fails it in CI (``CI=true``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from urllib.parse import quote

import pytest

CI = os.environ.get("CI", "").lower() == "true"
RABBITMQ_HOST = os.environ.get("P3S_TEST_RABBITMQ_HOST", "127.0.0.1")
RABBITMQ_PORT = int(os.environ.get("P3S_TEST_RABBITMQ_PORT", "5672"))
PG_ADMIN_URL = os.environ.get("P3S_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def unavailable(what: str, why: str) -> None:
    """Skip, or fail in CI, where a server an integration test needs is missing."""
    message = f"{what} unavailable: {why}"
    if CI:
        pytest.fail(message + " (CI=true: integration tests never skip)", pytrace=False)
    pytest.skip(message)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def rabbitmqctl(*args: str, node: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["rabbitmqctl", *(["-n", node] if node else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


#: Tests whose every wait assumes the CPU is theirs: they drive thousands of messages, a
#: three-node cluster, 100 000 rows, or two dispatchers at full speed.  Under pytest-xdist
#: they share one worker, so no two of them ever saturate the machine at once.
CPU_HEAVY = {
    "tests/integration/test_broker_cluster.py",
    "tests/integration/test_fuzz.py",
    "tests/integration/test_purge.py",
    "tests/integration/test_two_dispatchers.py",
}


def _shares_module_fixture(item: pytest.Item) -> bool:
    """True if ``item`` uses a module-scoped fixture: one its neighbours in the file use too."""
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        if defs and defs[-1].scope in ("module", "package", "class"):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n N --dist loadgroup``; without xdist the marks change nothing.

    A module whose tests share a module-scoped fixture (one pipeline, one browser, one
    set of imported definitions, used by its tests in order) runs whole on one worker,
    so the fixture is made once and the order holds.  The CPU-heavy tests run one after
    another on a worker of their own.  Everything else goes to whichever worker is free.
    """
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if path in CPU_HEAVY:
            item.add_marker(pytest.mark.xdist_group("cpu-heavy"))
        elif _shares_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(path))


@pytest.fixture(scope="session")
def rabbitmq_available() -> None:
    if not _port_open(RABBITMQ_HOST, RABBITMQ_PORT):
        unavailable("RabbitMQ", f"nothing listens on {RABBITMQ_HOST}:{RABBITMQ_PORT}")
    if shutil.which("rabbitmqctl") is None:
        unavailable("RabbitMQ", "rabbitmqctl is not installed (needed to make a vhost per test)")


@contextmanager
def scratch_vhost() -> Iterator[str]:
    """A fresh vhost on the real RabbitMQ; yields its URL, deletes it after."""
    vhost = f"p3s-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{quote(vhost, safe='')}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def broker_url(rabbitmq_available: None) -> Iterator[str]:
    """A fresh vhost on the real RabbitMQ, deleted afterwards."""
    with scratch_vhost() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_available() -> None:
    try:
        import psycopg
    except ImportError:
        unavailable("PostgreSQL", "psycopg is not installed (pip install -e '.[test]')")
    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        unavailable("PostgreSQL", f"cannot connect to {PG_ADMIN_URL}: {exc}")


@pytest.fixture
def new_database(postgres_available: None) -> Iterator[Callable[[], str]]:
    """Makes fresh PostgreSQL databases on demand; drops them all afterwards."""
    with ExitStack() as stack:
        yield lambda: stack.enter_context(scratch_database())


@contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh PostgreSQL database; yields its URL, drops it (forcing other sessions out) after."""
    import psycopg

    name = f"p3s_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(new_database: Callable[[], str]) -> str:
    """A fresh PostgreSQL database, dropped afterwards."""
    return new_database()


@pytest.fixture(autouse=True)
def _fresh_memory_broker() -> Iterator[None]:
    """kombu's in-process broker is global to the process: empty it around each test."""
    from kombu.transport import memory

    def clear() -> None:
        memory.Channel.queues.clear()
        memory.Channel.events.clear()
        memory.Transport.global_state.clear()

    clear()
    yield
    clear()
