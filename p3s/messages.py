"""The JSON bodies that travel between the parts: build, parse, validate.

Every body carries the schema version ``v``.  Parsing is strict: a missing or
mistyped field raises :class:`InvalidMessage` naming it, so the dispatcher can
dead-letter the body instead of failing half-way through it.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from p3s.errors import InvalidMessage
from p3s.results.manifest import parse_report_results
from p3s.states import JobState, PilotState

SCHEMA_VERSION = 1

# What the database stores (p3s/db.py), checked here because SQLite does not:
# a body PostgreSQL would refuse must be refused before it joins a batch.
NAME_MAX = 512  # files.name
LABEL_MAX = 128  # stream, source, template and node names, queue names
PILOT_ID_MAX = 64
HOST_MAX = 255
PATH_MAX = 4096
TEXT_MAX = 65536  # reasons and log paths
BODY_MAX = 1 << 20  # no p3s message comes near a megabyte
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
ID_RANGE = (1, 2**63 - 1)
# Seconds since the epoch: 1970 to 2100.  Anything else is a clock or a forgery.
EPOCH_RANGE = (0.0, 4102444800.0)
DURATION_MAX = 366 * 86400.0
TOKEN_MAX = 128


def encode(message: Any) -> bytes:
    """The JSON body of a message dataclass."""
    # A shallow copy: asdict's deep copy was a tenth of the dispatcher's time.
    body = {"v": SCHEMA_VERSION, **{f.name: getattr(message, f.name) for f in fields(message)}}
    return json.dumps(body, separators=(",", ":")).encode()


def load_json(text: bytes | str, limit: int, what: str = "body",
              error: type[InvalidMessage] = InvalidMessage) -> Any:
    """``json.loads(text)`` for text from outside: ``error`` for text over ``limit`` or not JSON p3s can read.

    ``what`` names the text in the message when it is not a message body
    (``manifest is not JSON: ...``).
    """
    if len(text) > limit:
        raise error(f"{what} of {len(text)} bytes is over the limit of {limit}")
    prefix = "" if what == "body" else f"{what} is "
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{prefix}not JSON: {exc}") from None
    except RecursionError:
        raise error(f"{prefix}not JSON p3s can read: nested too deep") from None
    except ValueError as exc:  # an integer of thousands of digits, say
        raise error(f"{prefix}not JSON p3s can read: {exc}") from None


def _load(body: bytes | str) -> dict[str, Any]:
    data = load_json(body, BODY_MAX)
    if not isinstance(data, dict):
        raise InvalidMessage("not a JSON object")
    if data.get("v") != SCHEMA_VERSION:
        raise InvalidMessage(f"schema version {_show(data.get('v'))} is not {SCHEMA_VERSION}")
    return data


def _show(value: Any) -> str:
    """A value for an error message: short, and printable whatever it holds."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= 80 else text[:77] + "..."


_MISSING = object()


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise InvalidMessage(f"field {name!r} is missing")
        return default
    if kind in (float, (int, float)) and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise InvalidMessage(f"field {name!r} is out of range: {_show(value)}") from None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidMessage(f"field {name!r} has the wrong type: {_show(value)}")
    return value


def check_text(name: str, value: str, max_len: int) -> str:
    """``value`` if it can be stored as text: valid Unicode, no NUL, at most ``max_len`` characters."""
    if len(value) > max_len:
        raise InvalidMessage(f"field {name!r} is {len(value)} characters long, over the limit of {max_len}")
    if "\0" in value:
        raise InvalidMessage(f"field {name!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(f"field {name!r} is not valid Unicode text (a lone surrogate)") from None
    return value


def _text(data: Mapping[str, Any], name: str, max_len: int, default: Any = _MISSING) -> Any:
    value = _field(data, name, str, default)
    return value if value is None else check_text(name, value, max_len)


def _int(data: Mapping[str, Any], name: str, bounds: tuple[int, int], default: Any = _MISSING) -> Any:
    value = _field(data, name, int, default)
    if value is not None and not bounds[0] <= value <= bounds[1]:
        raise InvalidMessage(f"field {name!r} is out of range: {_show(value)}")
    return value


def _number(data: Mapping[str, Any], name: str, bounds: tuple[float, float], default: Any = _MISSING) -> Any:
    value = _field(data, name, float, default)
    if value is not None and not (math.isfinite(value) and bounds[0] <= value <= bounds[1]):
        raise InvalidMessage(f"field {name!r} is not a finite number in range: {_show(value)}")
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
        """The event in ``body``; :class:`UncarriableEvent` if its name or path is not text."""
        data = _load(body)
        name = _field(data, "name", str)
        path = _field(data, "path", str)
        undecodable = [what for what, value in (("name", name), ("path", path)) if _undecodable(value)]
        if undecodable:
            name, path = escape_undecodable(name), escape_undecodable(path)
        event = cls(
            name=check_text("name", name, NAME_MAX),
            path=check_text("path", path, PATH_MAX),
            stream=_text(data, "stream", LABEL_MAX),
            seen_at=_number(data, "seen_at", EPOCH_RANGE),
            source=_text(data, "source", LABEL_MAX, ""),
            size=_int(data, "size", (-1, INT64[1]), -1),
            force=_field(data, "force", bool, False),
            by_hand=_field(data, "by_hand", bool, False),
            template=_text(data, "template", LABEL_MAX, ""),
        )
        if not event.name or "/" in event.name:
            raise InvalidMessage(f"field 'name' is not a file name: {_show(event.name)}")
        if undecodable:
            raise UncarriableEvent(
                event, f"file {' and '.join(undecodable)} not valid UTF-8: it cannot be given to a payload as text"
            )
        return event


class UncarriableEvent(InvalidMessage):
    """An event for a real file that p3s cannot carry (its name is not text): recorded as ``refused``.

    ``event`` holds the name and path with the undecodable bytes written as
    ``\\xNN``, so the file is still on record under a readable name.
    """

    def __init__(self, event: DataEvent, reason: str) -> None:
        super().__init__(reason)
        self.event = event
        self.reason = reason


def _undecodable(value: str) -> bool:
    """True if ``value`` carries bytes that were not UTF-8 (os.fsdecode turns them into U+DC80-U+DCFF)."""
    return not value.isascii() and any("\udc80" <= c <= "\udcff" for c in value)


def escape_undecodable(value: str) -> str:
    """``value`` with the bytes os.fsdecode could not decode written as ``\\xNN``."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def token_hash(token: str) -> str:
    """What the database keeps of a task's token: enough to check a report, not to forge one."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_hex(16)


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
    # The job's secret for this task: its reports must carry it.  Never logged,
    # never given to the payload; the database keeps only its hash.
    token: str = field(default="", repr=False)

    @classmethod
    def parse(cls, body: bytes | str) -> Task:
        data = _load(body)
        argv = _field(data, "argv", list)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidMessage("field 'argv' must be a non-empty list of strings")
        for arg in argv:
            check_text("argv", arg, TEXT_MAX)
        env = _field(data, "env", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise InvalidMessage("field 'env' must map strings to strings")
        for key, value in env.items():
            check_text("env", key, LABEL_MAX)
            check_text("env", value, TEXT_MAX)
        return cls(
            job_id=_int(data, "job_id", ID_RANGE),
            workflow_id=_int(data, "workflow_id", ID_RANGE),
            template=_text(data, "template", LABEL_MAX),
            node=_text(data, "node", LABEL_MAX),
            argv=argv,
            values=_field(data, "values", dict, {}),
            env=env,
            queue=_text(data, "queue", LABEL_MAX),
            priority=_int(data, "priority", (0, 255)),
            wall_s=_number(data, "wall_s", (0.0, DURATION_MAX)),
            deadline=_number(data, "deadline", EPOCH_RANGE),
            seen_at=_number(data, "seen_at", EPOCH_RANGE),
            enqueued_at=_number(data, "enqueued_at", EPOCH_RANGE),
            expected_s=_number(data, "expected_s", (0.0, DURATION_MAX), 0.0),
            stage_in=_field(data, "stage_in", bool, False),
            token=_text(data, "token", TOKEN_MAX, ""),
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
    token: str = field(default="", repr=False)  # the task's token: proof the sender took the task
    # A finished job's results manifest as the pilot collected it (p3s.results.manifest); None: no manifest,
    # or a pilot from before manifests.
    results: dict[str, Any] | None = None

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
            raise InvalidMessage(f"field 'state' is not a job state: {_show(state)}") from None
        return cls(
            job_id=_int(data, "job_id", ID_RANGE),
            state=state,
            pilot_id=_text(data, "pilot_id", PILOT_ID_MAX),
            sent_at=_number(data, "sent_at", EPOCH_RANGE),
            exit_code=_int(data, "exit_code", INT32, None),
            log=_text(data, "log", TEXT_MAX, ""),
            reason=_text(data, "reason", TEXT_MAX, ""),
            started_at=_number(data, "started_at", EPOCH_RANGE, None),
            ended_at=_number(data, "ended_at", EPOCH_RANGE, None),
            redelivered=_field(data, "redelivered", bool, False),
            token=_text(data, "token", TOKEN_MAX, ""),
            results=_results(data),
        )


def _results(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """A report's ``results``, checked against what the database stores (bounded in size and counts)."""
    if data.get("results") is None:
        return None
    return parse_report_results(data["results"])


PILOT_EVENTS = ("register", "heartbeat", "stop")
PILOT_REPORTED_STATES = frozenset({PilotState.IDLE, PilotState.BUSY, PilotState.BROKEN, PilotState.DRAINING})


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
            raise InvalidMessage(f"field 'event' is not a pilot event: {_show(event)}")
        state = _field(data, "state", str)
        if state not in PILOT_REPORTED_STATES:
            raise InvalidMessage(f"field 'state' is not a state a pilot reports: {_show(state)}")
        queues = _field(data, "queues", list)
        if not all(isinstance(q, str) for q in queues):
            raise InvalidMessage(f"field 'queues' must be a list of queue names: {_show(queues)}")
        for queue in queues:
            check_text("queues", queue, LABEL_MAX)
        if len(queues) > 100:
            raise InvalidMessage(f"field 'queues' names {len(queues)} queues, over the limit of 100")
        return cls(
            pilot_id=_text(data, "pilot_id", PILOT_ID_MAX),
            event=event,
            host=_text(data, "host", HOST_MAX),
            pid=_int(data, "pid", (0, INT32[1])),
            queues=queues,
            state=state,
            sent_at=_number(data, "sent_at", EPOCH_RANGE),
            job_id=_int(data, "job_id", ID_RANGE, None),
            jobs_done=_int(data, "jobs_done", (0, INT32[1]), 0),
            problem=_text(data, "problem", TEXT_MAX, ""),
        )


CONTROL_ACTIONS = ("drain", "stop", "stop_now", "cancel_job")


@dataclass(frozen=True)
class Control:
    """The operator's word to one pilot, on ``p3s.control`` (which only the dispatcher's account may write).

    ``drain``: take no new task, exit after the current job; ``stop``: the
    same, said as a stop; ``stop_now``: kill the payload, report its job,
    exit; ``cancel_job``: kill the payload of ``job_id`` and report it
    cancelled, then go on.  ``host`` names the host the operator addressed, if
    any: the message itself goes to ``pilot_id``.
    """

    action: str
    pilot_id: str
    host: str = ""
    job_id: int | None = None
    sent_at: float = field(default_factory=time.time)

    @classmethod
    def parse(cls, body: bytes | str) -> Control:
        data = _load(body)
        action = _field(data, "action", str)
        if action not in CONTROL_ACTIONS:
            raise InvalidMessage(f"field 'action' is not a control action: {_show(action)}")
        control = cls(
            action=action,
            pilot_id=_text(data, "pilot_id", PILOT_ID_MAX),
            host=_text(data, "host", HOST_MAX, ""),
            job_id=_int(data, "job_id", ID_RANGE, None),
            sent_at=_number(data, "sent_at", EPOCH_RANGE),
        )
        if not control.pilot_id:
            raise InvalidMessage("field 'pilot_id' is empty")
        if (action == "cancel_job") != (control.job_id is not None):
            raise InvalidMessage(f"field 'job_id' goes with action 'cancel_job' and only with it, not {action!r}")
        return control


def parse_status(body: bytes | str) -> JobReport | PilotReport | SourcesReport:
    """A body from ``p3s.status``: a pilot report has ``event``, a job report ``job_id`` and ``state``,
    a watcher's sources report ``sources``."""
    data = _load(body)
    if "sources" in data:
        return SourcesReport.from_dict(data)
    if "event" in data:
        return PilotReport.from_dict(data)
    return JobReport.from_dict(data)


SOURCES_MAX = 100
SOURCE_KIND_MAX = 16


@dataclass(frozen=True)
class SourcesReport:
    """A watcher's sources and which of them it reads now, sent every little while.

    Published on ``p3s.events`` with routing key ``watcher.sources`` (a watcher may write there only); the
    dispatcher keeps the newest report of each source, so ``p3s status`` shows
    what the watcher itself says.  Each source is a dict: ``name``, ``kind``,
    ``location``, ``stream``, ``fallback_for``, ``active`` (it publishes
    files) and ``healthy`` (its last listing answered in time).
    """

    watcher_id: str
    host: str
    sources: list[dict[str, Any]]
    sent_at: float = field(default_factory=time.time)

    @classmethod
    def parse(cls, body: bytes | str) -> SourcesReport:
        return cls.from_dict(_load(body))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourcesReport:
        raw = _field(data, "sources", list)
        if len(raw) > SOURCES_MAX:
            raise InvalidMessage(f"field 'sources' lists {len(raw)} sources, over the limit of {SOURCES_MAX}")
        sources = []
        for item in raw:
            if not isinstance(item, dict):
                raise InvalidMessage(f"field 'sources' must list objects: {_show(item)}")
            sources.append(
                {
                    "name": _text(item, "name", LABEL_MAX),
                    "kind": _text(item, "kind", SOURCE_KIND_MAX),
                    "location": _text(item, "location", PATH_MAX, ""),
                    "stream": _text(item, "stream", LABEL_MAX, ""),
                    "fallback_for": _text(item, "fallback_for", LABEL_MAX, ""),
                    "active": _field(item, "active", bool),
                    "healthy": _field(item, "healthy", bool, True),
                }
            )
        return cls(
            watcher_id=_text(data, "watcher_id", PILOT_ID_MAX),
            host=_text(data, "host", HOST_MAX),
            sources=sources,
            sent_at=_number(data, "sent_at", EPOCH_RANGE),
        )
