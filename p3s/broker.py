"""Connections and confirmed publishing: the one module that touches kombu and amqp internals.

Library errors are translated here into :class:`BrokerUnavailable`, so callers
never catch ``amqp.*`` or socket errors.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import amqp
import amqp.exceptions
import kombu.exceptions
from kombu import Connection, Exchange, Producer, Queue
from kombu.mixins import ConsumerMixin

from p3s import topology
from p3s.config import BrokerSettings
from p3s.errors import BrokerUnavailable

log = logging.getLogger(__name__)

#: What a lost or refused connection can raise, for ``except`` clauses at the boundary.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    socket.timeout,
    amqp.exceptions.ConnectionError,
    amqp.exceptions.ChannelError,
    amqp.exceptions.RecoverableConnectionError,
    kombu.exceptions.OperationalError,  # kombu wraps a refused connection in this
)


#: Heartbeat frames per negotiated interval.  RabbitMQ closes a connection it
#: heard nothing from for one interval (two of its half-interval beats), so a
#: client that beats only twice an interval, checked once a second, can miss
#: it under load; four, checked a quarter interval apart, cannot.
HEARTBEAT_RATE = 4


def turn_s(settings: BrokerSettings, longest: float = 1.0) -> float:
    """How long a consumer loop may wait for the broker before it must beat again."""
    return min(longest, settings.heartbeat_s / HEARTBEAT_RATE) if settings.heartbeat_s > 0 else longest


#: The broker refused an operation for lack of permission: retrying cannot help.
ACCESS_REFUSED = amqp.exceptions.AccessRefused


class BrokerConnection(Connection):
    """A kombu Connection that hands how p3s's queues are declared on its broker to its clones.

    kombu's consumers reconnect on clones of their connection, and
    :mod:`p3s.topology` reads these options from the channel it declares on,
    so whichever part declares a queue, on whichever node, declares it alike.
    """

    def __init__(self, *args: Any, topology_options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topology_options = dict(topology_options or {})

    def clone(self, **kwargs: Any) -> Connection:
        return super().clone(**{"topology_options": self.topology_options, **kwargs})

    @property
    def connection(self) -> Any:
        # kombu opens a lost connection again on its next use, trying the next
        # node: a consumer would then drain a connection on which it has no
        # consumers, and wait for ever.  Say it was lost instead, so that the
        # consumer's reconnect makes a new connection with new consumers.
        if self._connection is not None and not self._closed and not self.connected:
            raise amqp.exceptions.RecoverableConnectionError(f"connection to the broker at {self.as_uri()} lost")
        return super().connection


def connect(settings: BrokerSettings, heartbeat: float | None = None) -> Connection:
    """A lazy kombu connection to the configured broker (nothing is sent yet).

    With several node URLs it is kombu's failover connection: every try that
    fails moves it to the next node, round-robin.  For ``shuffle`` the order
    is shuffled once here, so each connection visits every node in a pass
    (kombu's own shuffle draws with replacement and may miss a live node).
    """
    options = {topology.QUEUE_TYPE: settings.queue_type, topology.TASK_QUEUE_DURABLE: settings.task_queue_durable}
    if settings.embedded:
        # kombu's in-process transport polls its queues; the default 1 s would
        # dominate every latency, so poll often.
        return BrokerConnection(settings.effective_url, transport_options={"polling_interval": 0.005},
                                topology_options=options)
    urls = list(settings.node_urls)
    if settings.failover_strategy == "shuffle":
        random.shuffle(urls)
    ssl_options: Any = False
    if any(u.startswith("amqps://") for u in urls) or settings.ssl_ca:
        ssl_options = {"cert_reqs": ssl.CERT_REQUIRED}
        if settings.ssl_ca:
            ssl_options["ca_certs"] = settings.ssl_ca
        if settings.ssl_cert:
            ssl_options["certfile"] = settings.ssl_cert
            ssl_options["keyfile"] = settings.ssl_key or None
    return BrokerConnection(
        urls if len(urls) > 1 else urls[0],
        heartbeat=settings.heartbeat_s if heartbeat is None else heartbeat,
        ssl=ssl_options,
        connect_timeout=5,
        failover_strategy="round-robin",
        topology_options=options,
    )


def nodes_of(connection: Connection) -> int:
    """How many broker nodes ``connection`` may fail over between."""
    return max(1, len(connection.alt or ()))


def ensure_connected(connection: Connection, max_retries: int | None = 0, waiting: str = "") -> Connection:
    """Open ``connection`` now; BrokerUnavailable (URLs masked) if no node answers.

    ``max_retries`` counts passes over the nodes: 0 tries each node once, so a
    one-shot command reaches a cluster whose first node is down.  kombu
    pauses only after a whole pass.  ``waiting``: who waits (a daemon's
    name); each failed try is then said at WARNING, with the URL masked and
    the pause before the next.
    """
    nodes = nodes_of(connection)

    def errback(exc: BaseException, interval: float) -> None:
        then = f"trying again in {interval:.1f}s" if interval else "trying the next node"
        log.warning("%s: waiting for the broker at %s (%s); %s", waiting, connection.as_uri(), exc, then)

    retries = None if max_retries is None else (max_retries + 1) * nodes - 1
    try:
        connection.ensure_connection(errback=errback if waiting else None, max_retries=retries,
                                     interval_start=0.2, interval_step=1.0, interval_max=2)
    except CONNECTION_ERRORS as exc:
        where = connection.as_uri() if nodes == 1 else f"any of its {nodes} nodes (last {connection.as_uri()})"
        raise BrokerUnavailable(f"cannot reach the broker at {where}: {exc}") from exc
    return connection


class ReconnectingConsumer(ConsumerMixin):
    """kombu's ConsumerMixin with reconnection steps short enough for prompt processing.

    The mixin waits 2, 4, 6 ... up to 30 s between tries; after a broker
    restart that leaves pilots off their queues, and files waiting, for up
    to half a minute.
    """

    connection: Connection

    @contextmanager
    def establish_connection(self) -> Iterator[Connection]:
        with self.create_connection() as conn:
            conn.ensure_connection(
                self.on_connection_error,
                self.connect_max_retries,
                interval_start=0.5,
                interval_step=0.5,
                interval_max=5.0,
            )
            yield conn


def cancel_consumer(consumer: Any) -> None:
    """Stop a kombu Consumer's deliveries without waiting for the broker's cancel-ok.

    On RabbitMQ the cancel is sent with nowait: frames on a channel are handled
    in order, so a cancel sent before an ack takes effect before that ack can
    free the prefetch window, and the pilot saves a round trip before every
    start.  kombu's Consumer.cancel would wait for it.
    """
    channel = consumer.channel
    if getattr(channel.connection.client.transport, "driver_type", "") != "amqp":
        consumer.cancel()
        return
    for tag in consumer._active_tags.values():
        channel.basic_cancel(tag, nowait=True)
    consumer._active_tags.clear()
    consumer._active_queue_no_ack.clear()


def supports_dead_letters(connection: Connection) -> bool:
    """True on RabbitMQ; kombu's in-process transport knows no dead-letter exchange."""
    return connection.transport.driver_type == "amqp"


def queue_depth(connection: Connection, queue: Queue) -> int:
    """Messages ready in ``queue`` right now (0 if it does not exist)."""
    return queue_counts(connection, queue)[0]


def queue_counts(connection: Connection, queue: Queue) -> tuple[int, int]:
    """Messages ready in ``queue`` and consumers on it; (0, 0) if it does not exist.

    Asked on a channel of its own: a passive declare of a missing queue closes
    its channel, and that must never be a consumer's.
    """
    try:
        channel = connection.channel()
    except CONNECTION_ERRORS as exc:
        raise BrokerUnavailable(f"cannot read {queue.name}: {exc}") from exc
    try:
        _name, depth, consumers = queue(channel).queue_declare(passive=True)
    except (amqp.exceptions.NotFound, kombu.exceptions.ChannelError):
        return 0, 0
    except CONNECTION_ERRORS as exc:
        if "NOT_FOUND" in str(exc):
            return 0, 0
        raise BrokerUnavailable(f"cannot read {queue.name}: {exc}") from exc
    finally:
        try:
            channel.close()
        except CONNECTION_ERRORS:
            log.debug("queue counts: channel already closed")
    return int(depth), int(consumers)


@dataclass
class Outgoing:
    """One message to publish: where, what, and its AMQP properties."""

    exchange: Exchange
    routing_key: str
    body: bytes
    priority: int = 0
    expiration: float | None = None  # seconds
    headers: dict[str, Any] = field(default_factory=dict)


class Publisher:
    """Publishes batches with publisher confirms on a connection of its own, and keeps it alive.

    A confirm round trip costs about a millisecond; waiting for one per message
    would cap the dispatcher near a thousand messages a second, so a batch is
    sent at once and the confirms are awaited together.  ``publish`` returns
    only when the broker has confirmed every message of the batch.

    An idle publishing connection reads nothing, so without help it neither
    sends heartbeats nor sees the broker's: RabbitMQ closes it after two missed
    heartbeats, and the next publish fails.  A keep-alive thread therefore
    drains the broker's frames and sends heartbeats between publishes (under a
    lock: an AMQP connection is not safe for two threads at once).  A message
    not confirmed because the connection failed is sent again, once, on a
    fresh connection.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        exchanges: Iterable[Exchange] = (),
        queues: Iterable[Queue] = (),
        confirm_timeout: float = 30.0,
        keepalive: bool = True,
    ):
        self._settings = settings
        self._exchanges = tuple(exchanges)
        # Declared with their bindings on every (re)connection, so what is
        # published before its consumer ever ran waits in its queue instead of
        # being dropped as unroutable.
        self._queues = tuple(queues)
        self._confirm_timeout = confirm_timeout
        self._conn: Connection | None = None
        self._channel: Any = None
        self._confirms = False
        self._producer: Any = None
        self._sent = 0
        self._outstanding: set[int] = set()
        self._nacked: list[int] = []
        self._lock = threading.RLock()
        self._user_id: str | None = None
        self._keepalive = keepalive and not settings.embedded and settings.heartbeat_s > 0
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def _open(self) -> None:
        conn = ensure_connected(connect(self._settings), max_retries=0)
        channel = conn.channel()
        if self._settings.declare_topology:
            for exchange in self._exchanges:
                exchange(channel).declare()
            for queue in self._queues:
                bound = queue(channel)
                bound.exchange.declare()
                bound.declare()
        self._confirms = supports_dead_letters(conn)
        if self._confirms:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
        self._conn, self._channel = conn, channel
        # RabbitMQ checks a message's user_id against the login of its connection, so
        # a consumer can trust it to name the account that sent the message.
        self._user_id = conn.userid if self._settings.stamp_user_id and conn.userid else None
        self._producer = Producer(channel)
        self._sent = 0
        self._outstanding = set()
        self._nacked = []
        if self._keepalive and self._thread is None:
            self._closed.clear()
            self._thread = threading.Thread(target=self._keep_alive, name="publisher-keepalive", daemon=True)
            self._thread.start()

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self._outstanding = {t for t in self._outstanding if t > tag}
        else:
            self._outstanding.discard(tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._nacked.append(tag)
        self._on_ack(tag, multiple)

    def publish(self, messages: Iterable[Outgoing]) -> int:
        """Publish ``messages`` and wait for their confirms; return how many were sent.

        If the connection fails on the way, the messages not yet confirmed are
        sent again on a new connection, once.  Raises BrokerUnavailable if that
        fails too, or if the broker refused (nacked) one; the caller then knows
        the batch cannot be counted as delivered.
        """
        batch = list(messages)
        if not batch:
            return 0
        with self._lock:
            unconfirmed, exc = self._publish_once(batch)
            if exc is not None:
                self._close()
                log.info("publisher: connection failed (%s), sending %d unconfirmed message(s) again",
                         exc, len(unconfirmed))
                unconfirmed, exc = self._publish_once(unconfirmed)
                if exc is not None:
                    self._close()
                    raise BrokerUnavailable(f"publish failed: {exc}") from exc
            if self._nacked:
                nacked, self._nacked = self._nacked, []
                # The next try goes on a new connection: a channel that first
                # spoke to a quorum queue while its leader was dying is seen to
                # go on refusing everything (RabbitMQ 3.10), when a new one is not.
                self._close()
                raise BrokerUnavailable(f"the broker refused {len(nacked)} message(s)")
        return len(batch)

    def _publish_once(self, batch: list[Outgoing]) -> tuple[list[Outgoing], BaseException | None]:
        """Send and await confirms; on a connection error, the messages not confirmed and the error."""
        tags: dict[int, Outgoing] = {}
        try:
            if self._conn is None:
                self._open()
            for msg in batch:
                self._send(msg)
                self._sent += 1
                if self._confirms:
                    self._outstanding.add(self._sent)
                    tags[self._sent] = msg
            if self._confirms:
                self._wait_confirms()
        except CONNECTION_ERRORS as exc:
            sent = [m for t, m in tags.items() if t in self._outstanding]
            return sent + batch[len(tags):], exc
        except BrokerUnavailable as exc:  # the reconnect itself failed
            return batch, exc
        return [], None

    def _send(self, msg: Outgoing) -> None:
        # AMQP wants whole milliseconds; never 0 or less, which would drop the
        # task before any pilot could even refuse it.
        expiration = None if msg.expiration is None else max(msg.expiration, 0.001)
        if not self._confirms:  # kombu's in-process transport: its own message format
            self._producer.publish(
                msg.body,
                exchange=msg.exchange,
                routing_key=msg.routing_key,
                priority=msg.priority,
                expiration=expiration,
                headers=msg.headers,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                retry=False,
            )
            return
        # On RabbitMQ, straight to the channel: kombu's Producer costs four
        # times as much per message, which shows in the dispatcher's batches.
        properties: dict[str, Any] = {"delivery_mode": 2}
        if self._user_id:
            properties["user_id"] = self._user_id
        if expiration is not None:
            properties["expiration"] = str(int(expiration * 1000) or 1)
        message = amqp.Message(
            msg.body,
            content_type="application/json",
            content_encoding="utf-8",
            priority=msg.priority,
            application_headers=msg.headers,
            **properties,
        )
        self._channel.basic_publish(message, exchange=msg.exchange.name, routing_key=msg.routing_key)

    def _wait_confirms(self) -> None:
        assert self._conn is not None
        end = time.monotonic() + self._confirm_timeout
        while self._outstanding:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no confirm for {len(self._outstanding)} message(s)")
            try:
                self._conn.drain_events(timeout=min(left, 1.0))
            except TimeoutError:
                self._conn.heartbeat_check(rate=HEARTBEAT_RATE)

    def heartbeat_check(self) -> None:
        """Read the broker's frames and send a heartbeat if one is due; close a dead connection."""
        with self._lock:
            if self._conn is None or not self._confirms:
                return
            try:
                try:
                    self._conn.drain_events(timeout=0)
                except TimeoutError:
                    pass
                self._conn.heartbeat_check(rate=HEARTBEAT_RATE)
            except CONNECTION_ERRORS as exc:
                # Reopened by the next publish; nothing was in flight.
                log.info("publisher: idle connection closed (%s); the next publish reconnects", exc)
                self._close()

    def _keep_alive(self) -> None:
        interval = max(0.2, self._settings.heartbeat_s / 4)
        while not self._closed.wait(interval):
            self.heartbeat_check()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except CONNECTION_ERRORS:
                log.debug("publisher: error while closing", exc_info=True)
        self._conn = self._channel = None

    def close(self) -> None:
        with self._lock:
            self._close()
        self._closed.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)


def headers_of(message: Any) -> Mapping[str, Any]:
    return getattr(message, "headers", None) or {}
