"""config/rabbitmq/definitions.json declares exactly what p3s.topology declares, so the two cannot drift.

A queue whose arguments differ from the declaring code's by one value makes the
dispatcher's start-up declare fail with PRECONDITION_FAILED; an exchange of the
wrong type silently misroutes.  So every name, type, flag, argument and binding
is compared with the topology objects, as RabbitMQ would see them declared.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from kombu import Exchange, Queue
from kombu.transport.base import to_rabbitmq_queue_arguments

from p3s import topology
from p3s.config import PilotSettings

DEFINITIONS = Path(__file__).resolve().parents[2] / "config" / "rabbitmq" / "definitions.json"
VHOST = "p3s"
TASK_PREFIX = "p3s.tasks."

#: The placeholder passwords the README tells operators to change.
PLACEHOLDERS = {
    "p3s-dispatcher": "change-me-dispatcher",
    "p3s-watcher": "change-me-watcher",
    "p3s-pilot": "change-me-pilot",
}


@pytest.fixture(scope="module")
def defs() -> dict[str, Any]:
    return json.loads(DEFINITIONS.read_text())


def declared_arguments(queue: Queue) -> dict[str, Any]:
    """The x-arguments kombu sends when it declares ``queue`` on RabbitMQ."""
    return to_rabbitmq_queue_arguments(
        queue.queue_arguments or {},
        expires=queue.expires,
        message_ttl=queue.message_ttl,
        max_length=queue.max_length,
        max_length_bytes=queue.max_length_bytes,
        max_priority=queue.max_priority,
    )


def topology_queues(defs: dict[str, Any]) -> list[Queue]:
    """Every queue p3s declares: the fixed ones, and a task queue for each one in the file."""
    fixed = [v for v in vars(topology).values() if isinstance(v, Queue)]
    names = [q["name"][len(TASK_PREFIX):] for q in defs["queues"] if q["name"].startswith(TASK_PREFIX)]
    return fixed + [topology.task_queue(n) for n in names]


def topology_exchanges() -> list[Exchange]:
    return [v for v in vars(topology).values() if isinstance(v, Exchange)]


def test_one_vhost_and_everything_in_it(defs: dict[str, Any]) -> None:
    assert [v["name"] for v in defs["vhosts"]] == [VHOST]
    for key in ("queues", "exchanges", "bindings", "permissions"):
        assert {item["vhost"] for item in defs[key]} == {VHOST}, key


def test_exchanges_match_topology(defs: dict[str, Any]) -> None:
    in_file = {
        e["name"]: (e["type"], e["durable"], e["auto_delete"], e["internal"], e["arguments"]) for e in defs["exchanges"]
    }
    in_code = {e.name: (e.type, e.durable, e.auto_delete, False, e.arguments or {}) for e in topology_exchanges()}
    assert in_file == in_code
    assert in_code["p3s.tasks"][0] == "direct" and in_code["p3s.expired"][0] == "fanout"


def test_queues_and_their_arguments_match_topology(defs: dict[str, Any]) -> None:
    in_file = {q["name"]: (q["durable"], q["auto_delete"], q["arguments"]) for q in defs["queues"]}
    in_code = {
        q.name: (q.durable, q.auto_delete, declared_arguments(q)) for q in topology_queues(defs)
    }
    assert in_file == in_code
    # Types matter too: RabbitMQ compares argument values, and 9 is not "9".
    for q in defs["queues"]:
        for key, value in q["arguments"].items():
            assert type(value) is type(in_code[q["name"]][2][key]), (q["name"], key)


def test_every_configured_task_queue_is_predeclared(defs: dict[str, Any]) -> None:
    names = {q["name"] for q in defs["queues"]}
    for name in PilotSettings().queues:
        assert f"{TASK_PREFIX}{name}" in names
    default = next(q for q in defs["queues"] if q["name"] == "p3s.tasks.default")
    assert default["arguments"] == {
        "x-max-priority": topology.MAX_PRIORITY,
        "x-dead-letter-exchange": topology.expired_exchange.name,
    }


def test_bindings_match_topology(defs: dict[str, Any]) -> None:
    in_file = {
        (b["source"], b["destination_type"], b["destination"], b["routing_key"], json.dumps(b["arguments"]))
        for b in defs["bindings"]
    }
    in_code = {
        (q.exchange.name, "queue", q.name, q.routing_key, json.dumps(q.binding_arguments or {}))
        for q in topology_queues(defs)
    } | {(exchange.name, "queue", queue.name, key, "{}") for exchange, queue, key in topology.EXTRA_BINDINGS}
    assert in_file == in_code


def test_users_have_sha256_hashes_of_the_documented_placeholders(defs: dict[str, Any]) -> None:
    assert {u["name"] for u in defs["users"]} == set(PLACEHOLDERS)
    for user in defs["users"]:
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert not user["tags"], "no management or administrator tags"
        raw = base64.b64decode(user["password_hash"])
        salt, digest = raw[:4], raw[4:]
        assert digest == hashlib.sha256(salt + PLACEHOLDERS[user["name"]].encode()).digest(), user["name"]


def _allowed(defs: dict[str, Any], user: str, what: str, name: str) -> bool:
    (perm,) = [p for p in defs["permissions"] if p["user"] == user]
    # RabbitMQ matches a permission regex anywhere in the resource name, like re.search.
    return re.search(perm[what], name) is not None


def test_permissions_give_each_role_only_what_it_needs(defs: dict[str, Any]) -> None:
    # RabbitMQ checks the default exchange ("") under the name amq.default, so "^$" grants nothing.
    exchanges = [e.name for e in topology_exchanges()] + ["amq.default", "amq.topic"]
    queues = [q.name for q in topology_queues(defs)] + ["p3s.tasks.express", "amq.gen-abc"]
    names = exchanges + queues
    assert {p["user"] for p in defs["permissions"]} == set(PLACEHOLDERS)

    # The pilot: consume task queues, publish to p3s.status, read p3s.control through a server-named
    # queue of its own (configure it, bind it: write on the queue, read on the exchange); nothing else.
    assert [n for n in names if _allowed(defs, "p3s-pilot", "configure", n)] == ["amq.gen-abc"]
    assert [n for n in names if _allowed(defs, "p3s-pilot", "write", n)] == ["p3s.status", "amq.gen-abc"]
    assert [n for n in names if _allowed(defs, "p3s-pilot", "read", n)] == [
        "p3s.control", *(n for n in queues if n.startswith(TASK_PREFIX)), "amq.gen-abc"
    ]
    # Not the tasks exchange itself: a queue bound to it would copy every task, tokens and all.
    assert not _allowed(defs, "p3s-pilot", "read", "p3s.tasks")
    # Only the dispatcher's account gives orders on p3s.control.
    assert [u for u in PLACEHOLDERS if _allowed(defs, u, "write", "p3s.control")] == ["p3s-dispatcher"]
    # The watcher: publish to p3s.events only.
    assert not any(_allowed(defs, "p3s-watcher", "configure", n) for n in names)
    assert not any(_allowed(defs, "p3s-watcher", "read", n) for n in names)
    assert [n for n in names if _allowed(defs, "p3s-watcher", "write", n)] == ["p3s.events"]
    # The dispatcher: everything of p3s's (it declares task queues of new templates), nothing else.
    for what in ("configure", "write", "read"):
        assert [n for n in names if _allowed(defs, "p3s-dispatcher", what, n)] == [
            n for n in names if n.startswith("p3s.")
        ]
