"""``p3s run`` on the embedded default survives a file whose name is not UTF-8 (issue 9, case 4).

The file is recorded ``refused`` with a reason, and a good file written after
it runs as usual.  No server: the in-process broker and SQLite in a state
directory of the test's own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.procs import Parts, finished_names
from tests.stack import graphml, make_settings, probe_command


def test_embedded_run_refuses_a_name_that_is_not_utf8_and_goes_on(tmp_path: Path) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = make_settings(tmp_path)
    assert settings.broker.embedded and settings.database_url.startswith("sqlite:")
    template = tmp_path / "probe.graphml"
    template.write_text(graphml({"probe": {"command": probe_command()}}, budget_s=60))

    with Parts(tmp_path, settings) as parts:
        imported = parts.run("dag", "import", str(template), "--name", "probe")
        assert imported.returncode == 0, imported.stdout + imported.stderr
        run = parts.start("run", "run", "--watch", str(watch), "--pilots", "1")
        parts.wait_for(lambda: run.log_has("watcher: following") and run.log_has("waiting for tasks"),
                       alive=[run], what="p3s run to start")

        fd = os.open(os.fsencode(watch) + b"/np04_raw_\xff\xfe_latin\xe9.dat", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"bad name, good data")
        finally:
            os.close(fd)
        good = "np04_raw_run000300_0000.dat"
        (watch / good).write_bytes(b"good data")

        parts.wait_for(lambda: finished_names(parts.db_jobs()) >= {good}, alive=[run],
                       what="the good file's job to finish")
        parts.wait_for(lambda: any(f["decision"] == "refused" for f in parts.db_files()), alive=[run],
                       what="the bad name to be recorded refused")

        jobs = parts.jobs()
        assert [(j["state"], Path(j["file"]).name) for j in jobs] == [("finished", good)], jobs
        files = parts.files()
        assert sorted(f["decision"] for f in files) == ["accepted", "refused"], files
        (accepted,) = [f for f in files if f["decision"] == "accepted"]
        assert accepted["name"] == good, files
        (refused,) = [f for f in files if f["decision"] == "refused"]
        assert re.search(r"utf-?8", refused["reason"] or "", re.IGNORECASE), refused
        parts.assert_alive(run)
        assert run.stop() == 0, run.describe()
