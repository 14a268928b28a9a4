"""A task's token goes into every report on its job, and nowhere else.

Not into the payload's environment or argv, not into the pilot's log lines,
not into any file the pilot writes.  No server: the pilot's reports are taken
where it sends them.
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from p3s.broker import Outgoing
from p3s.messages import JobReport, Task, encode, parse_status
from p3s.pilot.runner import run_payload
from p3s.pilot.service import REDELIVERED, Limits, Pilot
from p3s.states import JobState
from tests.stack import make_settings

TOKEN = "f00dfacecafe" + "5ec7e7" * 3 + "0ff1ce"  # recognisable, 32 hex digits like a real one

DUMP = textwrap.dedent("""\
    import json, os, sys
    out = sys.argv[1]
    with open(os.path.join(out, "dump.json"), "w") as fh:
        json.dump({"argv": sys.argv, "env": dict(os.environ), "cwd_files": os.listdir(".")}, fh)
    print("payload: environment dumped")
    """)


def a_task(tmp_path: Path, *, job_id: int = 7, deadline_in: float = 60.0, **extra: Any) -> Task:
    dump = tmp_path / "dump.py"
    dump.write_text(DUMP)
    now = time.time()
    return Task(job_id=job_id, workflow_id=1, template="t", node="n",
                argv=[sys.executable, str(dump), "{outdir}", "{input}", "{workdir}"],
                values={"outdir": str(tmp_path / "out"), "input": "/data/run1.dat", "input_name": "run1.dat"},
                env={"DQM_MODE": "{input_name}"}, queue="default", priority=5, wall_s=30,
                deadline=now + deadline_in, seen_at=now, enqueued_at=now, token=TOKEN, **extra)


def everything_written(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "dump.py")


class FakeMessage:
    def __init__(self, body: bytes, redelivered: bool = False) -> None:
        self.body = body
        self.delivery_info = {"redelivered": redelivered, "routing_key": "default"}
        self.acked = False

    def ack(self) -> None:
        self.acked = True


class Paused:
    def pause(self) -> None:
        pass


@pytest.fixture
def pilot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Pilot, list[JobReport]]:
    settings = make_settings(tmp_path)
    assert settings.broker.embedded
    pilot = Pilot(settings, Connection("memory://"), limits=Limits(), pilot_id="keeper")
    pilot._consumer = Paused()
    sent: list[JobReport] = []

    def send(message: Outgoing) -> None:
        report = parse_status(message.body)
        if isinstance(report, JobReport):
            sent.append(report)

    monkeypatch.setattr(pilot, "_send", send)
    return pilot, sent


def test_the_runner_never_gives_the_token_to_the_payload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Even given a task with its token, the runner puts it in neither argv nor environment nor log."""
    caplog.set_level(logging.DEBUG)
    task = a_task(tmp_path)
    out = run_payload(task, work_root=str(tmp_path / "work"), log_root=tmp_path / "logs", on_start=lambda _t: None,
                      between_slices=lambda: None, kill_requested=lambda: False, slice_s=0.1)
    assert out.state == JobState.FINISHED, out
    dump = (tmp_path / "out" / "dump.json").read_text()
    assert json.loads(dump)["argv"][2] == "/data/run1.dat" and "DQM_MODE" in json.loads(dump)["env"]
    assert TOKEN not in dump
    assert TOKEN.encode() not in Path(out.log).read_bytes()
    assert TOKEN not in caplog.text
    assert TOKEN.encode() not in everything_written(tmp_path)


def test_every_report_carries_the_token_and_nothing_else_does(
    tmp_path: Path, pilot: tuple[Pilot, list[JobReport]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p, sent = pilot
    task = a_task(tmp_path)
    # Taken from the queue as the pilot's loop takes it, then run.
    message = FakeMessage(encode(task))
    taken = p._take(message)  # noqa: SLF001 -- the pilot's own steps, without a broker
    assert taken == task and taken.token == TOKEN and message.acked
    assert p._execute(taken) == JobState.FINISHED  # noqa: SLF001
    assert [r.state for r in sent] == ["running", "finished"], sent
    assert all(r.token == TOKEN and r.pilot_id == "keeper" and r.job_id == 7 for r in sent), sent

    dump = (tmp_path / "out" / "dump.json").read_text()
    record = json.loads(dump)
    assert TOKEN not in dump, "the payload was given the token"
    assert not any("token" in k.lower() for k in record["env"]), record["env"]
    assert TOKEN.encode() not in Path(sent[-1].log).read_bytes()
    assert TOKEN.encode() not in everything_written(tmp_path), "the pilot wrote the token to a file"
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(task) and TOKEN not in repr(sent[-1])


@pytest.mark.parametrize("case", ["failed", "redelivered", "expired", "too_late"])
def test_refusals_and_failures_carry_the_token_too(
    tmp_path: Path, pilot: tuple[Pilot, list[JobReport]], caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG)
    p, sent = pilot
    if case == "failed":
        task = a_task(tmp_path)
        task = Task(**{**task.__dict__, "argv": [sys.executable, "-c", "raise SystemExit(3)"]})
        assert p._execute(task) == JobState.FAILED  # noqa: SLF001
        assert [(r.state, r.exit_code) for r in sent] == [("running", None), ("failed", 3)], sent
    elif case == "redelivered":
        message = FakeMessage(encode(a_task(tmp_path)), redelivered=True)
        assert p._take(message) is None and message.acked  # noqa: SLF001
        (report,) = sent
        assert report.state == JobState.LOST and report.redelivered and report.reason == REDELIVERED
    else:
        task = a_task(tmp_path, deadline_in=-1.0 if case == "expired" else 5.0, expected_s=600.0)
        assert p._execute(task) == JobState.EXPIRED  # noqa: SLF001
        (report,) = sent
        assert report.reason == ("deadline" if case == "expired" else "too_late"), report
        assert not (tmp_path / "out" / "dump.json").exists()
    assert sent and all(r.token == TOKEN for r in sent), sent
    assert TOKEN not in caplog.text
    assert TOKEN.encode() not in everything_written(tmp_path)
