"""Thousands of generated bodies on the real exchanges: nothing dies, nothing is lost, nothing moves back.

Hypothesis generates event, status, task and dead-letter bodies (random bytes,
truncated JSON of valid bodies, wrong types, missing fields, deep nesting, huge
strings and numbers, NaN and infinities, unknown fields, wrong schema versions,
lone surrogates, NUL characters, and reports that move a finished job back).
They are drawn first and published in one go, to p3s.events, p3s.status,
p3s.tasks (so the pilot gets garbage tasks) and p3s.expired, while a
dispatcher and a pilot run on the real RabbitMQ and PostgreSQL.

Each body is labelled by how it was built: ``invalid`` (it cannot be stored as
it is, so the dispatcher must refuse it), ``valid`` (it must be taken), or
``either`` (a reasonable parser may do either).  Afterwards:

- the dispatcher and the pilot are still running;
- p3s.invalid holds exactly as many messages per dispatcher queue as the
  dispatcher counted in ``p3s_invalid_messages_total``, each with a
  ``p3s-reason`` header, and among them every ``invalid`` body and no
  ``valid`` one; every valid event is recorded;
- a good file published afterwards finishes;
- no job that had ended before the fuzz changed;
- no job or workflow has a deadline that is not a finite time;
- ``p3s audit`` balances.

The CI profile draws about 3 000 bodies (10 hypothesis examples of one body
for each way of spoiling each field of each message); ``P3S_FUZZ_EXAMPLES=N``
draws N examples, for longer runs by hand (up to about 40: p3s.invalid keeps
10 000 messages).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kombu import Connection
from sqlalchemy import select

from p3s import app, metrics, topology
from p3s.broker import Outgoing, Publisher
from p3s.db import Job, Pilot, Workflow
from p3s.messages import DataEvent, encode
from p3s.states import JobState, PilotState
from tests.conftest import rabbitmqctl
from tests.stack import Stack, graphml, make_settings, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

# Each hypothesis example is one body per slot (about 300): 10 make the CI profile's 3 000 bodies.
EXAMPLES = int(os.environ.get("P3S_FUZZ_EXAMPLES", "10"))
SLOTS_PER_EXAMPLE = 8
SEED = int(os.environ.get("P3S_FUZZ_SEED", "0"))  # the order of publishing

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
NOW = time.time()
TRUE = shutil.which("true") or "/bin/true"
FALSE = shutil.which("false") or "/bin/false"
# What a name may hold in a body the test calls valid: printable, no "/", no NUL, no surrogate.
SAFE = st.characters(categories=("L", "N"), exclude_characters="/") | st.sampled_from("._-+~ ")
PLAIN = st.characters(min_codepoint=ord("a"), max_codepoint=ord("z")) | st.sampled_from("0123456789_-")

# -- what each body means -----------------------------------------------------

INVALID, VALID, EITHER = "invalid", "valid", "either"


@dataclass(frozen=True)
class Spec:
    """One field of a message: its JSON kind, whether it is required, and what storing it allows."""

    kind: str  # str, int, float, bool, list, dict
    required: bool = True
    stored: bool = False  # a string that reaches a column (so NUL and surrogates cannot be stored)
    max_len: int | None = None  # the column's length
    int_range: tuple[int, int] | None = None  # the column's range
    finite: bool = True  # a float that must be a finite number


EVENT = {
    "name": Spec("str", stored=True, max_len=512),
    "path": Spec("str", stored=True),
    "stream": Spec("str", stored=True, max_len=128),
    "seen_at": Spec("float"),
    "source": Spec("str", required=False, stored=True, max_len=128),
    "size": Spec("int", required=False, int_range=INT64),
    "force": Spec("bool", required=False),
    "by_hand": Spec("bool", required=False),
    "template": Spec("str", required=False),
}
JOB_REPORT = {
    "job_id": Spec("int", int_range=INT64),
    "state": Spec("str"),
    "pilot_id": Spec("str", stored=True, max_len=64),
    "sent_at": Spec("float"),
    "exit_code": Spec("int", required=False, int_range=INT32),
    "log": Spec("str", required=False, stored=True),
    "reason": Spec("str", required=False, stored=True),
    "started_at": Spec("float", required=False),
    "ended_at": Spec("float", required=False),
    "redelivered": Spec("bool", required=False),
}
PILOT_REPORT = {
    "pilot_id": Spec("str", stored=True, max_len=64),
    "event": Spec("str"),
    "host": Spec("str", stored=True, max_len=255),
    "pid": Spec("int", int_range=INT32),
    "queues": Spec("list"),
    "state": Spec("str"),
    "sent_at": Spec("float"),
    "job_id": Spec("int", required=False, int_range=INT64),
    "jobs_done": Spec("int", required=False, int_range=INT32),
    "problem": Spec("str", required=False, stored=True),
}
# A task on p3s.expired is only looked up by its job id; the rest is the pilot's business.
TASK = {
    "job_id": Spec("int", int_range=INT64),
    "workflow_id": Spec("int"),
    "template": Spec("str"),
    "node": Spec("str"),
    "argv": Spec("list"),
    "values": Spec("dict", required=False),
    "env": Spec("dict", required=False),
    "queue": Spec("str"),
    "priority": Spec("int"),
    "wall_s": Spec("float", finite=False),
    "deadline": Spec("float", finite=False),
    "seen_at": Spec("float", finite=False),
    "enqueued_at": Spec("float", finite=False),
    "expected_s": Spec("float", required=False, finite=False),
    "stage_in": Spec("bool", required=False),
}
KNOWN_KEYS = {"v", *EVENT, *JOB_REPORT, *PILOT_REPORT, *TASK}


@dataclass(frozen=True)
class Fuzz:
    """One generated body, where it goes, and what the dispatcher must make of it."""

    target: str  # events, status, tasks, expired
    routing_key: str
    body: bytes
    expect: str
    how: str
    headers: dict[str, Any] = field(default_factory=dict)


@dataclass
class World:
    """What the strategies need to know about the running system."""

    finished_ids: list[int]
    input_file: str
    out_root: str


# -- building bodies ------------------------------------------------------------

# Values json.dumps cannot write as wanted are put in as markers and replaced in the text.
_RAW: dict[str, str] = {}
_raw_ids = itertools.count()


def raw(text: str) -> str:
    """A marker that :func:`dumps` replaces by ``text`` verbatim (huge integers, NaN, deep nesting)."""
    key = f"@@raw{next(_raw_ids)}@@"
    _RAW[key] = text
    return key


def dumps(data: Any, ascii_only: bool = True) -> bytes:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=ascii_only)
    for key in [k for k in _RAW if k in text]:
        text = text.replace(json.dumps(key), _RAW.pop(key))
    return text.encode("utf-8", "surrogatepass")


def nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "0" + "}" * depth


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
WRONG = {
    "str": st.integers() | st.floats(allow_nan=False) | st.booleans() | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    "int": st.sampled_from([0.5, -1.5, 3.25]) | st.floats(0.001, 0.999) | st.text(max_size=8)
    | st.booleans() | st.lists(st.integers(), max_size=3) | st.just({}),
    "float": st.text(max_size=8) | st.booleans() | st.lists(st.floats(allow_nan=False), max_size=3) | st.just({}),
    "bool": st.integers() | st.text(max_size=8) | st.floats(allow_nan=False) | st.just([]) | st.just({}),
    "list": st.text(max_size=8) | st.integers() | st.booleans() | st.dictionaries(st.text(max_size=5), st.integers()),
    "dict": st.text(max_size=8) | st.integers() | st.booleans() | st.lists(st.integers(), max_size=3),
}


@st.composite
def huge_string(draw: Any) -> str:
    """Long text from a few draws: a safe random piece repeated, so hypothesis's buffer stays small."""
    n = draw(st.sampled_from([65, 129, 256, 513, 600, 4096, 100_000]) | st.integers(1, 2000))
    piece = draw(st.text(PLAIN, min_size=1, max_size=8))
    return (piece * (n // len(piece) + 1))[:n]


BODY_KINDS = ("valid", "unknown fields", "bytes", "truncated", "deep nesting at the top",
              "deep nesting in an unknown field", "schema version")
FIELD_KINDS = {  # which fields each kind of spoiling applies to
    "wrong type": lambda s: True,
    "missing": lambda s: True,
    "deep nesting": lambda s: True,
    "huge string": lambda s: s.kind == "str",
    "huge number": lambda s: s.kind in ("int", "float"),
    "not finite": lambda s: s.kind == "float",
    "lone surrogate": lambda s: s.kind == "str",
    "nul": lambda s: s.kind == "str",
}


def slots(specs: dict[str, Spec]) -> list[tuple[str, str | None]]:
    """Every way of spoiling a body of these fields, once: (kind, field or None)."""
    return [(how, None) for how in BODY_KINDS] + [
        (how, name) for how, applies in FIELD_KINDS.items() for name, spec in specs.items() if applies(spec)
    ]


DEPTHS = st.sampled_from([10_000, 2000, 1001, 999, 500, 50, 100_000]) | st.integers(1, 3000)


def _mutate(draw: Any, base: dict[str, Any], specs: dict[str, Spec], how: str,
            name: str | None) -> tuple[bytes, str, str]:
    """Spoil ``base`` (a valid body's fields) in the way ``how``: the body, its label, and a description."""
    data = {"v": 1, **base}
    if how == "valid":
        return dumps(data, draw(st.booleans())), VALID, how
    if how == "unknown fields":
        extra = draw(st.dictionaries(st.text(SAFE, min_size=1, max_size=12).filter(lambda k: k not in KNOWN_KEYS),
                                     JSON_VALUES, min_size=1, max_size=4))
        return dumps({**data, **extra}, draw(st.booleans())), VALID, how
    if how == "bytes":
        return draw(st.binary(max_size=300)), INVALID, how
    if how == "truncated":
        whole = dumps(data, draw(st.booleans()))
        return whole[: draw(st.integers(0, len(whole) - 1))], INVALID, how
    if how == "schema version":
        v = draw(st.sampled_from([0, 2, -1, "1", None, [1], {"v": 1}, 1.5, "missing", 1.0, True]))
        if v == "missing":
            del data["v"]
        else:
            data["v"] = v
        # 1.0 and true equal 1 in Python: a parser may take them.
        return dumps(data), EITHER if v in (1.0, True) and not isinstance(v, str) else INVALID, f"{how} {v!r}"
    if how.startswith("deep nesting"):
        depth, shape = draw(DEPTHS), draw(st.sampled_from(["list", "dict"]))
        if how == "deep nesting at the top":
            return nested(depth, shape).encode(), INVALID, f"{how} ({depth})"
        if how == "deep nesting in an unknown field":
            data["nest"] = raw(nested(depth, shape))
            return dumps(data), INVALID if depth >= 2000 else EITHER, f"{how} ({depth})"

    # The rest spoil one field.
    assert name is not None
    spec = specs[name]
    label = f"{how} in {name!r}"
    if how == "deep nesting":
        depth, shape = draw(DEPTHS), draw(st.sampled_from(["list", "dict"]))
        data[name] = raw(nested(depth, shape))
        # Of the field's own kind (a list for "queues"), only what no parser can read must be refused.
        expect = INVALID if shape != spec.kind or depth >= 2000 else EITHER
        return dumps(data), expect, f"{label} ({depth})"
    if how == "wrong type":
        data[name] = draw(WRONG[spec.kind])
        return dumps(data), INVALID, label
    if how == "missing":
        if draw(st.booleans()):
            data.pop(name, None)
        else:
            data[name] = None
        return dumps(data), INVALID if spec.required else VALID, label
    if how == "huge string":
        value = draw(huge_string())
        data[name] = value
        expect = INVALID if spec.max_len is not None and len(value) > spec.max_len else EITHER
        return dumps(data), expect, label
    if how == "huge number" and spec.kind == "float":
        text = draw(st.sampled_from(["1e400", "-1e400", "1" + "0" * 400, "1e308", "-1e308", "1" + "0" * 5000]))
        data[name] = raw(text)
        overflow = text not in ("1e308", "-1e308")  # an infinity, or an int no float can hold
        return dumps(data), INVALID if overflow else EITHER, label
    if how == "huge number":
        value = draw(st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**20, 2**100, 2**31 - 1, -(2**31) - 1, 2**63 - 1])
                     | st.integers(min_value=2**31))
        digits = draw(st.sampled_from([0, 0, 0, 5000]))
        data[name] = raw("9" * digits if digits else str(value))
        lo, hi = spec.int_range or (-math.inf, math.inf)
        return dumps(data), INVALID if digits or not lo <= value <= hi else EITHER, label
    if how == "not finite":
        data[name] = raw(draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])))
        return dumps(data), INVALID if spec.finite else EITHER, label
    # A lone surrogate or a NUL somewhere in a string.
    bad = draw(st.sampled_from(["\ud800", "\udfff", "\udc80", "\udcff"])) if how == "lone surrogate" else "\x00"
    original = str(data.get(name) or "x")
    at = draw(st.integers(0, len(original)))
    data[name] = original[:at] + bad + original[at:]
    expect = INVALID if spec.stored else EITHER
    if "\udc80" <= bad <= "\udcff" and name in ("name", "path") and specs is EVENT:
        # How os.fsdecode writes a byte that is not UTF-8: a real file whose name is not text,
        # which the dispatcher may record as refused rather than send to p3s.invalid.
        expect = EITHER
    return dumps(data), expect, label


def event_base(draw: Any, world: World) -> dict[str, Any]:
    # Drawn, not counted: hypothesis wants the same draws to make the same body.  A name drawn
    # twice is recorded twice (the second a duplicate), which is all the test asks of it.
    name = "fuzz-" + draw(st.text(SAFE, min_size=1, max_size=30))
    return {
        "name": name,
        "path": f"/data/fuzz/{name}",
        "stream": draw(st.sampled_from(["raw", "calib", "fuzz"])),
        "seen_at": draw(st.sampled_from([NOW, NOW - 5, NOW + 5]) | st.floats(NOW - 600, NOW + 600)),
        "source": "fuzz",
        "size": draw(st.integers(-1, 2**40)),
        "force": draw(st.booleans()),
        "by_hand": draw(st.booleans()),
        # "nosuch" and "": no workflow (no fuzz name matches "ok_*"); "ok": a real job.
        "template": draw(st.sampled_from(["", "", "nosuch", "ok"])),
    }


def job_report_base(draw: Any, world: World) -> dict[str, Any]:
    # Mostly jobs that ended before the fuzz: every state there is a move back or a repeat.
    job_id = draw(st.sampled_from(world.finished_ids) | st.integers(1, 10_000))
    state = draw(st.sampled_from([s.value for s in JobState]))
    ended = state not in ("pending", "queued", "running")
    return {
        "job_id": job_id,
        "state": state,
        "pilot_id": draw(st.sampled_from(["fuzz-pilot", "x" * 64])),
        "sent_at": NOW,
        "exit_code": draw(st.none() | st.integers(-255, 255)) if ended else None,
        "log": draw(st.text(st.characters(exclude_characters="\x00"), max_size=20)),
        "reason": "moved back by the fuzz test",
        "started_at": NOW - 1,
        "ended_at": NOW if ended else None,
        "redelivered": draw(st.booleans()),
    }


def pilot_report_base(draw: Any, world: World) -> dict[str, Any]:
    event = draw(st.sampled_from(["register", "heartbeat", "stop"]))
    return {
        "pilot_id": f"fuzz-{draw(st.integers(0, 20))}",
        "event": event,
        "host": "fuzz-host",
        "pid": draw(st.integers(1, 2**31 - 1)),
        "queues": draw(st.lists(st.text(PLAIN, min_size=1, max_size=10), min_size=1, max_size=3)),
        "state": draw(st.sampled_from([PilotState.IDLE.value, PilotState.BUSY.value])),
        "sent_at": NOW,
        "job_id": draw(st.none() | st.integers(1, 10_000)),
        "jobs_done": draw(st.integers(0, 1000)),
        "problem": "",
    }


def task_base(draw: Any, world: World) -> dict[str, Any]:
    """A task a pilot could run: argv[0] is never a random program, and outputs stay in the test's directory."""
    job_id = draw(st.sampled_from(world.finished_ids) | st.integers(1, 10_000))
    # Text without NUL: a NUL is what the "nul" slots are for.
    text = st.text(st.characters(exclude_characters="\x00"), max_size=8)
    values: dict[str, Any] = draw(st.dictionaries(
        st.text(PLAIN, max_size=8).filter(lambda k: k != "outdir"), text | st.lists(st.integers()), max_size=3,
    ))
    values["outdir"] = f"{world.out_root}/{job_id}"
    values["input"] = draw(st.sampled_from([world.input_file, "/nonexistent/fuzz.dat"]) | st.lists(st.integers()))
    argv = [draw(st.sampled_from([TRUE, TRUE, TRUE, FALSE, "true", "/nonexistent/p3s-fuzz", "no-such-p3s-program"]))]
    argv += draw(st.lists(st.sampled_from(["{input}", "{nope}", "{", "}", "{workdir}", "--x"]) | text, max_size=3))
    env_keys = st.sampled_from(["FUZZ", "FUZZ_{input}", "", "A=B", "LANG"]) | st.text(PLAIN, max_size=6)
    env = draw(st.dictionaries(env_keys, text | st.just("{input}"), max_size=3))
    return {
        "job_id": job_id,
        "workflow_id": draw(st.integers(1, 10_000)),
        "template": draw(st.text(PLAIN, min_size=1, max_size=10)),
        "node": draw(st.text(PLAIN, min_size=1, max_size=10)),
        "argv": argv,
        "values": values,
        "env": env,
        "queue": "default",
        "priority": draw(st.integers(0, 9)),
        "wall_s": draw(st.sampled_from([0.0, 0.5, 5.0]) | st.floats(0, 5)),
        "deadline": draw(st.sampled_from([NOW + 120, NOW - 10, 0.0])),
        "seen_at": NOW,
        "enqueued_at": NOW,
        "expected_s": draw(st.sampled_from([0.0, 0.0, 1.0, 30.0])),
        "stage_in": draw(st.booleans()),
    }


SPECIALS = {
    "event": ["empty name", "slash in the name"],
    "job report": ["not a job state"],
    "pilot report": ["not a pilot state", "int queues", "not a pilot event"],
    "task": [],
    "dead letter": [],
}
FIELDS = {"event": EVENT, "job report": JOB_REPORT, "pilot report": PILOT_REPORT, "task": TASK, "dead letter": TASK}
BASES = {"event": event_base, "job report": job_report_base, "pilot report": pilot_report_base,
         "task": task_base, "dead letter": task_base}


def special(draw: Any, base: dict[str, Any], how: str) -> dict[str, Any]:
    """Bodies well formed but meaningless: values outside a field's enumeration."""
    if how == "empty name":
        base["name"] = ""
    elif how == "slash in the name":
        base["name"] = f"a/{base['name']}"
    elif how == "not a job state":
        base["state"] = draw(st.sampled_from(["done", "FINISHED", "", "idle", "refused"]))
    elif how == "not a pilot state":
        base["state"] = draw(st.sampled_from(["running", "IDLE", "", "finished", "asleep"]))
    elif how == "int queues":
        base["queues"] = draw(st.lists(st.integers(), min_size=1, max_size=3))
    elif how == "not a pilot event":
        base["event"] = draw(st.sampled_from(["hello", "", "Heartbeat"]))
    return {"v": 1, **base}


@st.composite
def fuzz_body(draw: Any, world: World, message: str, how: str, name: str | None) -> Fuzz:
    base = BASES[message](draw, world)
    if how in SPECIALS[message]:
        body, expect, label = dumps(special(draw, base, how)), INVALID, how
    else:
        body, expect, label = _mutate(draw, base, FIELDS[message], how, name)
    label = f"{message}: {label}"
    if message == "event":
        return Fuzz("events", f"file.{base['stream']}", body, expect, label)
    if message == "job report":
        # No fuzzed report carries its job's token: the dispatcher refuses one about a job it
        # knows and ignores one about a job it does not, so a readable report may go either way.
        return Fuzz("status", f"job.{base['state']}", body, EITHER if expect == VALID else expect, label)
    if message == "pilot report":
        return Fuzz("status", f"pilot.{base['event']}", body, expect, label)
    if message == "task":
        # Garbage for the pilot, on the default task queue: it must survive every one.
        return Fuzz("tasks", "default", body, EITHER, label)
    headers = draw(st.sampled_from([
        {}, {"x-death": [{"reason": "expired", "queue": "p3s.tasks.default"}]}, {"x-death": [{"reason": "maxlen"}]},
        {"x-death": "not a list"}, {"x-death": [{"reason": 7}]}, {"x-death": []},
    ]))
    return Fuzz("expired", "", body, expect, label, headers)


def all_slots() -> list[tuple[str, str, str | None]]:
    """One body of each message, for each way of spoiling it: what one hypothesis example draws."""
    return [(m, how, None) for m, hows in SPECIALS.items() for how in hows] + [
        (m, how, name) for m, specs in FIELDS.items() for how, name in slots(specs)
    ]


def draw_bodies(world: World, examples: int) -> list[Fuzz]:
    """Run hypothesis's generation only: bodies are collected here and published together afterwards.

    Each example of each chunk draws one body for each of its slots (see
    :func:`all_slots`), so every way of spoiling every field is tried
    ``examples`` times with different values.  Chunks keep an example within
    hypothesis's limit on the data one example may draw.
    """
    drawn: list[Fuzz] = []
    every = sorted(all_slots(), key=lambda slot: slot[0] != "event")
    for i in range(0, len(every), SLOTS_PER_EXAMPLE):
        chunk = every[i : i + SLOTS_PER_EXAMPLE]
        # Events are what a mistake in the dispatcher costs most: twice as many of them.
        times = 2 if chunk[0][0] == "event" else 1

        @settings(max_examples=examples * times, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(st.tuples(*(fuzz_body(world, *slot) for slot in chunk)))
        def collect(batch: tuple[Fuzz, ...]) -> None:
            drawn.extend(batch)

        collect()
    return drawn


# -- observing ------------------------------------------------------------------

EXCHANGES = {
    "events": topology.events_exchange,
    "status": topology.status_exchange,
    "tasks": topology.tasks_exchange,
    "expired": topology.expired_exchange,
}
DISPATCHER_QUEUE = {
    "events": topology.events_queue.name,
    "status": topology.status_queue.name,
    "expired": topology.expired_queue.name,
}


def invalid_counted() -> Counter[str]:
    """p3s_invalid_messages_total by queue, in this process (the dispatcher runs in a thread of it)."""
    out: Counter[str] = Counter()
    for family in metrics.INVALID_MESSAGES.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["queue"]] += int(sample.value)
    return out


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path[1:])


def queue_messages(vhost: str) -> dict[str, int]:
    """Ready plus unacknowledged messages of every queue of ``vhost``."""
    out = rabbitmqctl("-q", "list_queues", "-p", vhost, "--no-table-headers", "name", "messages").stdout
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def read_invalid(url: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Take every message out of p3s.invalid: its body and headers."""
    out = []
    with Connection(url) as conn:
        channel = conn.channel()
        while True:
            message = channel.basic_get(topology.invalid_queue.name, no_ack=True)
            if message is None:
                return out
            body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
            out.append((body, dict(message.properties.get("application_headers") or {})))


def came_from(headers: dict[str, Any]) -> str:
    """The queue a refused message came from: ``p3s-queue``, else the broker's x-death record."""
    if headers.get("p3s-queue"):
        return str(headers["p3s-queue"])
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], dict):
        return str(deaths[0].get("queue", "?"))
    return "?"


def ended_jobs(stack: Stack) -> dict[int, tuple[Any, ...]]:
    with stack.engine.connect() as conn:
        rows = conn.execute(select(Job.id, Job.state, Job.exit_code, Job.ended_at, Job.pilot_id, Job.reason)).all()
    return {r[0]: tuple(r[1:]) for r in rows if JobState(r[1]).terminal}


def not_finite(stack: Stack) -> list[str]:
    found = []
    with stack.engine.connect() as conn:
        for what, table in (("job", Job), ("workflow", Workflow)):
            for row_id, deadline in conn.execute(select(table.id, table.deadline)):
                if not math.isfinite(deadline):
                    found.append(f"{what} {row_id} has deadline {deadline}")
        for pilot_id, last_seen in conn.execute(select(Pilot.id, Pilot.last_seen)):
            if not math.isfinite(last_seen):
                found.append(f"pilot {pilot_id!r} has last_seen {last_seen}")
    return found


def top(counts: Counter[str], n: int = 15) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in counts.most_common(n))
    return shown + (f" and {len(counts) - n} more kinds" if len(counts) > n else "")


def where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    at = f" at {Path(last.filename).name}:{last.lineno} ({last.name})" if last else ""
    return f"{type(exc).__name__}: {str(exc)[:200]}{at}"


# -- the test -------------------------------------------------------------------


def publish_event(publisher: Publisher, path: Path) -> None:
    event = DataEvent(name=path.name, path=str(path), stream="raw", seen_at=time.time(), source="test", size=1)
    publisher.publish([Outgoing(topology.events_exchange, topology.event_routing_key("raw"), encode(event))])


def test_generated_garbage_on_every_exchange_changes_nothing_it_must_not(
    tmp_path: Path, broker_url: str, database_url: str
) -> None:
    settings_ = make_settings(tmp_path, broker_url, database_url)
    stack = Stack(settings_, pilots=0)
    stack.import_template(graphml({"quick": {"command": TRUE}}, trigger="ok_*", name="ok"), name="ok")
    stack.import_template(graphml({"fails": {"command": FALSE}}, trigger="bad_*", name="bad"), name="bad")
    # The pilot in a group of its own: a pilot that dies does not stop the dispatcher, nor the other way round.
    pilots = app.Group(pilots=[app.make_pilot(settings_)])
    publisher = Publisher(settings_.broker)
    data = tmp_path / "data"
    data.mkdir()
    vhost = vhost_of(broker_url)
    problems: list[str] = []

    def dead(group: app.Group) -> list[str]:
        return [f"{t.name} died: " + "; ".join(where(e) for e in group.errors) for t in group.threads
                if not t.is_alive()]

    def alive() -> list[str]:
        """Why a part is not running: empty while the dispatcher and the pilot both are."""
        return dead(stack.group) + dead(pilots)

    def settled(stall_s: float, what: str) -> bool:
        """Until the queues of the parts still running are empty twice in a row; False if they stop draining.

        Judged by progress, not by a time for the whole: on a busy host the parts drain
        more slowly, and only ``stall_s`` without one message fewer means they are stuck.
        """
        fewest, since = -1, time.monotonic()
        quiet = 0
        while True:
            # A dead pilot leaves the dispatcher to be judged on its own, and the other way round.
            watched = [*(DISPATCHER_QUEUE.values() if not dead(stack.group) else ()),
                       *([topology.task_queue("default").name] if not dead(pilots) else ())]
            counts = queue_messages(vhost)
            left = sum(counts.get(q, 0) for q in watched)
            quiet = quiet + 1 if left == 0 else 0
            if quiet >= 2 or not watched:
                return bool(watched)
            if fewest < 0 or left < fewest:
                fewest, since = left, time.monotonic()
            elif time.monotonic() - since > stall_s:
                break
            time.sleep(0.5)
        problems.append(f"{what}: not one message fewer in {stall_s:.0f}s; messages left: "
                        + ", ".join(f"{q} {counts.get(q, 0)}" for q in watched))
        return False

    try:
        stack.start()
        pilots.start()
        before_counted = invalid_counted()

        # Jobs that end before the fuzz: 3 finished, 2 failed.  The fuzz must not move them.
        for name in ["ok_0.dat", "ok_1.dat", "ok_2.dat", "bad_0.dat", "bad_1.dat"]:
            (data / name).write_bytes(b"x")
            publish_event(publisher, data / name)
        wait_for(lambda: len(ended_jobs(stack)) >= 5, timeout=30, what="the jobs before the fuzz to end")
        before = ended_jobs(stack)
        assert Counter(s[0] for s in before.values()) == {"finished": 3, "failed": 2}

        world = World(finished_ids=sorted(before), input_file=str(data / "ok_0.dat"), out_root=str(tmp_path / "out"))
        bodies = draw_bodies(world, EXAMPLES)
        # Mixed, as garbage arrives: good and bad bodies share the dispatcher's batches.
        random.Random(SEED).shuffle(bodies)
        by_target = Counter(b.target for b in bodies)
        assert len(bodies) >= EXAMPLES * len(all_slots()) // 2, f"only {len(bodies)} bodies drawn"

        publisher.publish(Outgoing(EXCHANGES[b.target], b.routing_key, b.body, headers=b.headers) for b in bodies)
        settled(40, f"after {len(bodies)} bodies ({dict(by_target)})")

        # A good file afterwards runs to its end (if neither part died: then it cannot).
        if not alive():
            (data / "ok_after.dat").write_bytes(b"x")
            publish_event(publisher, data / "ok_after.dat")
            try:
                wait_for(lambda: any(j["state"] == "finished" and j["file"].endswith("ok_after.dat")
                                     for j in stack.jobs()) or alive(),
                         timeout=30, what="the good file published after the fuzz to finish")
            except AssertionError as exc:
                problems.append(str(exc))
            settled(20, "after the good file")
        else:
            problems.append("no good file tried after the fuzz: a part had died")
        problems.extend(alive())

        # Every refusal is in p3s.invalid, once, with its reason; per queue as many as the dispatcher counted.
        counted = invalid_counted() - before_counted
        kept = read_invalid(broker_url)
        kept_from = Counter(came_from(h) for _b, h in kept)
        if sum(counted.values()) > topology.INVALID_MAX_LENGTH:
            problems.append(f"more refusals ({sum(counted.values())}) than p3s.invalid keeps: use fewer examples")
        for target, queue in DISPATCHER_QUEUE.items():
            if kept_from[queue] != counted[queue]:
                problems.append(f"{queue}: {kept_from[queue]} message(s) in p3s.invalid, "
                                f"{counted[queue]} counted in p3s_invalid_messages_total")
        others = {q: n for q, n in kept_from.items() if q not in DISPATCHER_QUEUE.values()}
        if others:
            problems.append(f"p3s.invalid holds messages from other queues: {others}")
        no_reason = [h for _b, h in kept if not h.get("p3s-reason")]
        if no_reason:
            problems.append(f"{len(no_reason)} of {len(kept)} message(s) in p3s.invalid have no p3s-reason header")

        refused = Counter(b for b, _h in kept)
        to_dispatcher = [b for b in bodies if b.target != "tasks"]
        must = Counter(b.body for b in to_dispatcher if b.expect == INVALID)
        missing = must - refused
        if missing:
            hows = Counter(b.how for b in to_dispatcher if b.expect == INVALID and b.body in missing)
            problems.append(f"{sum(missing.values())} invalid bodies not in p3s.invalid, by kind: {top(hows)}")
        wrongly = [b for b in to_dispatcher if b.expect == VALID and refused[b.body]]
        if wrongly:
            hows = Counter(b.how for b in wrongly)
            bad = {w.body for w in wrongly}
            reasons = sorted({str(h.get("p3s-reason")) for b, h in kept if b in bad})[:5]
            problems.append(f"{len(wrongly)} valid bodies refused, by kind: {top(hows)}; reasons: {reasons}")

        # Every valid event was recorded.
        recorded = {f["name"] for f in stack.files()}
        lost = [b for b in to_dispatcher if b.target == "events" and b.expect == VALID
                and json.loads(b.body)["name"] not in recorded]
        if lost:
            problems.append(f"{len(lost)} valid events not recorded, by kind: {top(Counter(b.how for b in lost))}")

        # Nothing that had ended moved.
        after = ended_jobs(stack)
        moved = {i: (before[i], after.get(i)) for i in before if after.get(i) != before[i]}
        if moved:
            problems.append(f"jobs that had ended changed: {moved}")
        problems.extend(not_finite(stack))

        audit = stack.audit()
        if not audit.ok:
            problems.append(f"p3s audit: {audit.problems}")

        kinds = Counter((b.target, b.expect) for b in bodies)
        assert not problems, (f"{len(bodies)} bodies {dict(kinds)}:\n  " + "\n  ".join(problems))
    finally:
        publisher.close()
        for group in (pilots, stack.group):
            group.stop()
        for group in (pilots, stack.group):
            group.join(15)
        stack.engine.dispose()
