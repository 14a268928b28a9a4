"""Mistakes an operator makes end in one clear line and the README's exit code, never a traceback or a hang."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from p3s import db, schema
from p3s.cli import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from p3s.config import load_settings
from tests.stack import graphml

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55"
UNREACHABLE = f"amqp://guest:{SECRET}@127.0.0.1:5679/"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) ", re.MULTILINE)


def p3s(state: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}
    environ.update(P3S_STATE_DIR=str(state), PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "p3s", *args], env=environ, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The command's stderr, asserted to be exactly one line and the exit code ``code``."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def ready(state: Path) -> Path:
    """A state directory whose SQLite database has the current schema."""
    db.upgrade(load_settings(None, {"P3S_STATE_DIR": str(state)}).database_url)
    return state


def test_dag_import_of_a_missing_file(ready: Path) -> None:
    line = one_line(p3s(ready, "dag", "import", "/nonexistent.graphml"), EXIT_USAGE)
    assert line == "p3s: cannot read template file /nonexistent.graphml: No such file or directory"


@pytest.mark.parametrize("where", ["option", "option after the command", "environment", "config file"])
def test_a_log_level_that_is_not_one(ready: Path, where: str) -> None:
    config = ready / "p3s.toml"
    config.write_text('log_level = "LOUD"\n')
    done = {
        "option": lambda: p3s(ready, "--log-level", "LOUD", "jobs"),
        "option after the command": lambda: p3s(ready, "jobs", "--log-level", "LOUD"),
        "environment": lambda: p3s(ready, "jobs", P3S_LOG_LEVEL="LOUD"),
        "config file": lambda: p3s(ready, "--config", str(config), "jobs"),
    }[where]()
    line = one_line(done, EXIT_USAGE)
    assert "LOUD" in line and "DEBUG, INFO, WARNING, ERROR" in line


def test_the_config_files_log_level_is_used(ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from p3s.cli import main

    config = ready / "p3s.toml"
    config.write_text('log_level = "debug"\n')
    monkeypatch.setenv("P3S_STATE_DIR", str(ready))
    monkeypatch.delenv("P3S_LOG_LEVEL", raising=False)
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        assert main(["--config", str(config), "jobs"]) == EXIT_OK
        assert root.level == logging.DEBUG  # read, no longer ignored
        assert main(["--config", str(config), "jobs", "--log-level", "error"]) == EXIT_OK
        assert root.level == logging.ERROR  # the option wins over the file
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_a_broker_url_of_an_unknown_transport(ready: Path) -> None:
    line = one_line(p3s(ready, "status", P3S_BROKER_URL=f"amqq://p3s:{SECRET}@rabbit.example.org/"), EXIT_USAGE)
    assert "broker.url" in line and "amqq://p3s:***@rabbit.example.org/" in line and SECRET not in line


@pytest.mark.parametrize("command", [["status"], ["submit", "FILE"]])
def test_an_unreachable_broker_exits_3_naming_the_url_masked(ready: Path, command: list[str]) -> None:
    data = ready / "run1.dat"
    data.write_text("x")
    args = [str(data) if a == "FILE" else a for a in command]
    done = p3s(ready, *args, timeout=30, P3S_BROKER_URL=UNREACHABLE)
    assert done.returncode == EXIT_UNAVAILABLE, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and SECRET not in done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("p3s: ") and "127.0.0.1:5679" in last and "guest:**" in last


@pytest.mark.parametrize("command", [["jobs"], ["files"], ["workflows"], ["pilots"], ["status"], ["dag", "list"],
                                     ["audit"], ["priority", "list"], ["logs", "1"]])
def test_read_only_commands_on_an_empty_database_create_nothing(state: Path, command: list[str]) -> None:
    line = one_line(p3s(state, *command), EXIT_UNAVAILABLE)
    assert line.endswith("run p3s db upgrade"), line
    assert not (state / "p3s.db").exists()


def test_read_only_commands_on_an_outdated_database_leave_it(state: Path) -> None:
    assert p3s(state, "db", "upgrade", "0002").returncode == EXIT_OK
    line = one_line(p3s(state, "jobs"), EXIT_UNAVAILABLE)
    assert "revision 0002" in line and f"needs {db.head_revision()}" in line and line.endswith("run p3s db upgrade")
    settings = load_settings(None, {"P3S_STATE_DIR": str(state)})
    engine = db.make_engine(settings.database_url)
    try:
        assert db.current_revision(engine) == "0002"
    finally:
        engine.dispose()
    assert p3s(state, "db", "upgrade").returncode == EXIT_OK
    assert p3s(state, "jobs").returncode == EXIT_OK


def test_the_cheap_head_is_alembics_head() -> None:
    assert schema.script_head() == db.head_revision()


def test_config_is_accepted_after_the_subcommand(ready: Path) -> None:
    config = ready / "p3s.toml"
    config.write_text("[dispatcher]\nbatch_size = 77\n")
    done = p3s(ready, "config", "show", "--config", str(config))
    assert done.returncode == EXIT_OK, done.stderr
    assert "batch_size = 77" in done.stdout.splitlines()
    assert p3s(ready, "jobs", "-c", str(config)).returncode == EXIT_OK


def test_a_mistyped_p3s_variable_is_warned_about(ready: Path) -> None:
    done = p3s(ready, "jobs", P3S_BROKR_URL="amqp://x", P3S_INPUT="/payload/sees/this")
    assert done.returncode == EXIT_OK, done.stderr
    warnings = [line for line in done.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, done.stderr
    assert "P3S_BROKR_URL" in warnings[0] and "P3S_BROKER_URL" in warnings[0]


def test_config_show_loads_back_unchanged(tmp_path: Path, ready: Path) -> None:
    example = ROOT / "config" / "p3s.toml"
    (tmp_path / "pw").write_text(SECRET)
    env = {"P3S_BROKER_PASSWORD_FILE": str(tmp_path / "pw"), "P3S_SAMPLING": '{"we ird\\"key": 0.5, "*.x": 1}'}
    done = p3s(ready, "--config", str(example), "config", "show", **env)
    assert done.returncode == EXIT_OK, done.stderr
    assert SECRET not in done.stdout
    shown = tmp_path / "shown.toml"
    shown.write_text(done.stdout)
    tomllib.loads(done.stdout)  # valid TOML
    original = load_settings(example, {**env, "P3S_STATE_DIR": str(ready)})
    again = load_settings(shown, {})
    assert dataclasses.replace(again, source_file="") == dataclasses.replace(original, source_file="")
    assert dict(again.sampling) == {'we ird"key': 0.5, "*.x": 1.0}
    # Shown again, the file is the same but for its first line (where it came from).
    twice = p3s(ready, "--config", str(shown), "config", "show")
    assert twice.stdout.splitlines()[1:] == done.stdout.splitlines()[1:]


def test_submit_to_a_template_that_does_not_exist(ready: Path) -> None:
    from sqlalchemy.orm import Session

    from p3s.dagengine import parse_graphml
    from p3s.dispatcher import admin

    settings = load_settings(None, {"P3S_STATE_DIR": str(ready)})
    engine = db.make_engine(settings.database_url)
    with Session(engine) as s, s.begin():
        admin.import_template(s, parse_graphml(graphml({"a": {"command": "true"}}), name="real"))
    engine.dispose()
    data = ready / "run1.dat"
    data.write_text("x")
    line = one_line(p3s(ready, "submit", str(data), "--template", "nosuch", P3S_BROKER_URL=UNREACHABLE), EXIT_USAGE)
    assert line == "p3s: no template named 'nosuch'; active templates: real"


def test_jobs_with_a_state_that_is_not_one(ready: Path) -> None:
    line = one_line(p3s(ready, "jobs", "--state", "bogus"), EXIT_USAGE)
    assert "'bogus'" in line
    for st in ("pending", "queued", "running", "finished", "failed", "timeout", "expired", "lost", "dropped"):
        assert f"'{st}'" in line
    assert one_line(p3s(ready, "workflows", "--state", "bogus"), EXIT_USAGE).count("'") >= 8


def test_help_describes_every_command_in_one_line(ready: Path) -> None:
    from p3s.cli import build_parser

    done = p3s(ready, "--help", COLUMNS="80")
    assert done.returncode == EXIT_OK
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    lines = done.stdout.splitlines()
    for name in sub.choices:
        (line,) = [x for x in lines if x.split()[:1] == [name]]
        described = line.split(None, 1)
        assert len(described) == 2 and len(described[1]) > 10, line
        following = lines[lines.index(line) + 1]
        # The next line is another command (or the end of the list), not a continuation.
        assert following.split()[:1] in ([c] for c in sub.choices) or not following.strip(), (line, following)


def test_demo_prints_progress_and_table_without_log_noise(state: Path) -> None:
    done = p3s(state, "demo", "--files", "2", "--pilots", "1", timeout=120)
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    assert "No hostname was supplied" not in done.stderr
    assert not LOG_LINE.findall(done.stderr), done.stderr
    assert "waiting for their workflows" in done.stdout
    assert "2 of 2 workflow(s) finished" in done.stdout
    assert "FILE" in done.stdout and "STATE" in done.stdout
