"""A real pipeline with ``p3s web`` beside it, for the web service's browser and API tests.

Dispatcher, watcher, pilot and ``p3s web`` run as separate processes on
RabbitMQ and PostgreSQL, each module on a vhost and a database of its own.
Starting them costs seconds, so the fixtures here are module-scoped: one
pipeline (and one browser) per test module, shared by its tests in order.

A missing server, Playwright or Chromium skips on a laptop and fails in CI
(``CI=true``), like every integration test.  Screenshots go under
``$P3S_ARTIFACTS`` (default ``test-artifacts/`` in the repository).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from p3s import db
from p3s.dispatcher import admin
from tests.conftest import scratch_database, scratch_vhost, unavailable
from tests.pgserver import free_port
from tests.procs import ROOT, Part, Parts, import_template
from tests.stack import make_settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

OPERATOR = "alice"
PASSWORD = "correct horse battery staple"


def artifacts_dir() -> Path:
    """Where the tests leave what a person may want to look at afterwards (screenshots)."""
    path = Path(os.environ.get("P3S_ARTIFACTS") or ROOT / "test-artifacts") / "web"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def module_broker_url(rabbitmq_available: None) -> Iterator[str]:
    """A fresh vhost for one test module, deleted afterwards."""
    with scratch_vhost() as url:
        yield url


@pytest.fixture(scope="module")
def module_database_url(postgres_available: None) -> Iterator[str]:
    """A fresh PostgreSQL database for one test module, dropped afterwards."""
    with scratch_database() as url:
        yield url


#: Runs ``p3s.cli.main(argv)`` for each argv read as JSON from stdin; prints [exit code, stdout, stderr] of each.
CLI_BATCH = """
import contextlib, io, json, sys
from p3s.cli import main
results = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append([code, out.getvalue(), err.getvalue()])
sys.stdout.write(json.dumps(results))
"""


class WebPipeline:
    """Dispatcher, watcher, one pilot and ``p3s web``, each a process, on one broker vhost and one database."""

    def __init__(self, tmp_path: Path, broker_url: str, database_url: str,
                 templates: Mapping[str, str], **extra: str) -> None:
        self.root = tmp_path
        self.watch = tmp_path / "incoming"
        self.watch.mkdir()
        self.password_file = tmp_path / "web-passwords"
        self.password_file.write_text(f"{OPERATOR}:{PASSWORD}\n")
        self.password_file.chmod(0o600)
        self.settings = make_settings(tmp_path, broker_url, database_url)
        for name, text in templates.items():
            import_template(self.settings, text, name=name)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # No secret_file: the service makes its signing key in the state directory, as on a fresh install.
        # No test here waits for the reaper: a slower one than tests.procs.FAST leaves the CPU to the rest.
        self.parts = Parts(tmp_path, self.settings, P3S_WEB_PASSWORD_FILE=str(self.password_file),
                           P3S_DISPATCHER_REAP_INTERVAL_S="2", **extra)
        self.every: list[Part] = []

    def start(self) -> WebPipeline:
        parts = self.parts
        # The schema is already at head (import_template upgraded it), so the parts may start together.
        dispatcher = parts.start("dispatcher", "dispatcher")
        pilot = parts.start("pilot", "pilot", "--queues", "default", "--id", "web-pilot", P3S_DATABASE_URL="")
        watcher = parts.start("watcher", "watcher", "--watch", str(self.watch))
        self.web = parts.start("web", "web", "--bind", f"127.0.0.1:{self.port}")
        self.every = [dispatcher, pilot, watcher, self.web]
        parts.wait_for(lambda: dispatcher.log_has("dispatcher: consuming on") and pilot.log_has("waiting for tasks")
                       and watcher.log_has("watcher: following") and self._healthy(),
                       alive=self.every, timeout=60, what="the parts and the web service to start")
        return self

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(self.url("/healthz"), timeout=2).json().get("ok") is True
        except (httpx.HTTPError, ValueError):
            return False

    def url(self, path: str) -> str:
        return self.base_url + path

    def api(self, path: str, **params: Any) -> Any:
        """The JSON of ``GET /api/<path>``; fails the test on any status but 200."""
        import httpx

        response = httpx.get(self.url("/api/" + path.lstrip("/")), params=params, timeout=10)
        assert response.status_code == 200, f"GET {response.url}: {response.status_code} {response.text[:2000]}"
        return response.json()

    def edit(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(session, *args)`` in one committed transaction on the pipeline's database."""
        engine = db.make_engine(self.settings.database_url)
        try:
            with Session(engine) as session, session.begin():
                return fn(session, *args)
        finally:
            engine.dispose()

    def cli(self, *args: str) -> Any:
        """``p3s <args> --json`` with the pipeline's settings, parsed."""
        (out,) = self.cli_many(list(args))
        return out

    def cli_many(self, *commands: list[str]) -> list[Any]:
        """``p3s <command> --json`` for each command, parsed; fails the test if one exits non-zero.

        They run one after the other in one subprocess with the pipeline's settings, each through the
        CLI's own ``main(argv)`` as ``python -m p3s`` runs it: a new interpreter with p3s's imports costs
        about two CPU-seconds, and a dozen of them would take much of these tests' time budget.
        """
        done = subprocess.run([sys.executable, "-c", CLI_BATCH], input=json.dumps([[*c, "--json"] for c in commands]),
                              env=self.parts.env(), cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, f"the CLI batch exited {done.returncode}: {done.stderr[-3000:]}"
        out = []
        for command, (code, stdout, stderr) in zip(commands, json.loads(done.stdout), strict=True):
            assert code == 0, f"p3s {' '.join(command)} --json exited {code}: {stderr[-3000:]}"
            out.append(json.loads(stdout))
        return out

    def jobs_of(self, workflow_id: int) -> list[dict[str, Any]]:
        """A workflow's jobs, read in this process (for polling; the CLI is for what a test asserts)."""
        return self.parts.query(admin.list_jobs, limit=100000, workflow_id=workflow_id)

    def workflow_of(self, file_name: str) -> dict[str, Any]:
        """The workflow made for ``file_name``, once the dispatcher has made it (read in this process)."""
        return self.wait_for(lambda: next((w for w in self.parts.query(admin.list_workflows, limit=100000)
                                           if Path(w["file"]).name == file_name), None),
                             what=f"the workflow of {file_name}")

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
        return self.parts.wait_for(predicate, timeout=timeout, what=what, alive=self.every)

    def write(self, name: str, data: bytes = b"x") -> Path:
        """A complete file in the watched directory, as the DAQ leaves it."""
        path = self.watch / name
        path.write_bytes(data)
        return path

    def stop(self) -> None:
        self.parts.stop_all()


def refused(web: WebPipeline) -> dict[str, int]:
    """The web service's counts of refused requests, by reason (from ``/healthz``)."""
    import httpx

    return dict(httpx.get(web.url("/healthz"), timeout=5).json()["refused"])


def csrf_of(html: str) -> str:
    """The value of the first ``csrf_token`` field in a page."""
    found = re.search(r'name="csrf_token"[^>]*value="([^"]+)"|value="([^"]+)"[^>]*name="csrf_token"', html)
    assert found, "no csrf_token field in the page"
    return found.group(1) or found.group(2)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright; one per test module."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("Playwright", "the playwright package is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable("Chromium", f"no {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as exc:
            unavailable("Chromium", f"{CHROMIUM} did not start: {exc}")
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    """A full-page screenshot of ``page`` under the artifacts directory."""
    path = artifacts_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path

