"""The pilot daemon: takes one task at a time, runs it, reports, never retries.

A pilot needs broker credentials only.  It acks a task the moment it takes it
(no redelivery, and no ``consumer_timeout`` for a long job), checks the
deadline before running anything, and sends heartbeats throughout so the
dispatcher can tell a dead pilot from a busy one.

Every report about a job carries the task's token, the dispatcher's proof
that the sender took that very task.  The token goes no further than those
reports: not to the log, not to the payload (its runner is given the task
without it), not to disk.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kombu import Connection, Queue
from kombu.message import Message

from p3s import broker, metrics, topology
from p3s.broker import Outgoing, Publisher
from p3s.config import Settings
from p3s.errors import BrokerUnavailable, InvalidMessage
from p3s.messages import Control, JobReport, PilotReport, Task, encode
from p3s.pilot.admission import refusal
from p3s.pilot.consumer import TaskConsumer
from p3s.pilot.contain import Containment
from p3s.pilot.identity import payload_identity
from p3s.pilot.runner import KillRequest, Outcome, log_path, root_problem, run_payload
from p3s.pilot.stagein import stage_in
from p3s.results.manifest import read_results, refused_results
from p3s.states import JobState, PilotState

log = logging.getLogger(__name__)

OUTBOX_MAX = 10_000
ROOT_RECHECK_S = 5.0  # how often a broken pilot tries its roots again (at most; its heartbeat if shorter)
REDELIVERED = "delivered again by the broker after a failure; it may have run already, so it is not run twice"
CANCELLED = "cancelled by operator"
STOPPED_BY_OPERATOR = "stopped by operator"


@dataclass(frozen=True)
class Limits:
    """When a pilot stops by itself; 0 means never."""

    max_jobs: int = 0
    idle_exit_s: float = 0.0
    lifetime_s: float = 0.0


def new_pilot_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Pilot(broker.ReconnectingConsumer):
    """A long-lived consumer of task queues that runs one payload at a time."""

    def __init__(
        self,
        settings: Settings,
        connection: Connection,
        queues: tuple[str, ...] | None = None,
        limits: Limits | None = None,
        pilot_id: str | None = None,
    ) -> None:
        # First, before any connection of its own: a pilot that may not run its
        # payloads as the configured user does not start (ConfigError).
        self.run_as = payload_identity(settings.pilot.payload_user)
        self.settings = settings
        self.connection = connection
        self.queues = tuple(queues or settings.pilot.queues)
        self.limits = limits or Limits(settings.pilot.max_jobs, settings.pilot.idle_exit_s, settings.pilot.lifetime_s)
        self.id = pilot_id or new_pilot_id()
        self.publisher = Publisher(
            settings.broker,
            exchanges=[topology.status_exchange],
            queues=[topology.invalid_queue, topology.status_queue],
        )
        self.should_stop = False
        self.kill_requested = False
        # Told by the operator (p3s.control): take no new task, exit after the current job.
        self.draining = False
        self.stopped_by = ""  # said in the goodbye: "stopped by operator"
        self._kill: KillRequest | None = None  # the operator's stop --now or cancel of the current job
        self.jobs_done = 0
        self._born = time.monotonic()
        self._idle_since = time.monotonic()
        self._next_beat = 0.0
        self._consumer: Any = None
        self._message: Message | None = None
        self._current: Task | None = None
        self._outbox: deque[Outgoing] = deque(maxlen=OUTBOX_MAX)
        self._registered = False
        self.refused = ""
        self._live = connection
        self.connections = 0  # times it started consuming: more than one means its channel was lost
        # Why this pilot takes no tasks (its work or log root is unusable); "" when healthy.
        self.problem = ""
        self._next_check = 0.0
        self._contain: Containment | None = None
        if self.run_as is not None:
            log.info("pilot %s: runs payloads as user %s (uid %d, gid %d)",
                     self.id, self.run_as.name, self.run_as.uid, self.run_as.gid)

    # -- kombu hooks --------------------------------------------------------

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        queues = [topology.task_queue(q, self.settings.broker.max_queue_length) for q in self.queues]
        # One unacked task per channel, whatever the number of queues, set before
        # consuming starts: a per-consumer limit would let one task per queue
        # wait here, and a limit set after basic.consume lets a burst through.
        channel.basic_qos(0, 1, True)
        self._check_roots()
        control = self._control_consumer(Consumer, channel)
        try:
            self._consumer = TaskConsumer(
                channel,
                queues=queues,
                on_message=self._on_task,
                auto_declare=self.settings.broker.declare_topology,
                on_decode_error=self.on_decode_error,
                # A pilot that cannot prepare a job takes none, not even the first.
                hold=bool(self.problem),
            )
        except broker.ACCESS_REFUSED as exc:
            # kombu would retry this for ever; no retry can grant a permission.
            self.refused = f"the broker refused to let pilot {self.id} declare its queues ({exc})"
            log.error("pilot %s: %s; a least-privilege pilot needs broker.declare_topology = false",
                      self.id, self.refused)
            self.should_stop = True
            raise
        return [control, self._consumer]

    def _control_consumer(self, Consumer: Any, channel: Any) -> Any:
        """A consumer of this pilot's own control queue: server-named, exclusive, bound to p3s.control.

        It goes with the connection: a new one gets a new queue, so no stale
        order waits for a pilot.  Consumed without acks (an order is carried
        out at once or not at all), so it never takes the prefetch window of
        the tasks on the same channel.
        """
        try:
            if self.settings.broker.declare_topology:
                topology.control_exchange(channel).declare()
            name = channel.queue_declare(queue="", exclusive=True, auto_delete=True).queue
            channel.queue_bind(name, exchange=topology.control_exchange.name,
                               routing_key=topology.control_routing_key(self.id))
        except broker.ACCESS_REFUSED as exc:
            self.refused = f"the broker refused pilot {self.id} a control queue on p3s.control ({exc})"
            log.error("pilot %s: %s; the pilot account needs the permissions of config/rabbitmq/definitions.json",
                      self.id, self.refused)
            self.should_stop = True
            raise
        return Consumer(queues=[Queue(name, no_declare=True)], on_message=self._on_control, no_ack=True,
                        auto_declare=False)

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: Any, **kwargs: Any) -> None:
        # The connection consuming (a clone of self.connection): the one whose
        # AMQP heartbeats must go on while a long payload runs.
        self._live = connection
        self.connections += 1
        if not self._registered:
            self._registered = True
            self._report_pilot("register")
        log.info("pilot %s: waiting for tasks on %s", self.id, ", ".join(self.queues))

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        log.warning("pilot %s: broker connection lost (%s), retrying in %.1fs", self.id, exc, interval)

    def consume(
        self, limit: int | None = None, timeout: float | None = None, safety_interval: float = 1.0, **kwargs: Any
    ) -> Iterator[None]:
        """ConsumerMixin's loop, running the task taken (outside the message callback)."""
        with self.consumer_context(**kwargs) as (conn, _channel, _consumers):
            while not self.should_stop:
                if self.draining:
                    if self._message is not None:
                        # Delivered with the order to drain: not taken, handed back for another pilot.
                        message, self._message = self._message, None
                        self._consumer.pause()
                        self._hand_back(message)
                    log.info("pilot %s: drained (told by the operator); stopping", self.id)
                    break
                if self._message is not None:
                    message, self._message = self._message, None
                    task = self._take(message)
                    if task is not None:
                        if self._execute(task) != JobState.FINISHED:
                            self._check_roots()  # was it the disk?
                        if self._limits_reached():
                            break
                        self._idle_since = time.monotonic()
                    if not self.should_stop and not self.problem and not self.draining:
                        # A task delivered while this starts is taken on the next turn, not after a drain.
                        self._consumer.consume()
                elif self.problem and not self.draining and time.monotonic() >= self._next_check:
                    self._check_roots()
                    if not self.problem:
                        self._consumer.consume()
                self._beat()
                if self._message is None:
                    try:
                        conn.drain_events(timeout=min(safety_interval, self.settings.pilot.heartbeat_s,
                                                      broker.turn_s(self.settings.broker)))
                    except TimeoutError:
                        conn.heartbeat_check(rate=broker.HEARTBEAT_RATE)
                        if self._limits_reached():
                            break
                yield
        self.should_stop = True

    # -- taking a task ------------------------------------------------------

    def _on_task(self, message: Message) -> None:
        # Only noted here: this may run inside the broker wait of a consume or
        # a drain, where pausing the consumer is not safe; the loop takes it.
        if self._message is not None:
            # Cannot happen with a prefetch of one; if it does, the task goes back untouched.
            message.requeue()
            return
        self._message = message

    def _take(self, message: Message) -> Task | None:
        """Pause deliveries and settle ``message``: the task to run now, or None."""
        # Stop deliveries before the ack opens the prefetch window, so no second
        # task waits in this pilot's buffer, invisible to idle pilots.
        self._consumer.pause()
        try:
            task = Task.parse(message.body)
        except Exception as exc:  # noqa: BLE001 -- whatever the body, it must not stop the pilot
            self._refuse(message, exc)
            return None
        if (message.delivery_info or {}).get("redelivered"):
            # The broker delivered it before, and its ack may have been lost with
            # a broker node: it may have run already, and a job runs at most once.
            message.ack()
            metrics.PILOT_TASKS.labels("redelivered").inc()
            log.warning("job %s: %s", task.job_id, REDELIVERED)
            self._report_job(task, JobReport(task.job_id, JobState.LOST, self.id, reason=REDELIVERED,
                                             ended_at=time.time(), redelivered=True))
            return None
        left = self._life_left()
        if left is not None and left < task.wall_s:
            # Hand it back untouched for a pilot with time to finish it, and retire.
            # On RabbitMQ it is rejected to p3s.expired (x-death reason
            # `rejected`), where the dispatcher publishes a fresh copy: a
            # requeued one would come back flagged as redelivered, like one
            # whose pilot died.  The in-process transport has no dead letters.
            self._hand_back(message)
            log.info(
                "pilot %s: %.0fs of life left, less than job %s's wall limit of %.0fs; stopping",
                self.id,
                left,
                task.job_id,
                task.wall_s,
            )
            self.should_stop = True
            return None
        message.ack()
        return task

    def _hand_back(self, message: Message) -> None:
        """Give an untouched task back: to p3s.expired on RabbitMQ (a fresh copy follows), requeued in-process."""
        if broker.supports_dead_letters(self._live):
            message.reject(requeue=False)
        else:
            message.requeue()

    # -- the operator's orders ------------------------------------------------

    def _on_control(self, message: Message) -> None:
        """An order from p3s.control: noted in flags, carried out by the loop and between the payload's slices."""
        try:
            control = Control.parse(message.body)
        except InvalidMessage as exc:
            # Not to p3s.invalid: a least-privilege pilot may write to p3s.status only.
            log.error("pilot %s: unreadable control message ignored: %s", self.id, exc)
            return
        if control.pilot_id != self.id:
            log.warning("pilot %s: control message for pilot %s ignored", self.id, control.pilot_id)
            return
        if control.action == "cancel_job":
            current = self._current
            if current is None or current.job_id != control.job_id:
                log.info("pilot %s: told to cancel job %s, which it does not run; nothing to do",
                         self.id, control.job_id)
            elif self._kill is None:
                log.warning("job %s: %s; pilot %s ends its payload", control.job_id, CANCELLED, self.id)
                self._kill = KillRequest(JobState.DROPPED, CANCELLED)
            return
        if not self.draining:
            log.warning("pilot %s: told to %s by the operator%s; takes no new task", self.id,
                        "stop at once" if control.action == "stop_now" else control.action,
                        f" (host {control.host})" if control.host else "")
        self.draining = True
        self.stopped_by = STOPPED_BY_OPERATOR
        self._next_beat = 0.0  # say so at once
        if control.action == "stop_now" and self._current is not None and self._kill is None:
            self._kill = KillRequest(JobState.DROPPED,
                                     f"{STOPPED_BY_OPERATOR}: pilot {self.id} was told to stop at once")

    def _read_control(self) -> None:
        """While a payload runs: take what the broker sent (only control orders: the task consumer is paused)."""
        try:
            self._live.drain_events(timeout=0)
        except TimeoutError:
            pass
        except broker.CONNECTION_ERRORS:
            log.debug("pilot %s: control queue not read", self.id, exc_info=True)

    def _between_slices(self) -> None:
        self._beat()
        self._read_control()

    def _refuse(self, message: Message, exc: Exception) -> None:
        """An unreadable task: rejected to p3s.expired, where the dispatcher moves it to p3s.invalid.

        Not published to p3s.invalid from here: a least-privilege pilot may
        write to p3s.status only, and a refused publish would block its reports.
        """
        reason = str(exc) if isinstance(exc, InvalidMessage) else f"unexpected {type(exc).__name__}: {exc}"
        log.error("pilot %s: unreadable task refused: %s", self.id, reason,
                  exc_info=not isinstance(exc, InvalidMessage))
        metrics.PILOT_TASKS.labels("invalid").inc()
        if broker.supports_dead_letters(self._live):
            message.reject(requeue=False)
            return
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode(errors="replace")
        queue = str((message.delivery_info or {}).get("routing_key", ""))
        self._send(Outgoing(topology.invalid_exchange, "", body,
                            headers={"p3s-reason": reason[:1000], "p3s-queue": queue}))
        message.ack()

    def _check_roots(self) -> None:
        """Take tasks only while a job can be prepared here; say why not in the heartbeats."""
        pilot = self.settings.pilot
        problem = root_problem(pilot.work_root, self.settings.log_path, self.run_as)
        self._next_check = time.monotonic() + min(ROOT_RECHECK_S, pilot.heartbeat_s)
        if problem == self.problem:
            return
        if problem:
            log.error("pilot %s: takes no tasks until this is mended: %s", self.id, problem)
        else:
            log.warning("pilot %s: its roots are usable again (was: %s); taking tasks", self.id, self.problem)
        self.problem = problem
        self._next_beat = 0.0  # say so at once

    def _life_left(self) -> float | None:
        if not self.limits.lifetime_s:
            return None
        return self.limits.lifetime_s - (time.monotonic() - self._born)

    def _limits_reached(self) -> bool:
        if self.draining:
            log.info("pilot %s: drained (told by the operator); stopping", self.id)
            return True
        lim = self.limits
        if lim.max_jobs and self.jobs_done >= lim.max_jobs:
            log.info("pilot %s: ran %d job(s), its maximum; stopping", self.id, self.jobs_done)
            return True
        if lim.idle_exit_s and time.monotonic() - self._idle_since >= lim.idle_exit_s:
            log.info("pilot %s: idle for %.0fs; stopping", self.id, lim.idle_exit_s)
            return True
        left = self._life_left()
        if left is not None and left <= 0:
            log.info("pilot %s: lifetime of %.0fs reached; stopping", self.id, lim.lifetime_s)
            return True
        return False

    # -- running it -----------------------------------------------------------

    def _execute(self, task: Task) -> JobState:
        """Run ``task`` and report how it ended; the state it ended in."""
        now = time.time()
        reason = refusal(task, now)
        if reason is not None:
            metrics.PILOT_TASKS.labels(reason).inc()
            log.info(
                "job %s: refused (%s), %.1fs left, expected %.1fs",
                task.job_id,
                reason,
                task.deadline - now,
                task.expected_s,
            )
            self._report_job(task, JobReport(task.job_id, JobState.EXPIRED, self.id, reason=reason, ended_at=now))
            self.jobs_done += 1
            return JobState.EXPIRED
        # No heartbeat here: its confirm would delay the start; the 'running'
        # report follows the start at once and the next beat says busy.
        self._current = task
        log.info("job %s: running %s/%s", task.job_id, task.template, task.node)
        logfile = str(log_path(self.settings.log_path, task))
        # The runner, the stage-in and the payload never see the token: nothing
        # there can leak what they are not given.
        blind = dataclasses.replace(task, token="")
        try:
            self._contain = Containment(self.id, task.job_id)
            outcome = run_payload(
                blind,
                work_root=self.settings.pilot.work_root or None,
                log_root=self.settings.log_path,
                output_root=self.settings.output_root,
                on_start=lambda t: self._report_job(
                    task, JobReport(task.job_id, JobState.RUNNING, self.id, started_at=t, log=logfile)
                ),
                between_slices=self._between_slices,
                kill_requested=lambda: self.kill_requested or self._kill,
                kill_grace_s=self.settings.pilot.kill_grace_s,
                slice_s=min(self.settings.pilot.heartbeat_s, broker.turn_s(self.settings.broker)),
                stage_in=stage_in,
                contain=self._contain,
                run_as=self.run_as,
            )
        except Exception as exc:  # noqa: BLE001 -- the task was acked: it must end with a report
            log.error("job %s: pilot %s failed to run it: %r", task.job_id, self.id, exc, exc_info=True)
            reason = f"pilot error while running the job: {exc!r}"
            outcome = Outcome(JobState.FAILED, None, None, time.time(), "", reason)
        finally:
            self._current = None
            self._contain = None
            self._kill = None
        self.jobs_done += 1
        self._report_outcome(task, outcome)
        return outcome.state

    def _report_outcome(self, task: Task, outcome: Outcome) -> None:
        metrics.PILOT_TASKS.labels(outcome.state).inc()
        if outcome.ran_s is not None:
            metrics.PILOT_BUSY_SECONDS.inc(outcome.ran_s)
        log.info(
            "job %s: %s, exit code %s%s",
            task.job_id,
            outcome.state,
            outcome.exit_code,
            f" ({outcome.reason})" if outcome.reason else "",
        )
        self._report_job(
            task,
            JobReport(
                task.job_id,
                outcome.state,
                self.id,
                exit_code=outcome.exit_code,
                log=outcome.log,
                reason=outcome.reason,
                started_at=outcome.started_at,
                ended_at=outcome.ended_at,
                results=self._results(task) if outcome.state == JobState.FINISHED else None,
            ),
        )

    def _results(self, task: Task) -> dict[str, Any] | None:
        """The results manifest the finished payload left in its output directory, if any.

        A bad manifest is a warning on the job, never a failure: it travels as
        a refused result with the reason, and the job still finishes.
        """
        outdir = task.values.get("outdir")
        if not isinstance(outdir, str) or not outdir:
            return None
        try:
            found = read_results(outdir, self.settings.results.manifest_max_bytes)
        except Exception as exc:  # noqa: BLE001 -- the job finished: it must be reported so
            log.error("job %s: results manifest not read", task.job_id, exc_info=True)
            found = refused_results(f"manifest not read: unexpected {type(exc).__name__}")
        for warning in (found or {}).get("warnings", []):
            log.warning("job %s: results: %s", task.job_id, warning)
        return found

    # -- reporting ------------------------------------------------------------

    def _report_job(self, task: Task, report: JobReport) -> None:
        """Send ``report`` on ``task``'s job, with the task's token: every report on a job passes here."""
        report = dataclasses.replace(report, token=task.token)
        self._send(Outgoing(topology.status_exchange, topology.status_routing_key("job", report.state), encode(report)))

    def _report_pilot(self, event: str) -> None:
        if self.draining and event != "register":
            state = PilotState.DRAINING
        elif self._current is not None:
            state = PilotState.BUSY
        else:
            state = PilotState.BROKEN if self.problem else PilotState.IDLE
        report = PilotReport(
            pilot_id=self.id,
            event=event,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=list(self.queues),
            state=state,
            job_id=self._current.job_id if self._current else None,
            jobs_done=self.jobs_done,
            problem=self.stopped_by if event == "stop" and self.stopped_by else self.problem,
        )
        self._send(Outgoing(topology.status_exchange, topology.status_routing_key("pilot", event), encode(report)))
        self._next_beat = time.monotonic() + self.settings.pilot.heartbeat_s

    def _beat(self) -> None:
        """Between slices and while idle: heartbeat when due, keep connections alive, retry the outbox."""
        if time.monotonic() >= self._next_beat:
            self._report_pilot("heartbeat")
        self.publisher.heartbeat_check()
        try:
            self._live.heartbeat_check(rate=broker.HEARTBEAT_RATE)
        except broker.CONNECTION_ERRORS:
            log.debug("pilot %s: consumer connection heartbeat failed", self.id, exc_info=True)

    def _send(self, message: Outgoing) -> None:
        """Publish a report, or keep it (bounded) until the broker is back."""
        self._outbox.append(message)
        try:
            self.publisher.publish(list(self._outbox))
        except BrokerUnavailable as exc:
            log.warning("pilot %s: %d report(s) kept until the broker is back: %s", self.id, len(self._outbox), exc)
            return
        self._outbox.clear()

    def close(self) -> None:
        """Kill what a payload left (if a job was cut short), say goodbye (best effort) and close connections."""
        if self._contain is not None:
            self._contain.close()
        self._report_pilot("stop")
        self.publisher.close()
