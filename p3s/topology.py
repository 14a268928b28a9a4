"""Exchanges and queues as data; the only module that knows their names.

Every part declares what it uses at start-up with :func:`declare`; declaring is
idempotent, so parts may start in any order.
"""

from __future__ import annotations

from collections.abc import Iterable

from kombu import Connection, Exchange, Queue

MAX_PRIORITY = 9
INVALID_MAX_LENGTH = 10_000

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

events_queue = Queue(
    "p3s.dispatcher.events",
    events_exchange,
    routing_key="file.#",
    durable=True,
    queue_arguments=_to_invalid,
)
status_queue = Queue(
    "p3s.dispatcher.status",
    status_exchange,
    routing_key="#",
    durable=True,
    queue_arguments=_to_invalid,
)
expired_queue = Queue(
    "p3s.dispatcher.expired",
    expired_exchange,
    routing_key="",
    durable=True,
    queue_arguments=_to_invalid,
)
# Bounded: it is for inspection, and a flood of garbage must not fill the disk.
invalid_queue = Queue(
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
    return Queue(
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
