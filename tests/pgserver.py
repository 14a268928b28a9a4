"""A PostgreSQL server of a test's own, to stop and start without touching the shared one.

The server runs from Debian's binaries (``/usr/lib/postgresql/<version>/bin``)
as the ``postgres`` user, because ``initdb`` refuses to run as root; its data
directory and Unix socket live in a temporary directory of its own, it listens
on 127.0.0.1 on a free port, and every local connection is trusted.  It is
stopped by the PID in its ``postmaster.pid``, never by name, so nothing else
on the machine is touched.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVER_USER = "postgres"


def bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def missing() -> str:
    """Why a private server cannot run here, or "" if it can."""
    if bindir() is None:
        return "no /usr/lib/postgresql/*/bin/initdb"
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        return f"no {SERVER_USER} user to run initdb as"
    if os.geteuid() != 0:
        return "not root: cannot run the server as the postgres user"
    if shutil.which("runuser") is None:
        return "no runuser"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie no longer counts."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


class PgServer:
    """One PostgreSQL cluster in a temporary directory, started and stopped by its owner only."""

    def __init__(self) -> None:
        found = bindir()
        assert found is not None, missing()
        self.bin = found
        user = pwd.getpwnam(SERVER_USER)
        # Not under pytest's tmp_path: that is root's, mode 700, and the server
        # runs as another user.
        self.base = Path(tempfile.mkdtemp(prefix="p3s-pg-"))
        os.chown(self.base, user.pw_uid, user.pw_gid)
        self.data = self.base / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._as_server_user("initdb", "-D", str(self.data), "--auth=trust", "-U", SERVER_USER, "-E", "UTF8",
                             "--no-sync")

    def _as_server_user(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", SERVER_USER, "--", str(self.bin / tool), *args], check=True,
                       capture_output=True, timeout=120, cwd=self.base)

    def url(self, database: str = "postgres", user: str = SERVER_USER, password: str = "") -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (same port, same data) and wait until it takes connections."""
        import psycopg

        assert self.process is None, "already running"
        self.starts += 1
        out = open(self.base / f"server-{self.starts}.log", "wb")  # noqa: SIM115 - owned by the process
        # Its own session: a Ctrl-C of pytest reaches the server only through stop().
        self.process = subprocess.Popen(
            ["runuser", "-u", SERVER_USER, "--", str(self.bin / "postgres"), "-D", str(self.data),
             "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.base),
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.base, start_new_session=True,
        )
        out.close()
        end = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"PostgreSQL on port {self.port} exited while starting: {self.log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > end:
                    self.stop()
                    raise RuntimeError(f"PostgreSQL on port {self.port} did not start within {timeout:.0f}s") from None
                time.sleep(0.1)

    def pid(self) -> int | None:
        """The postmaster's PID from its own pid file, if it names a live postgres of this data directory."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return None
        return pid if str(self.data).encode() in cmdline and _alive(pid) else None  # a reused PID is left alone

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: sessions are ended, the server exits); SIGKILL if it does not."""
        if self.process is None:
            return
        process, self.process = self.process, None
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGINT)
            end = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        end = time.monotonic() + timeout
        while _port_open(self.port) and time.monotonic() < end:
            time.sleep(0.05)

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(self.base.glob("server-*.log")))


@contextmanager
def pg_server(start: bool = True) -> Iterator[PgServer]:
    """A fresh private server, running unless ``start`` is false; stopped and removed afterwards."""
    server = PgServer()
    try:
        if start:
            server.start()
        yield server
    finally:
        server.cleanup()
