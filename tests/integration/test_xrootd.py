"""Against a real XRootD server started by the test: root:// events, processing, and stage-in."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p3s.config import Settings, SourceSettings
from p3s.watcher.service import Watcher
from tests.conftest import unavailable
from tests.scenarios import read_probe
from tests.stack import Stack, graphml, make_settings, probe_command, terminal_jobs, wait_for

pytestmark = [pytest.mark.xrootd, pytest.mark.rabbitmq, pytest.mark.postgres]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class XrootdServer:
    """``xrootd`` exporting a temporary directory on a free loopback port; stopped by PID.

    xrootd refuses to run as root, so under root it drops to the ``xrootd``
    user (Debian's package creates it) and the directories are made readable.
    xrootd 5.5 has no directive to listen on one address only: it listens on
    every interface of the port, with no authentication, for the test's duration.
    """

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="p3s-xrd-"))
        self.export = self.base / "export"
        self.export.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        user = "xrootd" if os.geteuid() == 0 else ""
        self.user = user
        admin = self.base / "admin"
        admin.mkdir()
        logs = self.base / "log"
        logs.mkdir()
        self.config = self.base / "xrootd.cfg"
        self.config.write_text(
            f"xrd.port {self.port}\n"
            # xrootd 5.5 has no directive to listen on loopback only: accept
            # connections from this host alone instead.
            "xrd.allow host localhost\n"
            "xrd.allow host 127.0.0.1\n"
            "all.export /\n"
            f"oss.localroot {self.export}\n"
            f"all.adminpath {admin}\n"
            f"all.pidpath {admin}\n"
        )
        self.log = logs / "xrootd.log"
        if user:
            os.chmod(self.base, 0o755)
            os.chmod(self.export, 0o777)
            shutil.chown(admin, user)
            shutil.chown(logs, user)

    @property
    def url(self) -> str:
        return f"root://127.0.0.1:{self.port}/"

    def start(self) -> None:
        argv = ["xrootd", "-c", str(self.config), "-l", str(self.log), "-p", str(self.port)]
        if self.user:
            argv += ["-R", self.user]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xrootd exited with {self.proc.returncode}; see {self.log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.1)
                continue
            done = subprocess.run(["xrdfs", f"127.0.0.1:{self.port}", "ls", "/"], capture_output=True, timeout=10,
                                  check=False, env={**os.environ, "XRD_CONNECTIONRETRY": "1"})
            if done.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"xrootd did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def xrootd_available() -> None:
    missing = [b for b in ("xrootd", "xrdfs", "xrdcp") if shutil.which(b) is None]
    if missing:
        unavailable("XRootD", f"{', '.join(missing)} not installed (Debian: xrootd-server xrootd-client)")


@pytest.fixture
def xrootd_server(xrootd_available: None) -> Iterator[XrootdServer]:
    server = XrootdServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


class WatcherThread:
    """A Watcher over given sources, in a thread, next to a Stack started with no watch directory."""

    def __init__(self, settings: Settings, sources: list[SourceSettings]) -> None:
        self.watcher = Watcher(settings, sources)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="test-watcher", daemon=True)

    def _run(self) -> None:
        try:
            self.watcher.run()
        except BaseException as exc:
            self.errors.append(exc)
            raise

    def start(self) -> WatcherThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.watcher.should_stop = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "the watcher did not stop"
        assert not self.errors, self.errors


def xrootd_source(server: XrootdServer, **kw: object) -> SourceSettings:
    return SourceSettings(name="eos", kind="xrootd", location=server.url + "/", pattern="*.dat",
                          scan_interval_s=0.3, stable_scans=2, health_timeout_s=5, **kw)  # type: ignore[arg-type]


@pytest.fixture
def stack(tmp_path: Path, broker_url: str, database_url: str) -> Iterator[Stack]:
    s = Stack(make_settings(tmp_path, broker_url, database_url), watch=None, pilots=1).start()
    try:
        yield s
    finally:
        s.stop()


def test_files_are_published_with_root_urls_and_processed(stack: Stack, xrootd_server: XrootdServer) -> None:
    stack.import_template(graphml({"probe": {"command": probe_command("{input}")}}, trigger="*.dat"))
    watcher = WatcherThread(stack.settings, [xrootd_source(xrootd_server)]).start()
    try:
        (xrootd_server.export / "run000001").mkdir()
        (xrootd_server.export / "run000001" / "a.dat").write_bytes(b"a" * 123)
        (xrootd_server.export / "top.dat").write_bytes(b"t")
        (xrootd_server.export / "skip.tmp").write_bytes(b"s")
        jobs = wait_for(lambda: terminal_jobs(stack, 2), what="two jobs to end")
    finally:
        watcher.stop()
    assert [j["state"] for j in jobs] == ["finished", "finished"]
    files = sorted(f["path"] for f in stack.files())
    base = f"root://127.0.0.1:{xrootd_server.port}/"
    assert files == [base + "/run000001/a.dat", base + "/top.dat"]
    for job in jobs:
        assert read_probe(stack, job)["rest"] == [job["file"]]


def test_stage_in_copies_the_input_into_the_work_directory(stack: Stack, xrootd_server: XrootdServer) -> None:
    stack.import_template(
        graphml({"probe": {"command": probe_command("--read", "{input}", "{input}"), "stage_in": True}},
                trigger="*.dat")
    )
    watcher = WatcherThread(stack.settings, [xrootd_source(xrootd_server)]).start()
    try:
        data = os.urandom(1_000_003)
        (xrootd_server.export / "big.dat").write_bytes(data)
        (job,) = wait_for(lambda: terminal_jobs(stack, 1), what="the job to end")
    finally:
        watcher.stop()
    assert job["state"] == "finished", job
    assert job["file"].startswith("root://")
    seen = read_probe(stack, job)
    assert seen["read_bytes"] == len(data)
    (staged,) = seen["rest"]
    assert Path(staged).parent == Path(seen["cwd"]), "the staged copy lives in the work directory"
    assert Path(staged).name == "big.dat"
    assert Path(seen["cwd"]).parent == Path(stack.settings.pilot.work_root)
    assert not Path(seen["cwd"]).exists(), "the work directory (and the copy) must be gone"


def test_a_stopped_server_makes_the_source_unhealthy(tmp_path: Path, xrootd_server: XrootdServer) -> None:
    from p3s.watcher.files import Selector
    from p3s.watcher.xrootd import XrootdSource

    source = XrootdSource(xrootd_source(xrootd_server), Selector("*.dat", ()), 3600)
    (xrootd_server.export / "one.dat").write_bytes(b"1")
    source.scan(3600)
    assert source.healthy
    (seen,) = source.read()
    assert seen.url == f"root://127.0.0.1:{xrootd_server.port}//one.dat" and seen.size == 1
    xrootd_server.stop()
    assert source.read() == [] and not source.healthy
    assert source.last_error
    xrootd_server.start()
    assert source.read() == [] and source.healthy  # known already: not published again
