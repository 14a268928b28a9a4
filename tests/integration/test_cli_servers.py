"""The operator's commands against the real RabbitMQ and PostgreSQL: status consumers, queue warnings, logs,
an unreachable broker, and two dispatchers upgrading a new database at once."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p3s import db
from p3s.cli import EXIT_OK, EXIT_UNAVAILABLE
from tests.procs import ROOT, Parts, import_template
from tests.stack import graphml, make_settings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

SECRET = "s3cr3t-Pa55"


@pytest.mark.postgres
def test_status_exits_3_on_an_unreachable_broker_naming_it_masked(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url=database_url)
    db.upgrade(database_url)
    with Parts(tmp_path, settings) as parts:
        done = parts.run("status", P3S_BROKER_URL=f"amqp://guest:{SECRET}@127.0.0.1:5679/", timeout=30)
    assert done.returncode == EXIT_UNAVAILABLE, done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("p3s: broker unreachable")
    assert "amqp://guest:**@127.0.0.1:5679" in done.stderr
    assert "task queues:" in done.stdout  # the database's half is still shown


def test_status_counts_consumers_and_warns_about_a_queue_nobody_serves(
    tmp_path: Path, broker_url: str, database_url: str
) -> None:
    settings = make_settings(tmp_path, broker_url, database_url)
    import_template(settings, graphml({"a": {"command": "true"}}), name="plain")
    import_template(settings, graphml({"b": {"command": "true", "queue": "fast"}}), name="quick")
    with Parts(tmp_path, settings) as parts:
        dispatcher = parts.start("dispatcher", "dispatcher")
        pilot = parts.start("pilot", "pilot", "--queues", "default")
        parts.wait_for(lambda: parts.json("pilots"), what="the pilot's registration", alive=[dispatcher, pilot])
        data = parts.wait_for(lambda: (d := parts.json("status")) and any(q["consumers"] for q in d["queues"]) and d,
                              what="the pilot consuming")
        queues = {q["queue"]: (q["consumers"], q["pilots"]) for q in data["queues"]}
        assert queues == {"default": (1, 1), "fast": (0, 0)}
        (warning,) = data["warnings"]
        assert "queue fast" in warning and "quick" in warning
        text = parts.run("status")
        assert text.returncode == EXIT_OK, text.stderr
        assert "WARNING: queue fast is used by template(s) quick but no pilot serves it" in text.stdout

        parts.start("pilot", "pilot", "--queues", "fast")
        parts.wait_for(lambda: not parts.json("status")["warnings"], what="the warning to go")


def test_logs_prints_and_follows_a_jobs_log(tmp_path: Path, broker_url: str, database_url: str) -> None:
    settings = make_settings(tmp_path, broker_url, database_url)
    # The job runs until the test lets it end: it is running for as long as the test looks, however slow the host.
    release = tmp_path / "release"
    import_template(settings, graphml({"talk": {
        "command": f"/bin/sh -c 'echo first-line; while [ ! -e {release} ]; do sleep 0.1; done; echo last-line'",
        "wall_s": "120"}}, trigger="*.dat", budget_s=600))
    data = tmp_path / "run1.dat"
    data.write_text("x")
    with Parts(tmp_path, settings) as parts:
        dispatcher = parts.start("dispatcher", "dispatcher")
        pilot = parts.start("pilot", "pilot", "--queues", "default")
        parts.wait_for(lambda: parts.json("pilots"), what="the pilot's registration", alive=[dispatcher, pilot])
        assert parts.run("submit", str(data)).returncode == EXIT_OK
        job = parts.wait_for(lambda: [j for j in parts.jobs() if j["state"] == "running"], what="the job running",
                             alive=[dispatcher, pilot])[0]
        # Followed from while it runs: its first line comes while the job waits; the command returns
        # when the job has ended, with every line.
        errors = tmp_path / "follow.err"
        with open(errors, "wb") as err:
            follow = subprocess.Popen([sys.executable, "-m", "p3s", "logs", str(job["id"]), "--follow"],
                                      env=parts.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert select.select([follow.stdout], [], [], 60)[0], "p3s logs --follow printed nothing in 60s"
            first = follow.stdout.readline()
            assert "first-line" in first, errors.read_text()
            release.touch()
            assert follow.wait(60) == EXIT_OK, errors.read_text()
            rest = follow.stdout.read()
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
            follow.stdout.close()
        assert "last-line" in rest and "first-line" not in rest
        follow_stdout = first + rest
        (ended,) = parts.jobs()
        assert ended["state"] == "finished"
        again = parts.run("logs", str(job["id"]))
        assert again.returncode == EXIT_OK and again.stdout == follow_stdout
        # From a host where the log root is elsewhere, and the recorded path not there: said so.
        moved = parts.run("logs", str(job["id"]), P3S_LOG_ROOT=str(tmp_path / "not-mounted"),
                          P3S_STATE_DIR=str(tmp_path / "other-host"))
        assert ended["log"] and Path(ended["log"]).is_file()
        assert moved.returncode == EXIT_OK  # the recorded path is reachable here: it is used
        Path(ended["log"]).rename(tmp_path / "gone.log")
        gone = parts.run("logs", str(job["id"]), P3S_LOG_ROOT=str(tmp_path / "not-mounted"))
        assert gone.returncode == 1 and "not reachable from this host" in gone.stderr


@pytest.mark.postgres
def test_dispatchers_upgrading_a_new_database_at_once_do_not_race(new_database: object) -> None:
    """Separate processes, as two dispatchers are, each starting the upgrade at the same instant."""
    script = (
        "import sys, time; from p3s import db; start = float(sys.argv[2]);"
        "time.sleep(max(0.0, start - time.time())); db.upgrade(sys.argv[1])"
    )
    for _attempt in range(3):
        url = new_database()  # type: ignore[operator]
        start = time.time() + 2.0  # after every interpreter has started and imported p3s
        procs = [subprocess.Popen([sys.executable, "-c", script, url, str(start)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(4)]
        outputs = [p.communicate(timeout=90)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(outputs)
        db.check_schema(url)
