"""``p3s web`` as a service: it ends with status 0 on SIGTERM, and with ``web.workers`` it serves from
that many processes on one port, one of them killed -9 being started again while the others answer."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.pgserver import free_port
from tests.procs import Parts, import_template
from tests.stack import graphml, make_settings

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

TEMPLATE = graphml({"a": {"command": "true"}}, trigger="*.dat", name="probe")


def healthz(port: int) -> dict[str, object] | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None


def children_of(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


def test_p3s_web_ends_with_status_0_on_sigterm(tmp_path: Path, broker_url: str, database_url: str) -> None:
    settings = make_settings(tmp_path, broker_url, database_url)
    import_template(settings, TEMPLATE)
    port = free_port()
    with Parts(tmp_path, settings) as parts:
        web = parts.start("web", "web", "--bind", f"127.0.0.1:{port}")
        parts.wait_for(lambda: healthz(port), alive=[web], timeout=60, what="p3s web to answer")
        assert web.stop() == 0, web.describe()


def answering(port: int, count: int, timeout: float = 60.0) -> set[int]:
    """The pids of the processes answering ``/healthz``, once ``count`` of them have (fresh connections are
    spread over the processes that accept on the one socket)."""
    seen: set[int] = set()
    end = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < end:
        found = healthz(port)
        if found:
            seen.add(int(found["pid"]))  # type: ignore[call-overload]
        else:
            time.sleep(0.1)
    return seen


def test_several_workers_share_one_port_and_a_killed_one_is_replaced(tmp_path: Path, broker_url: str,
                                                                     database_url: str) -> None:
    settings = make_settings(tmp_path, broker_url, database_url)
    import_template(settings, TEMPLATE)
    port = free_port()
    with Parts(tmp_path, settings, P3S_WEB_WORKERS="2") as parts:
        web = parts.start("web", "web", "--bind", f"127.0.0.1:{port}")
        parts.wait_for(lambda: healthz(port), alive=[web], timeout=60, what="p3s web to answer")
        workers = answering(port, 2)
        assert len(workers) == 2 and workers <= children_of(web.pid), f"{workers}\n{web.describe()}"
        assert httpx.get(f"http://127.0.0.1:{port}/api/templates", timeout=10).json()[0]["name"] == "probe"

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # The other answers meanwhile; the supervisor starts a new worker in the victim's place.
        assert all(healthz(port) for _ in range(20))
        parts.wait_for(lambda: victim not in children_of(web.pid) and len(answering(port, 3, 5) - {victim}) == 2,
                       alive=[web], timeout=60, what="a new worker in place of the killed one")
        now = answering(port, 2) | (workers - {victim})
        assert victim not in now and len(now) == 2 and now <= children_of(web.pid), f"{now}\n{web.describe()}"

        assert web.stop() == 0, web.describe()
        assert not [pid for pid in now if alive(pid)], "a worker outlived p3s web"
        assert healthz(port) is None
