"""Broker settings for a cluster: node lists, failover order, queue types, and passwords kept masked."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from kombu import Connection

from p3s import broker, topology
from p3s.config import load_settings, mask_url, to_toml
from p3s.errors import BrokerUnavailable, ConfigError

REPO = Path(__file__).resolve().parents[2]
SECRET = "n0de-Pa55"
NODES = [f"amqp://p3s:{SECRET}@rabbit{i}.example.org:5672/p3s" for i in (1, 2, 3)]


def settings_from(tmp_path: Path, toml: str = "", **env: str):
    path = tmp_path / "p3s.toml"
    path.write_text(toml)
    return load_settings(path, env)


def test_nodes_as_a_toml_list_or_a_semicolon_string_are_the_same_settings(tmp_path: Path) -> None:
    listed = settings_from(tmp_path, "[broker]\nurl = [" + ", ".join(f'"{u}"' for u in NODES) + "]\n")
    joined = settings_from(tmp_path, P3S_BROKER_URL=";".join(NODES))
    assert listed.broker == joined.broker
    assert listed.broker.node_urls == tuple(NODES)
    # Written back as TOML, the list reads back to the same settings.
    again = settings_from(tmp_path, to_toml(listed, masked=False))
    assert again.broker.node_urls == tuple(NODES)


def test_one_url_stays_one_node_and_classic_is_the_default(tmp_path: Path) -> None:
    s = settings_from(tmp_path, P3S_BROKER_URL=NODES[0])
    assert s.broker.node_urls == (NODES[0],)
    assert (s.broker.queue_type, s.broker.failover_strategy, s.broker.task_queue_durable) == \
        ("classic", "round-robin", True)


def test_the_password_file_goes_into_every_node_url(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("a;b@c\n")
    s = settings_from(tmp_path, P3S_BROKER_URL="amqp://p3s@r1/p3s;amqp://p3s@r2/p3s",
                      P3S_BROKER_PASSWORD_FILE=str(secret))
    # Percent-encoded: a ";" in a password must not split the list.
    assert s.broker.node_urls == ("amqp://p3s:a%3Bb%40c@r1/p3s", "amqp://p3s:a%3Bb%40c@r2/p3s")
    assert "a%3Bb" not in repr(s.broker)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("amqp://r1/p3s;", "';' may only separate two node URLs"),
        ("amqp://r1/p3s;;amqp://r2/p3s", "';' may only separate two node URLs"),
        ("amqp://r1/p3s;http://r2/p3s", "'http://r2/p3s' is not a broker URL"),
        (f"amqp://p3s:{SECRET}@r1/p3s;memory://", "is not a broker URL"),
    ],
)
def test_a_bad_node_list_is_refused_naming_the_setting_without_the_password(
    tmp_path: Path, url: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from(tmp_path, P3S_BROKER_URL=url)
    assert str(err.value).startswith("broker.url:") and words in str(err.value)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(("key", "value"), [("QUEUE_TYPE", "stream"), ("FAILOVER_STRATEGY", "random")])
def test_unknown_queue_type_or_strategy_is_refused(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"broker.{key.lower()}: must be one of"):
        settings_from(tmp_path, P3S_BROKER_URL=NODES[0], **{f"P3S_BROKER_{key}": value})


def test_a_list_of_non_strings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="broker.url: expected URL strings"):
        settings_from(tmp_path, "[broker]\nurl = [1, 2]\n")


def test_every_password_of_a_node_list_is_masked() -> None:
    masked = mask_url(";".join(NODES))
    assert SECRET not in masked
    assert masked.split(";") == [f"amqp://p3s:***@rabbit{i}.example.org:5672/p3s" for i in (1, 2, 3)]
    # A database password with a ";" is not taken for a list.
    assert mask_url("postgresql://u:a;b@db/p3s") == "postgresql://u:***@db/p3s"


def test_config_show_masks_every_node(tmp_path: Path) -> None:
    env = {"P3S_BROKER_URL": ";".join(NODES), "PATH": "/usr/bin:/bin", "P3S_STATE_DIR": str(tmp_path)}
    for args in (["config", "show"], ["config", "show", "--json"]):
        done = subprocess.run([sys.executable, "-m", "p3s", *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stdout + done.stderr
        assert done.stdout.count("p3s:***@rabbit") >= 3, done.stdout


def test_connect_fails_over_in_the_order_given_or_shuffled(tmp_path: Path, monkeypatch) -> None:
    s = settings_from(tmp_path, P3S_BROKER_URL=";".join(NODES))
    conn = broker.connect(s.broker)
    assert conn.alt == NODES and broker.nodes_of(conn) == 3
    assert conn.clone().alt == NODES
    monkeypatch.setattr(broker.random, "shuffle", lambda items: items.reverse())
    shuffled = broker.connect(settings_from(tmp_path, P3S_BROKER_URL=";".join(NODES),
                                            P3S_BROKER_FAILOVER_STRATEGY="shuffle").broker)
    assert shuffled.alt == NODES[::-1]


def test_a_one_shot_tries_every_node_once_and_names_them_masked(tmp_path: Path, caplog) -> None:
    # Three closed ports on this host: each try is refused at once.
    urls = [f"amqp://p3s:{SECRET}@127.0.0.1:{port}//" for port in (1, 2, 3)]
    s = settings_from(tmp_path, P3S_BROKER_URL=";".join(urls))
    conn = broker.connect(s.broker)
    tried: list[str] = []
    real = conn._connection_factory

    def factory() -> object:
        tried.append(conn.as_uri())
        return real()

    conn._connection_factory = factory  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING), pytest.raises(BrokerUnavailable) as err:
        broker.ensure_connected(conn, max_retries=0, waiting="test")
    assert tried == [f"amqp://p3s:**@127.0.0.1:{port}//" for port in (1, 2, 3)]
    assert "any of its 3 nodes" in str(err.value)
    assert SECRET not in str(err.value) + caplog.text
    assert caplog.text.count("trying the next node") == 2


def _declared(queue_type: str, durable_tasks: bool) -> dict[str, tuple[bool, dict]]:
    """What each queue is declared as on a connection of these settings (captured, no broker)."""
    s = load_settings(None, {"P3S_BROKER_QUEUE_TYPE": queue_type,
                             "P3S_BROKER_TASK_QUEUE_DURABLE": str(durable_tasks).lower()})
    conn = broker.connect(s.broker)
    seen: dict[str, tuple[bool, dict]] = {}
    channel = conn.channel()
    real = channel.queue_declare

    def capture(queue: str = "", passive: bool = False, durable: bool = False, arguments=None, **kw):
        seen[queue] = (durable, dict(arguments or {}))
        return real(queue=queue, passive=passive, durable=durable, arguments=arguments, **kw)

    channel.queue_declare = capture
    for q in [*topology.DISPATCHER_QUEUES, topology.invalid_queue, topology.task_queue("default")]:
        q(channel).declare()
    conn.release()
    return seen


def test_quorum_makes_the_kept_queues_quorum_and_leaves_task_queues_classic_priority_queues() -> None:
    seen = _declared("quorum", durable_tasks=False)
    for name in ("p3s.dispatcher.events", "p3s.dispatcher.status", "p3s.dispatcher.expired", "p3s.invalid"):
        durable, args = seen[name]
        assert durable and args["x-queue-type"] == "quorum", (name, args)
        assert "x-max-priority" not in args  # quorum queues refuse it
    assert seen["p3s.dispatcher.events"][1]["x-dead-letter-exchange"] == "p3s.invalid"
    assert seen["p3s.invalid"][1]["x-max-length"] == topology.INVALID_MAX_LENGTH
    durable, args = seen["p3s.tasks.default"]
    assert not durable and "x-queue-type" not in args
    assert args["x-dead-letter-exchange"] == "p3s.expired"
    assert topology.task_queue("default").max_priority == topology.MAX_PRIORITY


def test_classic_declares_what_it_always_did() -> None:
    seen = _declared("classic", durable_tasks=True)
    assert all(durable and "x-queue-type" not in args for durable, args in seen.values()), seen
    # The shared queue objects are not changed by a quorum declaration elsewhere.
    _declared("quorum", durable_tasks=False)
    assert "x-queue-type" not in (topology.events_queue.queue_arguments or {})
    assert topology.task_queue("default").durable


def test_a_plain_kombu_connection_declares_classic() -> None:
    with Connection("memory://") as conn:
        queue = topology.events_queue(conn.default_channel)
        assert queue.declared_as(topology._options(conn.default_channel)) is queue


def test_a_lost_connection_says_so_instead_of_reconnecting_under_its_consumers(monkeypatch) -> None:
    """kombu would open it again on the next node, where its consumers do not exist."""
    conn = broker.connect(load_settings(None, {}).broker)
    conn.ensure_connection()
    assert conn.connection is not None
    monkeypatch.setattr(conn.transport, "verify_connection", lambda _c: False)
    with pytest.raises(conn.connection_errors, match="lost"):
        conn.drain_events(timeout=0)
    with pytest.raises(conn.connection_errors):
        conn.connection  # noqa: B018 - still lost: only a reconnect (ensure_connection) opens it again
    monkeypatch.undo()
    conn.release()
