"""Exchanges and queues as data; the only module that knows their names.

Every part declares what it uses at start-up with :func:`declare`; declaring is
idempotent, so parts may start in any order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from copy import copy
from typing import Any

import amqp.exceptions
from kombu import Connection, Exchange, Queue

from p3s.errors import ConfigError

MAX_PRIORITY = 9
INVALID_MAX_LENGTH = 10_000

# How the queues are declared on a broker (BrokerSettings.queue_type and
# task_queue_durable): options of the connection, which p3s.broker.connect
# sets and its clones keep, read from the channel a queue is declared on.
QUEUE_TYPE = "queue_type"
TASK_QUEUE_DURABLE = "task_queue_durable"


def _options(channel: Any) -> Mapping[str, Any]:
    # An amqp channel's connection, or kombu's virtual transport, knows its kombu Connection as .client.
    client = getattr(getattr(channel, "connection", None), "client", None)
    return getattr(client, "topology_options", None) or {}


class _DeclaredQueue(Queue):
    """A queue whose declaration depends on the broker it is declared on (see :meth:`declared_as`)."""

    def declared_as(self, options: Mapping[str, Any]) -> Queue:
        return self

    def queue_declare(self, nowait: bool = False, passive: bool = False, channel: Any = None) -> Any:
        channel = channel or self.channel
        queue = self if passive else self.declared_as(_options(channel))
        try:
            if queue is self:
                return super().queue_declare(nowait=nowait, passive=passive, channel=channel)
            return Queue.queue_declare(queue, nowait=nowait, passive=passive, channel=channel)
        except amqp.exceptions.PreconditionFailed as exc:
            if "inequivalent arg" not in str(exc):
                raise
            # RabbitMQ never changes an existing queue's type or durability.
            options = _options(channel)
            raise ConfigError(
                f"queue {self.name} exists on the broker with other arguments than broker.queue_type = "
                f"{options.get(QUEUE_TYPE, 'classic')!r} and broker.task_queue_durable = "
                f"{str(options.get(TASK_QUEUE_DURABLE, True)).lower()} give it ({exc.reply_text}). RabbitMQ "
                f"cannot change a queue's type or durability in place: stop every p3s part, let the dispatcher "
                f"drain the queue, delete it (rabbitmqctl delete_queue -p VHOST {self.name}) and start again, "
                f"or go back to the settings that made it"
            ) from exc


class KeptQueue(_DeclaredQueue):
    """A queue that must not lose a confirmed message: a quorum queue where queue_type is quorum."""

    def declared_as(self, options: Mapping[str, Any]) -> Queue:
        if options.get(QUEUE_TYPE, "classic") != "quorum":
            return self
        typed = copy(self)
        typed.queue_arguments = {**(self.queue_arguments or {}), "x-queue-type": "quorum"}
        return typed


class TaskQueue(_DeclaredQueue):
    """A classic priority queue, transient where task_queue_durable is false.

    A classic queue lives on one node.  Durable, it can be neither used nor
    declared anywhere else while that node is down; transient, RabbitMQ
    deletes it with its node and the next declare makes it on a live node.
    """

    def declared_as(self, options: Mapping[str, Any]) -> Queue:
        if options.get(TASK_QUEUE_DURABLE, True):
            return self
        transient = copy(self)
        transient.durable = False
        return transient

events_exchange = Exchange("p3s.events", type="topic", durable=True)
tasks_exchange = Exchange("p3s.tasks", type="direct", durable=True)
status_exchange = Exchange("p3s.status", type="topic", durable=True)
expired_exchange = Exchange("p3s.expired", type="fanout", durable=True)
invalid_exchange = Exchange("p3s.invalid", type="fanout", durable=True)
# The operator's drain, stop and cancel, to pilots: only the dispatcher's account
# may write it; each pilot reads it through a server-named exclusive queue of its own.
control_exchange = Exchange("p3s.control", type="direct", durable=True)

# A body the dispatcher cannot parse is rejected without requeue and lands here.
_to_invalid = {"x-dead-letter-exchange": invalid_exchange.name}

events_queue = KeptQueue(
    "p3s.dispatcher.events",
    events_exchange,
    routing_key="file.#",
    durable=True,
    queue_arguments=_to_invalid,
)
status_queue = KeptQueue(
    "p3s.dispatcher.status",
    status_exchange,
    routing_key="#",
    durable=True,
    queue_arguments=_to_invalid,
)
expired_queue = KeptQueue(
    "p3s.dispatcher.expired",
    expired_exchange,
    routing_key="",
    durable=True,
    queue_arguments=_to_invalid,
)
# Bounded: it is for inspection, and a flood of garbage must not fill the disk.
invalid_queue = KeptQueue(
    "p3s.invalid",
    invalid_exchange,
    routing_key="",
    durable=True,
    queue_arguments={"x-max-length": INVALID_MAX_LENGTH},
)

DISPATCHER_QUEUES = (events_queue, status_queue, expired_queue)
# Bindings besides each queue's own: (exchange, queue, routing key).
EXTRA_BINDINGS = ((events_exchange, status_queue, "watcher.sources"),)


def event_routing_key(stream: str) -> str:
    return f"file.{stream}"


# A watcher's report of its sources goes out on p3s.events (the only exchange a
# least-privilege watcher may write) and reaches the dispatcher's status queue
# through a binding of its own; the events queue takes file.# only.
WATCHER_REPORT_KEY = EXTRA_BINDINGS[0][2]


def status_routing_key(kind: str, what: str) -> str:
    """``job.<state>`` or ``pilot.<event>``."""
    return f"{kind}.{what}"


def control_routing_key(pilot_id: str) -> str:
    """What a pilot's own control queue is bound with (a direct exchange: no wildcards)."""
    return f"pilot.{pilot_id}"


def task_queue(name: str, max_length: int = 0) -> Queue:
    """The queue pilots of ``name`` consume: priorities, and dead letters to p3s.expired.

    ``max_length`` bounds it: RabbitMQ then drops the oldest task first and
    dead-letters it, so shed work is still seen and counted by the dispatcher.
    Every part must declare a queue with the same arguments, so the bound comes
    from the shared configuration.
    """
    args: dict[str, object] = {"x-dead-letter-exchange": expired_exchange.name}
    if max_length:
        args["x-max-length"] = max_length
        args["x-overflow"] = "drop-head"
    return TaskQueue(
        f"p3s.tasks.{name}",
        tasks_exchange,
        routing_key=name,
        durable=True,
        max_priority=MAX_PRIORITY,
        queue_arguments=args,
    )


def declare(connection: Connection, queues: Iterable[Queue] = (), exchanges: Iterable[Exchange] = ()) -> None:
    """Declare exchanges and queues (and their bindings) on ``connection``."""
    channel = connection.default_channel
    for exchange in exchanges:
        exchange(channel).declare()
    for queue in queues:
        bound = queue(channel)
        bound.exchange.declare()
        bound.declare()


def declare_all(connection: Connection, task_queue_names: Iterable[str], max_length: int = 0) -> None:
    """Declare the whole topology: what the dispatcher and ``p3s run`` use."""
    _declare_all(connection, task_queue_names, max_length)
    for exchange, queue, key in EXTRA_BINDINGS:
        queue(connection.default_channel).bind_to(exchange, routing_key=key)


def _declare_all(connection: Connection, task_queue_names: Iterable[str], max_length: int) -> None:
    declare(
        connection,
        queues=[*DISPATCHER_QUEUES, invalid_queue, *(task_queue(n, max_length) for n in task_queue_names)],
        exchanges=[events_exchange, tasks_exchange, status_exchange, expired_exchange, invalid_exchange,
                   control_exchange],
    )
