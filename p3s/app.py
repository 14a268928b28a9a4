"""Building the daemons from settings, and running several in one process (``p3s run``).

On the embedded default the broker is kombu's in-process transport, so the
watcher, the dispatcher and the pilots must share one process: each runs in a
thread of its own with its own connection.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from p3s import broker, db
from p3s.config import Settings, SourceSettings
from p3s.dispatcher.service import Dispatcher
from p3s.errors import BrokerUnavailable, DatabaseRefused, DatabaseUnavailable
from p3s.pilot.identity import payload_identity
from p3s.pilot.service import Limits, Pilot
from p3s.watcher.service import Watcher

log = logging.getLogger(__name__)


def wait_for_database(url: str, stop: Callable[[], bool] = lambda: False) -> None:
    """Bring the schema up to date, waiting (WARNING, back-off) while the database does not answer.

    Only refused credentials, a missing database or a URL no driver knows are
    final: the caller gets that error at once.
    """
    backoff = 0.5
    while True:
        try:
            db.upgrade(url)
            return
        except DatabaseRefused:
            raise
        except DatabaseUnavailable as exc:
            if stop():
                raise
            log.warning("dispatcher: waiting for the database, trying again in %.1fs: %s", backoff, exc)
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


def _wait_for_broker(settings: Settings) -> Any:
    """A connection the broker has accepted, closed again: consumers work on clones of it.

    Left open, nothing would read or heartbeat it while the clone consumes, and
    the broker would close it for missed heartbeats, with an error in its log.
    """
    connection = broker.ensure_connected(broker.connect(settings.broker), max_retries=None, waiting="p3s")
    if not settings.broker.embedded:
        connection.release()
    return connection


def make_dispatcher(settings: Settings, reload_settings: Callable[[], Settings] | None = None) -> Dispatcher:
    """A dispatcher with the schema brought to the current revision, once both servers answer."""
    wait_for_database(settings.database_url)
    engine = db.make_engine(settings.database_url, echo=settings.database.echo, pre_ping=False)
    connection = _wait_for_broker(settings)
    return Dispatcher(settings, engine, connection, reload_settings=reload_settings)


def make_pilot(
    settings: Settings, queues: tuple[str, ...] | None = None, limits: Limits | None = None, pilot_id: str | None = None
) -> Pilot:
    # A payload user the pilot cannot use is a configuration error: say so now, not after the broker answers.
    payload_identity(settings.pilot.payload_user)
    connection = _wait_for_broker(settings)
    return Pilot(settings, connection, queues=queues, limits=limits, pilot_id=pilot_id)


def _run_pilot(pilot: Pilot) -> None:
    pilot.run()
    pilot.close()
    if pilot.refused:
        raise BrokerUnavailable(pilot.refused)


@dataclass
class Group:
    """Daemons sharing a process; one signal handler steers them all."""

    dispatcher: Dispatcher | None = None
    watcher: Watcher | None = None
    pilots: list[Pilot] = field(default_factory=list)
    web: Any = None  # p3s.web.app.WebServer: imported only when asked for, it brings Starlette
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def _thread(self, name: str, target: Callable[[], Any]) -> None:
        def body() -> None:
            try:
                target()
            except BaseException as exc:
                self.errors.append(exc)
                log.critical("%s: stopped by an unexpected error", name, exc_info=True)
                self.stop()

        t = threading.Thread(target=body, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def start(self) -> None:
        # The dispatcher first: it declares the topology the others publish into.
        if self.dispatcher is not None:
            d = self.dispatcher
            self._thread("dispatcher", lambda: (d.run(), d.close()))
        for pilot in self.pilots:
            self._thread(f"pilot-{pilot.id}", lambda p=pilot: _run_pilot(p))  # type: ignore[misc]
        if self.watcher is not None:
            self._thread("watcher", self.watcher.run)
        if self.web is not None:
            self._thread("web", self.web.run)

    def stop(self) -> None:
        for part in (self.watcher, self.dispatcher, *self.pilots, self.web):
            if part is not None:
                part.should_stop = True

    def kill(self) -> None:
        for pilot in self.pilots:
            pilot.kill_requested = True
        self.stop()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout: float | None = None) -> None:
        for t in self.threads:
            t.join(timeout)


def build_group(
    settings: Settings, watch: list[SourceSettings], pilots: int, reload_settings: Callable[[], Settings] | None = None
) -> Group:
    group = Group()
    if watch and not settings.sources:
        # The dispatcher checks every event's path against its stream's roots.
        settings = dataclasses.replace(settings, sources=tuple(watch))
    group.dispatcher = make_dispatcher(settings, reload_settings)
    # Declare before anyone publishes, so no event or task is unroutable.
    from p3s import topology

    topology.declare_all(group.dispatcher.connection, settings.pilot.queues, settings.broker.max_queue_length)
    if not settings.broker.embedded:
        group.dispatcher.connection.release()
    group.pilots = [make_pilot(settings) for _ in range(pilots)]
    if watch:
        group.watcher = Watcher(settings, watch)
    return group


class Signals:
    """Signal handlers that only set flags: first TERM stops, second kills payloads, HUP reloads."""

    def __init__(
        self, on_stop: Callable[[], None], on_kill: Callable[[], None], on_reload: Callable[[], None] | None = None
    ) -> None:
        self._on_stop, self._on_kill, self._on_reload = on_stop, on_kill, on_reload
        self.stopping = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._term)
        signal.signal(signal.SIGINT, self._term)
        # SIGHUP's default action would kill a daemon that has nothing to reload.
        signal.signal(signal.SIGHUP, self._hup if self._on_reload is not None else signal.SIG_IGN)

    def _term(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            self._on_kill()
        else:
            self.stopping = True
            self._on_stop()

    def _hup(self, _signum: int, _frame: FrameType | None) -> None:
        assert self._on_reload is not None
        self._on_reload()
