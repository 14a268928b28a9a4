"""A consumer of a pilot's task queues that the pilot pauses while it runs a job.

A pilot takes one task at a time and acks it on receipt, so before the ack
frees the prefetch window it stops deliveries from all its queues, and starts
them again after the job.  On RabbitMQ both are done on the raw channel with
care for one rule: a consumer is cancelled only after the broker confirmed it
(``basic.consume-ok``).  kombu's ``Consumer.consume`` starts all but the last
queue with ``nowait``; a task from the first queue could arrive while the
last one's consume was still unconfirmed, and cancelling that consumer then
made RabbitMQ fail the channel (``INTERNAL_ERROR``, ``badkey`` in
``basic.consume_ok``).
"""

from __future__ import annotations

from typing import Any

from kombu import Consumer


def _on_rabbitmq(channel: Any) -> bool:
    return getattr(channel.connection.client.transport, "driver_type", "") == "amqp"


class TaskConsumer(Consumer):  # type: ignore[misc]
    """kombu's Consumer with ``pause`` and a ``consume`` whose every consumer is confirmed.

    With ``hold`` it does not start consuming on entry (kombu's mixin enters
    it on every connection); the owner calls ``consume`` when ready.
    """

    def __init__(self, *args: Any, hold: bool = False, **kwargs: Any) -> None:
        self.hold = hold
        super().__init__(*args, **kwargs)

    def __enter__(self) -> TaskConsumer:
        if not self.hold:
            self.consume()
        return self

    def consume(self, no_ack: bool | None = None) -> None:
        """Consume from every queue (again); on RabbitMQ each start is confirmed before the next is sent.

        A task delivered meanwhile goes to ``on_message`` as usual; the pilot
        only notes it there, and pauses once this returns, when no consume is
        left unconfirmed.  Each start gets a fresh consumer tag.
        """
        if not _on_rabbitmq(self.channel):
            super().consume(no_ack)
            return
        no_ack = self.no_ack if no_ack is None else no_ack
        for queue in list(self._queues.values()):
            self._basic_consume(queue, no_ack=no_ack, nowait=False)

    def pause(self) -> None:
        """Stop deliveries from every queue without waiting for the broker.

        On RabbitMQ the cancels are sent with nowait: frames on a channel are
        handled in order, so a cancel sent before an ack takes effect before
        that ack can free the prefetch window, and no round trip delays the
        start.  Every consumer cancelled here was confirmed by ``consume``.
        """
        channel = self.channel
        if not _on_rabbitmq(channel):
            self.cancel()
            return
        for tag in self._active_tags.values():
            channel.basic_cancel(tag, nowait=True)
            # No cancel-ok will come to drop the callback; a (never expected)
            # delivery for the tag is then rejected back to its queue by amqp.
            channel.callbacks.pop(tag, None)
        self._active_tags.clear()
        self._active_queue_no_ack.clear()

    @property
    def consuming(self) -> bool:
        return bool(self._active_tags)
