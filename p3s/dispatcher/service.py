"""The dispatcher daemon: consumes events, status reports and dead letters, in batches.

One transaction per batch, then the tasks it made are published with confirms,
then the batch's messages are acked.  So a crash before the commit loses
nothing (RabbitMQ redelivers), and a crash after it is recognised on
redelivery (the event is already recorded).  A committed job whose task never
reached the broker is expired by the reaper at its deadline: counted, not lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from kombu import Connection
from kombu.message import Message
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from p3s import broker, metrics, topology
from p3s.broker import Outgoing, Publisher
from p3s.config import Settings
from p3s.db import Job, Pilot
from p3s.dispatcher import records
from p3s.errors import BrokerUnavailable, ConfigError, InvalidMessage
from p3s.messages import DataEvent, JobReport, PilotReport, Task, encode, parse_status
from p3s.states import JobState, PilotState

log = logging.getLogger(__name__)

DEADLINE_HEADER = "p3s-deadline"


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
        self.publisher = Publisher(settings.broker, exchanges=[topology.tasks_exchange, topology.invalid_exchange])
        self.should_stop = False
        self.reload_requested = False
        self._events: list[tuple[Message, DataEvent]] = []
        self._status: list[tuple[Message, JobReport | PilotReport]] = []
        self._expired: list[tuple[Message, Task, str]] = []
        self._declared: set[str] = set()
        self._next_reap = 0.0
        self._dead_letters = True
        self._live = connection
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
        # RabbitMQ redelivers them, and recording is idempotent.  Cleared here,
        # before consuming starts, because deliveries may arrive as soon as the
        # consumers exist.
        self._events.clear()
        self._status.clear()
        self._expired.clear()
        # The publisher's connection died with the broker too, even if nothing
        # was published meanwhile: its first publish would fail, and the tasks
        # of a whole batch with it.
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
                waiting = self._waiting()
                got = True
                try:
                    # While a batch is open, only take what has already arrived (timeout
                    # 0: a non-blocking read; any positive timeout is rounded up to a
                    # millisecond by poll()).  Under load batches fill by themselves
                    # while a transaction runs; when idle, a wait here would be added
                    # to every file's latency.
                    conn.drain_events(timeout=0 if waiting else safety_interval)
                except TimeoutError:
                    conn.heartbeat_check()
                    got = False
                if self._waiting() and (not got or self._waiting() >= self.settings.dispatcher.batch_size):
                    self.flush()
                yield
            self.flush()

    def on_iteration(self) -> None:
        if self.reload_requested:
            self.reload_requested = False
            self._reload()
        now = time.time()
        if now >= self._next_reap:
            self._next_reap = now + self.settings.dispatcher.reap_interval_s
            self.flush()
            self.reap(now)

    # -- receiving ------------------------------------------------------------

    def _waiting(self) -> int:
        return len(self._events) + len(self._status) + len(self._expired)

    def _on_event(self, message: Message) -> None:
        try:
            self._events.append((message, DataEvent.parse(message.body)))
        except InvalidMessage as exc:
            self._refuse(message, topology.events_queue.name, exc)

    def _on_status(self, message: Message) -> None:
        try:
            self._status.append((message, parse_status(message.body)))
        except InvalidMessage as exc:
            self._refuse(message, topology.status_queue.name, exc)

    def _on_expired(self, message: Message) -> None:
        try:
            self._expired.append((message, Task.parse(message.body), death_reason(message)))
        except InvalidMessage as exc:
            self._refuse(message, topology.expired_queue.name, exc)

    def _refuse(self, message: Message, queue: str, exc: InvalidMessage) -> None:
        """Dead-letter a body we cannot read; never requeue it, never stop for it."""
        metrics.INVALID_MESSAGES.labels(queue).inc()
        log.warning("%s: message refused to p3s.invalid: %s", queue, exc)
        if self._dead_letters:
            message.reject(requeue=False)
            return
        # kombu's in-process transport has no dead-letter exchange: do its job.
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        try:
            self.publisher.publish([Outgoing(topology.invalid_exchange, "", body, headers={"p3s-queue": queue})])
        except BrokerUnavailable:
            log.exception("%s: could not keep the refused message", queue)
        message.ack()

    # -- recording ------------------------------------------------------------

    def flush(self) -> None:
        """Record every buffered message, publish what it made ready, ack."""
        if self._events:
            batch, self._events = self._events, []
            self._record([m for m, _ in batch], lambda s, ctx: records.record_events(s, [e for _, e in batch], ctx))
        if self._status:
            batch2, self._status = self._status, []
            self._record([m for m, _ in batch2], lambda s, ctx: self._apply_reports(s, [r for _, r in batch2], ctx))
        if self._expired:
            batch3, self._expired = self._expired, []

            def expire(s: Session, ctx: records.Context) -> list[Task]:
                out: list[Task] = []
                for _m, task, reason in batch3:
                    out.extend(records.expire_task(s, task, reason, ctx))
                return out

            self._record([m for m, *_ in batch3], expire)

    @staticmethod
    def _apply_reports(session: Session, reports: list[JobReport | PilotReport], ctx: records.Context) -> list[Task]:
        tasks: list[Task] = []
        ended = False
        for report in reports:
            if isinstance(report, PilotReport):
                records.apply_pilot_report(session, report, ctx)
            else:
                tasks.extend(records.apply_job_report(session, report, ctx))
                ended = ended or JobState(report.state).terminal
        if ended:
            # A job that ended may have freed a slot of a stage with max_running.
            tasks.extend(records.release_held(session, ctx))
        return tasks

    def _record(self, messages: list[Message], work: Callable[[Session, records.Context], list[Task]]) -> None:
        for attempt in range(3):
            ctx = records.Context(self.settings, now=time.time(), overloaded=self.overloaded)
            try:
                with Session(self.engine) as session, session.begin():
                    tasks = work(session, ctx)
                break
            except IntegrityError:
                # Another dispatcher claimed a file name in the same instant:
                # on the next try the name is known and recorded as a duplicate.
                log.info("dispatcher: batch raced another dispatcher, retrying (%d)", attempt + 1)
            except SQLAlchemyError as exc:
                metrics.DISPATCHER_ERRORS.labels("database").inc()
                log.error("dispatcher: database error, %d message(s) handed back: %s", len(messages), exc)
                self._give_back(messages)
                time.sleep(1.0)
                return
        else:
            self._give_back(messages)
            return
        self.publish(tasks, ctx.now)
        for message in messages:
            try:
                message.ack()
            except broker.CONNECTION_ERRORS:
                log.warning("dispatcher: ack lost with the connection; the redelivery will be recognised")
                return

    @staticmethod
    def _give_back(messages: list[Message]) -> None:
        for message in messages:
            try:
                message.requeue()
            except broker.CONNECTION_ERRORS:
                return

    def publish(self, tasks: list[Task], now: float) -> None:
        """Publish tasks after their jobs were committed as queued."""
        if not tasks:
            return
        for queue in {t.queue for t in tasks} - self._declared:
            topology.declare(self._live, [topology.task_queue(queue, self.settings.broker.max_queue_length)])
            self._declared.add(queue)
        try:
            self.publisher.publish(task_message(t, now) for t in tasks)
        except BrokerUnavailable as exc:
            # The jobs stay queued in the database; the reaper expires them at their deadline.
            metrics.DISPATCHER_ERRORS.labels("publish").inc()
            log.error("dispatcher: %d task(s) not published, they will expire: %s", len(tasks), exc)
            return
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

    # -- periodic -------------------------------------------------------------

    def reap(self, now: float) -> None:
        """Expire late jobs, declare silent pilots lost, fill freed slots, refresh gauges."""
        ctx = records.Context(self.settings, now=now)
        try:
            with Session(self.engine) as session, session.begin():
                tasks = records.reap(session, ctx)
            self.publish(tasks, ctx.now)
            self._refresh_gauges(now)
        except SQLAlchemyError as exc:
            metrics.DISPATCHER_ERRORS.labels("database").inc()
            log.error("dispatcher: reaper could not run: %s", exc)

    def _refresh_gauges(self, now: float) -> None:
        """Queue depths, pilots and the oldest queued task; and whether to shed new files."""
        with Session(self.engine) as session:
            metrics.export_templates(tpl for _rec, tpl in records.load_catalogue(session).active)
            for state in PilotState:
                count = session.scalar(select(func.count()).select_from(Pilot).where(Pilot.state == state))
                metrics.PILOTS.labels(state).set(count or 0)
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
