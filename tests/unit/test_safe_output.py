"""Names from outside cannot forge a table row, a log line or an operator's terminal; --json stays exact."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from p3s import db
from p3s.cli import SafeFormatter
from p3s.dispatcher import intake
from p3s.dispatcher.context import Context
from p3s.messages import DataEvent
from p3s.tables import safe
from tests.stack import make_settings

HOSTILE = {
    "newline": "run1.dat\n2026-12-01 00:00:00 ERROR p3s: forged line",
    "carriage return": "run2.dat\rOVERWRITTEN",
    "ansi": "run3.dat\x1b[2J\x1b[31mred",
    "nul": "run4\x00.dat",
    "bidi": "run5\u202etad.exe",
}


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_safe_leaves_one_printable_line(name: str) -> None:
    out = safe(name)
    assert out.isprintable(), out
    assert "\x1b" not in out and "\n" not in out and "\r" not in out and "\x00" not in out


def test_escapes_cannot_be_confused_with_the_real_thing() -> None:
    # A name that literally holds a backslash and an n is shown differently from one with a newline.
    assert safe("a\\nb") != safe("a\nb")


def test_log_lines_escape_the_message_but_keep_the_traceback() -> None:
    formatter = SafeFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("p3s", logging.WARNING, __file__, 1, "file %s: refused", (HOSTILE["newline"],), None)
    line = formatter.format(record)
    assert "\n" not in line and line.startswith("WARNING file run1.dat\\n2026")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("p3s", logging.ERROR, __file__, 1, "x\ny", (), sys.exc_info())
    text = formatter.format(record)
    assert text.startswith("ERROR x\\ny\nTraceback"), text


def test_files_table_escapes_and_json_stays_exact(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    # Stored as the dispatcher stores what reaches it (the NUL one is refused at the edge, so not here).
    names = [n for k, n in HOSTILE.items() if k != "nul"]
    with Session(engine) as s, s.begin():
        intake.record_events(s, [DataEvent(n, f"/data/{i}", "raw", time.time()) for i, n in enumerate(names)],
                             Context(settings))
    engine.dispose()
    env = {"P3S_STATE_DIR": settings.state_dir, "PATH": "/usr/bin:/bin"}
    table = subprocess.run([sys.executable, "-m", "p3s", "files"], env=env, capture_output=True, text=True,
                           check=True).stdout
    assert "\x1b" not in table and "\r" not in table
    assert len(table.splitlines()) == 1 + len(names), table  # a header and one line a file
    assert "forged line" in table and "run3.dat\\x1b[2J" in table
    rows = json.loads(subprocess.run([sys.executable, "-m", "p3s", "files", "--json"], env=env,
                                     capture_output=True, text=True, check=True).stdout)
    assert sorted(r["name"] for r in rows) == sorted(names)
