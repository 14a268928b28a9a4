"""The JSON bodies that travel between the parts: build, parse, validate.

Every body carries the schema version ``v``.  Parsing is strict: a missing or
mistyped field raises :class:`InvalidMessage` naming it, so the dispatcher can
dead-letter the body instead of failing half-way through it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from p3s.errors import InvalidMessage
from p3s.states import JobState

SCHEMA_VERSION = 1


def encode(message: Any) -> bytes:
    """The JSON body of a message dataclass."""
    # A shallow copy: asdict's deep copy was a tenth of the dispatcher's time.
    body = {"v": SCHEMA_VERSION, **{f.name: getattr(message, f.name) for f in fields(message)}}
    return json.dumps(body, separators=(",", ":")).encode()


def _load(body: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidMessage("not a JSON object")
    if data.get("v") != SCHEMA_VERSION:
        raise InvalidMessage(f"schema version {data.get('v')!r} is not {SCHEMA_VERSION}")
    return data


_MISSING = object()


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise InvalidMessage(f"field {name!r} is missing")
        return default
    if kind in (float, (int, float)) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidMessage(f"field {name!r} has the wrong type: {value!r}")
    return value


@dataclass(frozen=True)
class DataEvent:
    """A complete file was seen on a source (watcher or ``p3s submit`` to dispatcher)."""

    name: str  # the file name, the key for de-duplication
    path: str  # what a pilot opens: a local path or a root:// URL
    stream: str
    seen_at: float
    source: str = ""
    size: int = -1
    force: bool = False  # skip sampling and de-duplication (`p3s submit --force`)
    by_hand: bool = False  # published by `p3s submit`
    template: str = ""  # restrict to one template (`p3s submit --template`)

    @classmethod
    def parse(cls, body: bytes | str) -> DataEvent:
        data = _load(body)
        event = cls(
            name=_field(data, "name", str),
            path=_field(data, "path", str),
            stream=_field(data, "stream", str),
            seen_at=_field(data, "seen_at", float),
            source=_field(data, "source", str, ""),
            size=_field(data, "size", int, -1),
            force=_field(data, "force", bool, False),
            by_hand=_field(data, "by_hand", bool, False),
            template=_field(data, "template", str, ""),
        )
        if not event.name or "/" in event.name:
            raise InvalidMessage(f"field 'name' is not a file name: {event.name!r}")
        return event


@dataclass(frozen=True)
class Task:
    """One job for a pilot: what to run, how long it may take, and when it is too late."""

    job_id: int
    workflow_id: int
    template: str
    node: str
    argv: list[str]  # with placeholders; the pilot fills them in (it alone knows {workdir})
    values: dict[str, Any]  # placeholder values known to the dispatcher
    env: dict[str, str]
    queue: str
    priority: int
    wall_s: float
    deadline: float  # epoch seconds; also in the `p3s-deadline` header
    seen_at: float
    enqueued_at: float
    expected_s: float = 0.0
    stage_in: bool = False

    @classmethod
    def parse(cls, body: bytes | str) -> Task:
        data = _load(body)
        argv = _field(data, "argv", list)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidMessage("field 'argv' must be a non-empty list of strings")
        env = _field(data, "env", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise InvalidMessage("field 'env' must map strings to strings")
        return cls(
            job_id=_field(data, "job_id", int),
            workflow_id=_field(data, "workflow_id", int),
            template=_field(data, "template", str),
            node=_field(data, "node", str),
            argv=argv,
            values=_field(data, "values", dict, {}),
            env=env,
            queue=_field(data, "queue", str),
            priority=_field(data, "priority", int),
            wall_s=_field(data, "wall_s", float),
            deadline=_field(data, "deadline", float),
            seen_at=_field(data, "seen_at", float),
            enqueued_at=_field(data, "enqueued_at", float),
            expected_s=_field(data, "expected_s", float, 0.0),
            stage_in=_field(data, "stage_in", bool, False),
        )


@dataclass(frozen=True)
class JobReport:
    """A pilot's word on one job: ``running``, then one terminal state."""

    job_id: int
    state: str
    pilot_id: str
    sent_at: float = field(default_factory=time.time)
    exit_code: int | None = None
    log: str = ""
    reason: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    # The pilot refused a task the broker delivered a second time: it may have run already.
    redelivered: bool = False

    @classmethod
    def parse(cls, body: bytes | str) -> JobReport:
        data = _load(body)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobReport:
        state = _field(data, "state", str)
        try:
            JobState(state)
        except ValueError:
            raise InvalidMessage(f"field 'state' is not a job state: {state!r}") from None
        return cls(
            job_id=_field(data, "job_id", int),
            state=state,
            pilot_id=_field(data, "pilot_id", str),
            sent_at=_field(data, "sent_at", float),
            exit_code=_field(data, "exit_code", int, None),
            log=_field(data, "log", str, ""),
            reason=_field(data, "reason", str, ""),
            started_at=_field(data, "started_at", float, None),
            ended_at=_field(data, "ended_at", float, None),
            redelivered=_field(data, "redelivered", bool, False),
        )


PILOT_EVENTS = ("register", "heartbeat", "stop")


@dataclass(frozen=True)
class PilotReport:
    """A pilot registering, beating, or saying goodbye."""

    pilot_id: str
    event: str
    host: str
    pid: int
    queues: list[str]
    state: str
    sent_at: float = field(default_factory=time.time)
    job_id: int | None = None
    jobs_done: int = 0
    problem: str = ""  # why a ``broken`` pilot takes no tasks; empty when healthy

    @classmethod
    def parse(cls, body: bytes | str) -> PilotReport:
        return cls.from_dict(_load(body))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PilotReport:
        event = _field(data, "event", str)
        if event not in PILOT_EVENTS:
            raise InvalidMessage(f"field 'event' is not a pilot event: {event!r}")
        return cls(
            pilot_id=_field(data, "pilot_id", str),
            event=event,
            host=_field(data, "host", str),
            pid=_field(data, "pid", int),
            queues=_field(data, "queues", list),
            state=_field(data, "state", str),
            sent_at=_field(data, "sent_at", float),
            job_id=_field(data, "job_id", int, None),
            jobs_done=_field(data, "jobs_done", int, 0),
            problem=_field(data, "problem", str, ""),
        )


def parse_status(body: bytes | str) -> JobReport | PilotReport:
    """A body from ``p3s.status``: a pilot report has ``event``, a job report ``job_id`` and ``state``."""
    data = _load(body)
    if "event" in data:
        return PilotReport.from_dict(data)
    return JobReport.from_dict(data)
