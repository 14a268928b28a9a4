"""Settings: the documented example file, environment overrides, errors and secrets."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from p3s.config import (
    BrokerSettings,
    DatabaseSettings,
    MetricsSettings,
    PilotSettings,
    Settings,
    SourceSettings,
    load_settings,
    mask_url,
)
from p3s.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "p3s.toml"

# Fields of Settings that are not settings: load_settings fills them itself.
NOT_SETTINGS = {"source_file"}

SECRET = "s3cr3t-Pa55"


def write(tmp_path: Path, text: str, name: str = "p3s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def example_data() -> dict[str, Any]:
    with EXAMPLE.open("rb") as fh:
        return tomllib.load(fh)


# -- (a) the example file documents every setting ----------------------------------------


def _missing(cls: type, table: Mapping[str, Any], where: str) -> list[str]:
    """Every field of ``cls`` (recursively) that ``table`` does not set explicitly."""
    missing = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if cls is Settings and f.name in NOT_SETTINGS:
            continue
        name = f"{where}{f.name}"
        if f.name not in table:
            missing.append(name)
            continue
        hint, value = hints[f.name], table[f.name]
        if dataclasses.is_dataclass(hint):
            missing += _missing(hint, value, f"{name}.")
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            assert value, f"{name}: the example gives no table to document {typing.get_args(hint)[0].__name__}"
            for i, item in enumerate(value):
                missing += _missing(typing.get_args(hint)[0], item, f"{name}[{i}].")
        elif typing.get_origin(hint) is Mapping:
            assert value, f"{name}: the example table is empty, so it shows nothing"
    return missing


def _as_data(obj: Any) -> Any:
    """A settings object as plain data, like the parsed TOML (without dataclasses.asdict)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _as_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _as_data(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_as_data(v) for v in obj]
    return obj


def test_example_loads_with_an_empty_environment() -> None:
    settings = load_settings(EXAMPLE, {})
    assert settings.source_file == str(EXAMPLE)
    assert settings.broker.url == "amqp://p3s-dispatcher@rabbit.example.org/p3s"
    assert settings.broker.password_file
    assert settings.database.url == "postgresql://p3s@db.example.org/p3s"
    assert settings.database.password_file
    assert settings.metrics.port == 9310
    assert [(s.name, s.kind, s.fallback_for) for s in settings.sources] == [
        ("eos", "xrootd", ""),
        ("daq-buffer", "inotify", "eos"),
    ]
    assert not settings.broker.embedded
    assert dict(settings.sampling)
    assert all(0.0 <= f <= 1.0 for f in settings.sampling.values())


def test_example_sets_every_field_of_every_settings_dataclass() -> None:
    missing = _missing(Settings, example_data(), "")
    assert missing == [], f"settings not documented in config/p3s.toml: {missing}"


def test_example_walk_notices_an_undocumented_setting() -> None:
    data = example_data()
    del data["pilot"]["kill_grace_s"]
    del data["sources"][0]["url_prefix"]
    assert _missing(Settings, data, "") == ["sources[0].url_prefix", "pilot.kill_grace_s"]


def test_every_value_in_the_example_reaches_the_settings() -> None:
    data = example_data()
    loaded = _as_data(load_settings(EXAMPLE, {}))
    for key, value in data.items():
        assert loaded[key] == value, key


def test_example_mentions_each_setting_in_a_comment_or_key() -> None:
    # The walk above needs the key; the comment above each key says what it does and its unit.
    text = EXAMPLE.read_text()
    for section in ("[broker]", "[database]", "[watcher]", "[[sources]]", "[dispatcher]", "[pilot]", "[metrics]"):
        assert f"\n{section}\n" in text
    assert 'kind = "xrootd"' in text and 'fallback_for = "eos"' in text  # EOS primary, buffer fallback


# -- (b) the environment wins over the file ----------------------------------------------


def test_broker_and_database_urls_from_the_environment_win() -> None:
    env = {
        "P3S_BROKER_URL": "amqp://pilot@other.example.org/p3s-test",
        "P3S_DATABASE_URL": "postgresql://reader@replica.example.org/p3s",
    }
    settings = load_settings(EXAMPLE, env)
    assert settings.broker.url == "amqp://pilot@other.example.org/p3s-test"
    assert settings.database.url == "postgresql://reader@replica.example.org/p3s"
    # The rest of each section still comes from the file.
    assert settings.broker.password_file == "/etc/p3s/rabbitmq.password"
    assert settings.database.password_file == "/etc/p3s/postgres.password"


def test_an_int_from_the_environment_is_an_int() -> None:
    settings = load_settings(EXAMPLE, {"P3S_DISPATCHER_BATCH_SIZE": "1200"})
    assert settings.dispatcher.batch_size == 1200
    assert type(settings.dispatcher.batch_size) is int
    assert settings.dispatcher.reap_interval_s == 2.0


def test_top_level_and_float_and_bool_overrides() -> None:
    env = {"P3S_STATE_DIR": "/srv/p3s", "P3S_PILOT_HEARTBEAT_S": "2.5", "P3S_DATABASE_ECHO": "yes"}
    settings = load_settings(EXAMPLE, env)
    assert settings.state_dir == "/srv/p3s"
    assert settings.pilot.heartbeat_s == 2.5
    assert settings.database.echo is True


@pytest.mark.parametrize("value", ["a,b", '["a", "b"]'])
def test_pilot_queues_as_a_comma_list_or_json(value: str) -> None:
    settings = load_settings(EXAMPLE, {"P3S_PILOT_QUEUES": value})
    assert settings.pilot.queues == ("a", "b")


def test_sampling_as_json_replaces_the_file_table() -> None:
    assert dict(load_settings(EXAMPLE, {}).sampling) == {"hits": 0.25, "*_calib_*.hdf5": 0.1}
    settings = load_settings(EXAMPLE, {"P3S_SAMPLING": '{"raw": 0.5, "*.calib": 0}'})
    assert dict(settings.sampling) == {"raw": 0.5, "*.calib": 0.0}


def test_sources_as_json(tmp_path: Path) -> None:
    env = {"P3S_SOURCES": json.dumps([{"name": "b", "kind": "poll", "location": str(tmp_path)}])}
    (source,) = load_settings(EXAMPLE, env).sources
    assert source == SourceSettings(name="b", kind="poll", location=str(tmp_path))


def test_p3s_config_names_the_file_when_no_path_is_given() -> None:
    settings = load_settings(None, {"P3S_CONFIG": str(EXAMPLE)})
    assert settings.source_file == str(EXAMPLE)
    assert settings.metrics.port == 9310


def test_no_file_and_no_environment_is_the_embedded_default(tmp_path: Path) -> None:
    settings = load_settings(None, {})
    assert settings.broker.embedded and settings.broker.effective_url == "memory://"
    assert settings.database.url == ""
    local = load_settings(None, {"P3S_STATE_DIR": str(tmp_path)})
    assert local.database_url == f"sqlite:///{tmp_path / 'p3s.db'}"
    assert local.output_path == tmp_path / "outputs"


# -- (c) bad values name the setting -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        ('[dispatcher]\nbatch_size = "many"\n', {}, "dispatcher.batch_size"),
        ("", {"P3S_DISPATCHER_BATCH_SIZE": "many"}, "dispatcher.batch_size"),
        ("", {"P3S_METRICS_PORT": "93.5"}, "metrics.port"),
        ("[pilot]\nmax_jobs = 2.5\n", {}, "pilot.max_jobs"),
        ("[broker]\nurll = 'amqp://x'\n", {}, "'urll'"),
        ("stat_dir = '/tmp'\n", {}, "'stat_dir'"),
        ("[[sources]]\nname = 'a'\nlocaton = '/x'\n", {}, "'locaton'"),
        ("[sampling]\nraw = 1.5\n", {}, "sampling.raw"),
        ("", {"P3S_SAMPLING": '{"raw": -0.1}'}, "sampling.raw"),
        ("[[sources]]\nname = 'eos'\nkind = 'ftp'\n", {}, "sources.eos.kind"),
        ("[database]\necho = 'maybe'\n", {}, "database.echo"),
        ("", {"P3S_PILOT_QUEUES": "[not json"}, "pilot.queues"),
    ],
)
def test_bad_values_raise_config_error_naming_the_setting(
    tmp_path: Path, text: str, env: dict[str, str], names: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env)
    assert names in str(info.value)


def test_an_unreadable_or_malformed_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.toml", {})
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings(write(tmp_path, "[broker\n", "bad.toml"), {})


# -- (d) secrets ---------------------------------------------------------------------------------


def test_password_in_url_is_masked_in_to_dict_and_repr(tmp_path: Path) -> None:
    env = {
        "P3S_BROKER_URL": f"amqp://p3s:{SECRET}@rabbit.example.org:5671/p3s",
        "P3S_DATABASE_URL": f"postgresql://p3s:{SECRET}@db.example.org/p3s",
        "P3S_STATE_DIR": str(tmp_path),
    }
    settings = load_settings(write(tmp_path, ""), env)
    data = settings.to_dict()
    assert SECRET not in json.dumps(data)
    assert data["broker"]["url"] == "amqp://p3s:***@rabbit.example.org:5671/p3s"
    assert data["database"]["url"] == "postgresql://p3s:***@db.example.org/p3s"
    assert data["effective"]["broker_url"] == "amqp://p3s:***@rabbit.example.org:5671/p3s"
    for text in (repr(settings), str(settings), repr(settings.broker), repr(settings.database)):
        assert SECRET not in text
    assert "rabbit.example.org" in repr(settings.broker)
    # Unmasked on request, for the code that connects.
    assert SECRET in settings.to_dict(masked=False)["effective"]["broker_url"]
    assert SECRET in settings.broker.effective_url and SECRET in settings.database_url


def test_password_file_goes_into_the_effective_urls_only(tmp_path: Path) -> None:
    password = "p@ss:w/rd " + SECRET
    rabbit_pw, pg_pw = tmp_path / "rabbit.pw", tmp_path / "pg.pw"
    rabbit_pw.write_text(password + "\n")
    pg_pw.write_text(password + "\n")
    path = write(
        tmp_path,
        f"""
state_dir = "{tmp_path}"
[broker]
url = "amqp://p3s-dispatcher@rabbit.example.org/p3s"
password_file = "{rabbit_pw}"
[database]
url = "postgresql://p3s@db.example.org:5432/p3s"
password_file = "{pg_pw}"
""",
    )
    settings = load_settings(path, {})
    broker, database = urlsplit(settings.broker.effective_url), urlsplit(settings.database_url)
    assert (broker.username, unquote(broker.password or ""), broker.hostname, broker.path) == (
        "p3s-dispatcher",
        password,
        "rabbit.example.org",
        "/p3s",
    )
    assert (database.username, unquote(database.password or ""), database.port) == ("p3s", password, 5432)
    assert settings.broker.url == "amqp://p3s-dispatcher@rabbit.example.org/p3s"

    masked = json.dumps(settings.to_dict(masked=True))
    assert SECRET not in masked
    assert SECRET not in unquote(masked)
    assert json.loads(masked)["effective"]["broker_url"] == "amqp://p3s-dispatcher:***@rabbit.example.org/p3s"
    assert SECRET not in repr(settings)


def test_a_missing_password_file_is_a_config_error(tmp_path: Path) -> None:
    settings = load_settings(EXAMPLE, {"P3S_BROKER_PASSWORD_FILE": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match="cannot read password file"):
        _ = settings.broker.effective_url


def test_mask_url_leaves_urls_without_password_alone() -> None:
    assert mask_url("") == ""
    assert mask_url("amqp://p3s@rabbit.example.org/p3s") == "amqp://p3s@rabbit.example.org/p3s"
    assert mask_url(f"amqp://u:{SECRET}@h/v") == "amqp://u:***@h/v"


def test_repr_of_sections_without_url_keeps_every_field() -> None:
    assert "port=9310" in repr(MetricsSettings(port=9310))
    assert "queues=('a',)" in repr(PilotSettings(queues=("a",)))
    assert SECRET not in repr(BrokerSettings(url=f"amqp://u:{SECRET}@h/v"))
    assert SECRET not in repr(DatabaseSettings(url=f"postgresql://u:{SECRET}@h/d"))


def test_to_dict_of_the_example_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET)
    env = {"P3S_BROKER_PASSWORD_FILE": str(tmp_path / "pw"), "P3S_DATABASE_PASSWORD_FILE": str(tmp_path / "pw")}
    settings = load_settings(EXAMPLE, env)
    data = settings.to_dict()  # a [sampling] table once broke the deep copy of asdict
    assert data["sampling"] == {"hits": 0.25, "*_calib_*.hdf5": 0.1}
    assert SECRET not in json.dumps(data)


# -- (e) p3s config show -----------------------------------------------------------------------


def run_show(tmp_path: Path, config: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    base.update(HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))
    return subprocess.run(
        [sys.executable, "-m", "p3s", "--config", str(config), "config", "show", *extra],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_show_prints_settings_but_not_the_password_from_the_environment(tmp_path: Path) -> None:
    config = write(tmp_path, '[broker]\nurl = "amqp://p3s@file.example.org/p3s"\n[dispatcher]\nbatch_size = 77\n')
    env = {"P3S_BROKER_URL": f"amqp://p3s-dispatcher:{SECRET}@rabbit.example.org/p3s"}

    result = run_show(tmp_path, config, env)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "[broker]" in lines and "[dispatcher]" in lines
    assert 'url = "amqp://p3s-dispatcher:***@rabbit.example.org/p3s"' in lines
    assert "batch_size = 77" in lines
    assert lines[0] == f"# p3s settings from {config}"

    as_json = run_show(tmp_path, config, env, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert SECRET not in as_json.stdout + as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["broker"]["url"] == "amqp://p3s-dispatcher:***@rabbit.example.org/p3s"
    assert data["dispatcher"]["batch_size"] == 77


def test_config_show_reports_a_bad_setting(tmp_path: Path) -> None:
    config = write(tmp_path, "[dispatcher]\nbatch_size = 0\n")
    result = run_show(tmp_path, config, {})
    assert result.returncode == 2
    assert "dispatcher.batch_size" in result.stderr


def test_config_show_of_the_example_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET)
    env = {
        "P3S_BROKER_PASSWORD_FILE": str(tmp_path / "pw"),
        "P3S_DATABASE_PASSWORD_FILE": str(tmp_path / "pw"),
    }
    result = run_show(tmp_path, EXAMPLE, env)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "[sampling]" in result.stdout.splitlines()
    assert '"*_calib_*.hdf5" = 0.1' in result.stdout.splitlines()
    assert '#   broker = "amqp://p3s-dispatcher@rabbit.example.org/p3s"' in result.stdout.splitlines()
