"""The dispatcher daemon: consumes events, status reports and dead letters, in batches.

One transaction per batch, then the tasks it made are published with confirms
and marked published, then the batch's messages are acked.  So a crash before
the commit loses nothing (RabbitMQ redelivers), and a crash after it is
recognised on redelivery: the messages are already recorded, and the tasks
they made that the broker never confirmed are published then.

A batch is recorded as soon as the queues are quiet, except a batch of
pilots' and watchers' own reports (heartbeats, mostly): that one waits up to
``dispatcher.heartbeat_linger_s`` for more of them, so a thousand pilots'
heartbeats share a few transactions instead of one each, while a data event
or a job report is never kept waiting.

Every message ends in exactly one of three ways: recorded and acked; refused
to ``p3s.invalid`` with the reason in a header (it cannot be parsed, the
database refuses it, or handling it raised something unexpected); or kept
until a server that failed (not the message) is back.  Nothing is requeued for
ever, and no message stops the consumer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kombu import Connection
from kombu.message import Message
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from p3s import broker, metrics, topology
from p3s.broker import Outgoing, Publisher
from p3s.config import Settings
from p3s.db import Job, Pilot
from p3s.dispatcher import intake, jobs, pilots, reaper, sources
from p3s.dispatcher.admission import Admission
from p3s.dispatcher.catalogue import Catalogue
from p3s.dispatcher.context import Context, IdAllocator
from p3s.errors import BrokerUnavailable, ConfigError, InvalidMessage, ReportRefused
from p3s.messages import DataEvent, PilotReport, SourcesReport, Task, UncarriableEvent, encode, parse_status
from p3s.results.record import export_alarms
from p3s.states import JobState, PilotState

log = logging.getLogger(__name__)

DEADLINE_HEADER = "p3s-deadline"
REASON_HEADER = "p3s-reason"
QUEUE_HEADER = "p3s-queue"
REASON_MAX = 1000
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
#: PostgreSQL's deadlock_detected and serialization_failure: a race lost, not a fault of the batch.
RACE_SQLSTATES = ("40P01", "40001")
#: Status reports about the reporter itself, not about a job: they may wait for a batch (see heartbeat_linger_s).
REGISTRY_REPORTS = (PilotReport, SourcesReport)


def task_message(task: Task, now: float) -> Outgoing:
    """The AMQP message for a task: its priority, and an expiration of the time left."""
    return Outgoing(
        exchange=topology.tasks_exchange,
        routing_key=task.queue,
        body=encode(task),
        priority=task.priority,
        expiration=task.deadline - now,
        headers={DEADLINE_HEADER: task.deadline, "p3s-job-id": task.job_id},
    )


def death_reason(message: Message) -> str:
    """Why RabbitMQ dead-lettered a message: ``expired``, ``maxlen`` or ``rejected``."""
    deaths = broker.headers_of(message).get("x-death") or []
    if deaths and isinstance(deaths[0], dict):
        return str(deaths[0].get("reason", "unknown"))
    return "unknown"


def redelivered(message: Message) -> bool:
    return bool((getattr(message, "delivery_info", None) or {}).get("redelivered"))


def printable(text: str, limit: int = REASON_MAX) -> str:
    """``text`` safe for a header or a log line: valid UTF-8, no NUL, bounded."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\0", "\\0")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DatabaseLost(Exception):
    """The database did not answer (not: refused the batch); the batch waits and is tried again."""


class Refused(Exception):
    """The database refused the batch, or handling it raised: split it to find the message at fault."""


@dataclass
class Item:
    """A message taken from a queue, with what was parsed from it."""

    message: Message
    payload: Any
    note: str = ""  # an event's refusal reason, or a dead letter's death reason
    # Set while recording: this message is refused (kind, reason) once the batch commits.
    refusal: tuple[str, str] | None = None


def _registry_key(item: Item) -> tuple[int, str]:
    """The order in which a batch touches watchers' and pilots' rows (sorted() keeps each one's own order)."""
    report = item.payload
    return (0, report.host) if isinstance(report, SourcesReport) else (1, report.pilot_id)


def sender(message: Message) -> str:
    """The broker account that published ``message``: RabbitMQ's validated user_id, or ""."""
    return str((getattr(message, "properties", None) or {}).get("user_id") or "")


class Dispatcher(broker.ReconnectingConsumer):
    """Turns data events into workflows and pilots' reports into job states."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        connection: Connection,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.connection = connection
        self._reload_settings = reload_settings
        self.publisher = Publisher(
            settings.broker,
            exchanges=[topology.tasks_exchange, topology.invalid_exchange, topology.control_exchange],
        )
        self.catalogue = Catalogue()
        self.ids = IdAllocator()
        self.admission = Admission()
        self.should_stop = False
        self.reload_requested = False
        self._events: list[Item] = []
        self._status: list[Item] = []
        self._expired: list[Item] = []
        # The open batch of status reports: when its first message arrived (monotonic),
        # and whether it holds a report that must not wait (see _linger_left).
        self._status_opened = 0.0
        self._status_urgent = False
        # Messages whose tasks the broker did not take: handed back after a pause,
        # so their redelivery publishes those tasks; (monotonic time, messages).
        self._held_back: list[tuple[float, list[Message]]] = []
        self._declared: set[str] = set()
        self._next_reap = 0.0
        self._dead_letters = True
        self._live = connection
        self._db_wait_until = 0.0
        self._db_backoff = BACKOFF_START_S
        self._publish_backoff = BACKOFF_START_S
        self.overloaded = False

    # -- kombu hooks --------------------------------------------------------

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        n = self.settings.dispatcher.batch_size
        return [
            Consumer(queues=[topology.events_queue], on_message=self._on_event, prefetch_count=n),
            Consumer(queues=[topology.status_queue], on_message=self._on_status, prefetch_count=n),
            Consumer(queues=[topology.expired_queue], on_message=self._on_expired, prefetch_count=n),
        ]

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        log.warning("dispatcher: broker connection lost (%s), retrying in %.1fs", exc, interval)

    def on_connection_revived(self) -> None:
        # Messages buffered from a channel that died can no longer be acked:
        # RabbitMQ redelivers them, recording is idempotent, and the redelivery
        # publishes what their first handling committed but never published.
        # Cleared here, before consuming starts, because deliveries may arrive
        # as soon as the consumers exist.
        self._events.clear()
        self._status.clear()
        self._status_urgent = False
        self._expired.clear()
        self._held_back.clear()
        # The publisher's connection died with the broker too, even if nothing
        # was published meanwhile: its first publish would fail.
        self.publisher.close()

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: Any, **kwargs: Any) -> None:
        # The revived connection (a clone of self.connection) serves the
        # declares and queue depths from now on.
        self._live = connection
        self._dead_letters = broker.supports_dead_letters(connection)
        topology.declare_all(connection, self.settings.pilot.queues, self.settings.broker.max_queue_length)
        self._declared = set(self.settings.pilot.queues)
        log.info("dispatcher: consuming on %s", connection.as_uri())

    def consume(
        self, limit: int | None = None, timeout: float | None = None, safety_interval: float = 1.0, **kwargs: Any
    ) -> Iterator[None]:
        """ConsumerMixin's loop, with batching: flush when the queues go quiet or a batch is full."""
        with self.consumer_context(**kwargs) as (conn, _channel, _consumers):
            while not self.should_stop:
                self.on_iteration()
                turn = broker.turn_s(self.settings.broker, safety_interval)
                if not self._waiting() or self._database_wait():
                    # Idle: wait for the next message.  While the database is away,
                    # wait (and heartbeat) instead of spinning.
                    timeout = min(turn, self._database_wait() or 1e9)
                elif self._events or self._expired or self._status_urgent:
                    # While a batch is open, only take what has already arrived (a
                    # non-blocking read).  Under load batches fill by themselves while
                    # a transaction runs; when idle, a wait here would be added to
                    # every file's latency.
                    timeout = 0.0
                else:
                    # Pilots' reports alone: wait for more of them, but no longer than
                    # the linger (nor than a turn, so the connection keeps beating).
                    timeout = min(turn, self._linger_left())
                got = True
                try:
                    conn.drain_events(timeout=timeout)
                except TimeoutError:
                    got = False
                # Every turn: a consumer that is always busy never times out above.
                conn.heartbeat_check(rate=broker.HEARTBEAT_RATE)
                full = self._waiting() >= self.settings.dispatcher.batch_size
                if self._waiting() and not self._database_wait() and (not got or full):
                    self.flush(linger=not full)
                yield
            self.flush()

    def on_iteration(self) -> None:
        if self.reload_requested:
            self.reload_requested = False
            self._reload()
        self._hand_back_held()
        now = time.time()
        if now >= self._next_reap and not self._database_wait():
            self._next_reap = now + self.settings.dispatcher.reap_interval_s
            self.flush()
            self.reap(now)

    # -- receiving ------------------------------------------------------------

    def _waiting(self) -> int:
        return len(self._events) + len(self._status) + len(self._expired)

    def _linger_left(self) -> float:
        """Seconds the open batch of status reports may still wait for more (0: record it now).

        Only a batch of pilots' and watchers' own reports waits: a pilot is
        declared lost after tens of seconds of silence, so its heartbeat can
        wait a fraction of one for others to share its transaction.  A job
        report in the batch ends the wait (the next job of a workflow waits on
        it), and takes the reports waiting beside it into its own transaction.
        """
        linger = self.settings.dispatcher.heartbeat_linger_s
        if not linger or not self._status or self._status_urgent:
            return 0.0
        return max(0.0, self._status_opened + linger - time.monotonic())

    def _from_account(self, message: Message, queue: str, allowed: tuple[str, ...], what: str) -> bool:
        """False (and the message refused) if ``allowed`` names accounts and the sender is not one."""
        if not allowed or sender(message) in allowed:
            return True
        metrics.REPORTS_REFUSED.labels("account").inc()
        self._refuse(message, queue, f"{what} from broker account {sender(message) or '(none)'!r}, "
                                     f"not one of {', '.join(allowed)}")
        return False

    def _on_event(self, message: Message) -> None:
        if not self._from_account(message, topology.events_queue.name, self.settings.dispatcher.event_users,
                                  "data event"):
            return

        def parse() -> None:
            try:
                self._events.append(Item(message, DataEvent.parse(message.body)))
            except UncarriableEvent as exc:
                self._events.append(Item(message, exc.event, exc.reason))

        self._take(message, topology.events_queue.name, parse)

    def _on_status(self, message: Message) -> None:
        # A watcher's sources report comes from a watcher's account, not a pilot's.
        info = getattr(message, "delivery_info", None) or {}
        watcher = info.get("exchange") == topology.events_exchange.name
        allowed = self.settings.dispatcher.event_users if watcher else self.settings.dispatcher.report_users
        if not self._from_account(message, topology.status_queue.name, allowed, "status report"):
            return

        def parse() -> None:
            report = parse_status(message.body)
            if isinstance(report, SourcesReport) != watcher:
                # Each account speaks on its own exchange: a sources report only from a
                # watcher's (p3s.events), pilots' reports only on p3s.status.
                raise InvalidMessage(f"a {type(report).__name__} arrived through exchange {info.get('exchange')!r}")
            if not self._status:
                self._status_opened = time.monotonic()
            self._status_urgent = self._status_urgent or not isinstance(report, REGISTRY_REPORTS)
            self._status.append(Item(message, report))

        self._take(message, topology.status_queue.name, parse)

    def _on_expired(self, message: Message) -> None:
        self._take(message, topology.expired_queue.name,
                   lambda: self._expired.append(Item(message, Task.parse(message.body), death_reason(message))))

    def _take(self, message: Message, queue: str, parse: Callable[[], None]) -> None:
        """Parse a delivery into its buffer; refuse it, whatever goes wrong, without stopping."""
        try:
            parse()
        except InvalidMessage as exc:
            self._refuse(message, queue, str(exc))
        except Exception as exc:  # noqa: BLE001 - a message handler is total (STYLE 15)
            log.error("%s: unexpected error reading a message; refused to p3s.invalid", queue, exc_info=True)
            self._refuse(message, queue, f"unexpected error: {exc!r}")

    def _refuse(self, message: Message, queue: str, reason: str) -> None:
        """Keep a body we cannot use in p3s.invalid, with the reason; never requeue it, never stop for it."""
        reason = printable(reason)
        metrics.INVALID_MESSAGES.labels(queue).inc()
        log.warning("%s: message refused to p3s.invalid: %s", queue, reason)
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode("utf-8", "replace")
        try:
            self.publisher.publish(
                [Outgoing(topology.invalid_exchange, "", body, headers={REASON_HEADER: reason, QUEUE_HEADER: queue})]
            )
        except BrokerUnavailable as exc:
            if self._dead_letters:
                # The queue dead-letters to p3s.invalid itself: the body is kept, without our reason.
                log.warning("%s: could not publish the refused message (%s); dead-lettering it instead", queue, exc)
                self._settle(message.reject, requeue=False)
                return
            log.error("%s: could not keep the refused message: %s", queue, exc)
        self._settle(message.ack)

    @staticmethod
    def _settle(action: Callable[..., None], **kwargs: Any) -> bool:
        try:
            action(**kwargs)
        except broker.CONNECTION_ERRORS:
            log.warning("dispatcher: ack lost with the connection; the redelivery will be recognised")
            return False
        return True

    # -- recording ------------------------------------------------------------

    def flush(self, linger: bool = False) -> None:
        """Record every buffered message, publish what it made ready, ack.

        ``linger``: leave alone a batch of pilots' reports that may still wait for more.
        """
        for buffer, work, queue in (
            (self._events, self._record_events, topology.events_queue.name),
            (self._status, self._apply_reports, topology.status_queue.name),
            (self._expired, self._expire, topology.expired_queue.name),
        ):
            if buffer is self._status and linger and self._linger_left():
                continue
            if buffer and not self._database_wait():
                items = buffer[:]
                buffer.clear()
                if buffer is self._status:
                    self._status_urgent = False
                self._record(items, work, buffer, queue)
                if buffer is self._status and buffer:
                    # Kept for the database to come back: still urgent if one of them is.
                    self._status_urgent = any(not isinstance(i.payload, REGISTRY_REPORTS) for i in buffer)

    def _record_events(self, session: Session, items: Sequence[Item], ctx: Context) -> list[Task]:
        return intake.record_events(session, [i.payload for i in items], ctx, [i.note for i in items])

    def _apply_reports(self, session: Session, items: Sequence[Item], ctx: Context) -> list[Task]:
        tasks: list[Task] = []
        again: set[int] = set()
        # Another dispatcher may be recording reports on the same rows at the same
        # time.  Every batch takes its row locks in one order, so the two may wait
        # for each other but never in a cycle (a deadlock, which PostgreSQL breaks
        # only after a second): first the workflows and jobs reported on, locked up
        # front by id; last the watchers' and pilots' rows, applied in key order.
        job_items = [i for i in items if not isinstance(i.payload, REGISTRY_REPORTS)]
        registry = sorted((i for i in items if isinstance(i.payload, REGISTRY_REPORTS)),
                          key=_registry_key)
        jobs.lock_in_order(session, [i.payload.job_id for i in job_items if JobState(i.payload.state).terminal],
                           [i.payload.job_id for i in job_items])
        for item in job_items:
            report = item.payload
            item.refusal = None
            try:
                # The checks come before any change, so a refused report leaves nothing behind.
                tasks.extend(jobs.apply_job_report(session, report, ctx))
            except ReportRefused as exc:
                item.refusal = (exc.kind, str(exc))
                continue
            if redelivered(item.message):
                again.add(report.job_id)
        if ctx.slots_freed:
            # A job of a stage with max_running ended: its slot may go to a held job.
            # (Other slots free through jobs that expire in their queue: the reaper
            # releases held jobs each round too.)
            tasks.extend(jobs.release_held(session, ctx))
        tasks.extend(jobs.unpublished_tasks(session, ctx, jobs.workflows_of_jobs(session, again)))
        # One query for every pilot reporting, not two per report.
        known = pilots.preload(session, [i.payload.pilot_id for i in registry if isinstance(i.payload, PilotReport)])
        for item in registry:
            item.refusal = None
            try:
                if isinstance(item.payload, SourcesReport):
                    sources.apply_sources_report(session, item.payload, ctx)
                else:
                    pilots.apply_pilot_report(session, item.payload, ctx, sender(item.message), known)
            except ReportRefused as exc:
                item.refusal = (exc.kind, str(exc))
        if any(isinstance(i.payload, SourcesReport) for i in registry):
            session.flush()  # the watchers' rows before the pilots' (key order)
        pilots.write(session, known)
        return tasks

    def _expire(self, session: Session, items: Sequence[Item], ctx: Context) -> list[Task]:
        tasks: list[Task] = []
        for item in items:
            tasks.extend(jobs.expire_task(session, item.payload, item.note, ctx))
        again = {i.payload.job_id for i in items if redelivered(i.message)}
        tasks.extend(jobs.unpublished_tasks(session, ctx, jobs.workflows_of_jobs(session, again)))
        return tasks

    def _context(self, now: float | None = None) -> Context:
        return Context(self.settings, now=time.time() if now is None else now, overloaded=self.overloaded,
                       catalogue=self.catalogue, ids=self.ids)

    def _record(
        self,
        items: list[Item],
        work: Callable[[Session, Sequence[Item], Context], list[Task]],
        buffer: list[Item],
        queue: str,
    ) -> None:
        """Record ``items`` in one transaction; if the database refuses it, halve it until the culprit is alone."""
        try:
            ctx, tasks = self._commit(lambda s, c: work(s, items, c))
        except DatabaseLost as exc:
            # Kept, unacked, in order, and tried again after a pause; the consumer
            # goes on heartbeating meanwhile.
            buffer[:0] = items
            self._database_lost(exc, len(items))
            return
        except Refused as exc:
            if len(items) == 1:
                self._refuse(items[0].message, queue, str(exc))
                return
            half = len(items) // 2
            log.info("dispatcher: a batch of %d was refused (%s); recording it in halves", len(items), exc)
            self._record(items[:half], work, buffer, queue)
            self._record(items[half:], work, buffer, queue)
            return
        self._database_back()
        ctx.committed()
        self._send_orders(ctx)
        for item in items:
            if item.refusal is not None:
                kind, reason = item.refusal
                metrics.REPORTS_REFUSED.labels(kind).inc()
                self._refuse(item.message, queue, reason)
        self._publish_and_ack(tasks, [i.message for i in items if i.refusal is None], ctx.now)

    def _commit(self, work: Callable[[Session, Context], list[Task]]) -> tuple[Context, list[Task]]:
        """Run ``work`` in a transaction and commit; a race with another dispatcher is tried again."""
        last: Exception | None = None
        for attempt in range(3):
            ctx = self._context()
            try:
                with Session(self.engine) as session, session.begin():
                    tasks = self.admission.admit(session, ctx, work(session, ctx))
                return ctx, tasks
            except IntegrityError as exc:
                # Another dispatcher claimed a file name in the same instant:
                # on the next try the name is known and recorded as a duplicate.
                log.info("dispatcher: batch raced another dispatcher, retrying (%d)", attempt + 1)
                last = exc
            except (OperationalError, DBAPIError) as exc:
                if getattr(exc.orig, "sqlstate", None) in RACE_SQLSTATES:
                    # A deadlock or serialisation failure with another dispatcher (or an
                    # operator's command): PostgreSQL rolled the batch back and is fine,
                    # so try again at once rather than wait as for an outage.
                    log.info("dispatcher: batch rolled back by the database (%s), retrying (%d)",
                             printable((str(exc.orig).splitlines() or [""])[0], 200), attempt + 1)
                    last = exc
                    continue
                if isinstance(exc, OperationalError) or exc.connection_invalidated:
                    raise DatabaseLost(str(exc.orig or exc)) from exc
                raise Refused(f"the database refused it: {printable(str(exc.orig or exc))}") from exc
            except SQLAlchemyError as exc:
                raise Refused(f"the database refused it: {printable(str(exc))}") from exc
            except Exception as exc:  # noqa: BLE001 - a message handler is total (STYLE 15)
                log.error("dispatcher: unexpected error recording a batch", exc_info=True)
                raise Refused(f"unexpected error: {exc!r}") from exc
        if isinstance(last, DBAPIError) and getattr(last.orig, "sqlstate", None) in RACE_SQLSTATES:
            # Not the messages' fault: they wait and are tried again, never refused.
            raise DatabaseLost(str(last.orig))
        raise Refused(f"the database refused it: {printable(str(last))}")

    def _database_wait(self) -> float:
        """Seconds until the database is tried again after a failure (0: not waiting)."""
        return max(0.0, self._db_wait_until - time.monotonic())

    def _database_lost(self, exc: BaseException, waiting: int) -> None:
        metrics.DISPATCHER_ERRORS.labels("database").inc()
        log.warning("dispatcher: database unavailable (%s); %d message(s) wait, trying again in %.1fs",
                    printable(str(exc), 300), waiting, self._db_backoff)
        self._db_wait_until = time.monotonic() + self._db_backoff
        self._db_backoff = min(self._db_backoff * 2, BACKOFF_MAX_S)

    def _database_back(self) -> None:
        if self._db_backoff > BACKOFF_START_S:
            log.warning("dispatcher: database available again")
        self._db_backoff = BACKOFF_START_S

    def _publish_and_ack(self, tasks: list[Task], messages: list[Message], now: float) -> None:
        if tasks and not self.publish(tasks, now):
            # The jobs stay queued and unpublished.  The messages go back after a
            # pause; when they come again, their unpublished tasks are published.
            self._held_back.append((time.monotonic() + self._publish_backoff, messages))
            self._publish_backoff = min(self._publish_backoff * 2, BACKOFF_MAX_S)
            return
        if tasks:
            self._publish_backoff = BACKOFF_START_S
        for message in messages:
            if not self._settle(message.ack):
                return

    def _send_orders(self, ctx: Context) -> None:
        """Orders to pilots that the batch decided on (stop a payload whose job already ended)."""
        if not ctx.orders:
            return
        try:
            self.publisher.publish(
                Outgoing(topology.control_exchange, topology.control_routing_key(c.pilot_id), encode(c))
                for c in ctx.orders
            )
        except BrokerUnavailable as exc:
            log.error("dispatcher: %d order(s) to pilots not sent: %s", len(ctx.orders), exc)

    def _hand_back_held(self) -> None:
        now = time.monotonic()
        due = [batch for at, batch in self._held_back if at <= now]
        if not due:
            return
        self._held_back = [(at, batch) for at, batch in self._held_back if at > now]
        for batch in due:
            for message in batch:
                if not self._settle(message.requeue):
                    return

    def publish(self, tasks: list[Task], now: float) -> bool:
        """Publish tasks after their jobs were committed as queued; mark them published; False if not."""
        if not tasks:
            return True
        try:
            for queue in {t.queue for t in tasks} - self._declared:
                topology.declare(self._live, [topology.task_queue(queue, self.settings.broker.max_queue_length)])
                self._declared.add(queue)
            self.publisher.publish(task_message(t, now) for t in tasks)
        except (BrokerUnavailable, *broker.CONNECTION_ERRORS) as exc:
            metrics.DISPATCHER_ERRORS.labels("publish").inc()
            metrics.TASKS_UNCONFIRMED.inc(len(tasks))
            log.error("dispatcher: %d task(s) not confirmed by the broker, kept to publish again: %s",
                      len(tasks), exc)
            return False
        for task in tasks:
            # Labelled with the broker's queue name, as p3s_queue_depth is.
            metrics.TASKS_ENQUEUED.labels(topology.task_queue(task.queue).name).inc()
            log.debug(
                "job %s: enqueued on %s, priority %d, %.1fs left",
                task.job_id,
                task.queue,
                task.priority,
                task.deadline - now,
            )
        for attempt in (1, 2):
            try:
                # One UPDATE, atomic by itself: no ORM session, and no BEGIN and COMMIT round trips.
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                    jobs.mark_published(connection, [t.job_id for t in tasks], time.time())
            except DBAPIError as exc:
                if exc.connection_invalidated and attempt == 1:
                    continue  # the server dropped the pooled connection (no ping before use): once more
                log.warning("dispatcher: could not mark %d task(s) published: %s", len(tasks), exc)
            except SQLAlchemyError as exc:
                # They are in the broker's queues; only a later redelivery could be misled.
                log.warning("dispatcher: could not mark %d task(s) published: %s", len(tasks), exc)
            break
        return True

    # -- periodic -------------------------------------------------------------

    def reap(self, now: float) -> None:
        """Expire late jobs, declare silent pilots lost, fill freed slots, refresh gauges."""
        try:
            ctx, tasks = self._commit(lambda s, c: reaper.reap(s, c))
        except (DatabaseLost, Refused) as exc:
            metrics.DISPATCHER_ERRORS.labels("database").inc()
            log.error("dispatcher: reaper could not run: %s", exc)
            return
        ctx.committed()
        self.publish(tasks, ctx.now)
        try:
            self._refresh_gauges(now)
        except SQLAlchemyError as exc:
            log.error("dispatcher: gauges not refreshed: %s", exc)

    def _refresh_gauges(self, now: float) -> None:
        """Queue depths, pilots and the oldest queued task; and whether to shed new files."""
        with Session(self.engine) as session:
            metrics.export_templates(tpl for _rec, tpl in self.catalogue.active(session).templates)
            export_alarms(session)
            counts = {PilotState(state): n for state, n in
                      session.execute(select(Pilot.state, func.count()).group_by(Pilot.state))}
            for state in PilotState:
                metrics.PILOTS.labels(state).set(counts.get(state, 0))
            oldest = session.scalar(select(func.min(Job.queued_at)).where(Job.state == JobState.QUEUED))
        age = max(0.0, now - oldest) if oldest else 0.0
        metrics.OLDEST_QUEUED_AGE.set(age)
        deepest = 0
        for name in sorted(self._declared):
            queue = topology.task_queue(name, self.settings.broker.max_queue_length)
            try:
                depth = broker.queue_depth(self._live, queue)
            except BrokerUnavailable:
                return
            metrics.QUEUE_DEPTH.labels(queue.name).set(depth)
            deepest = max(deepest, depth)
        limits = self.settings.dispatcher
        overloaded = bool(
            (limits.shed_queue_depth and deepest >= limits.shed_queue_depth)
            or (limits.shed_queue_age_s and age >= limits.shed_queue_age_s)
        )
        if overloaded != self.overloaded:
            log.warning("dispatcher: %s shedding new files (deepest task queue %d, oldest task %.1fs)",
                        "start" if overloaded else "stop", deepest, age)
        self.overloaded = overloaded

    def _reload(self) -> None:
        if self._reload_settings is None:
            return
        try:
            new = self._reload_settings()
        except ConfigError as exc:  # a bad edit must not stop the dispatcher
            log.error("dispatcher: reload refused, keeping the old settings: %s", exc)
            return
        if dict(new.sampling) != dict(self.settings.sampling):
            log.info("dispatcher: sampling now %s (was %s)", dict(new.sampling), dict(self.settings.sampling))
        self.settings = new
        log.info("dispatcher: settings reloaded from %s", new.source_file or "the environment")

    def close(self) -> None:
        self.publisher.close()
