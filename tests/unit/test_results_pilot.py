"""On the embedded default: a pilot sends what a finished payload's manifest says, and a bad manifest is a warning."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p3s.results import query
from tests.stack import Stack, graphml, make_settings, terminal_jobs, wait_for

# Writes a manifest naming one plot inside its output directory and one outside, or, for a file
# named bad*, a manifest that is not JSON.
PAYLOAD = (
    "import json, pathlib, sys; name, out = sys.argv[1], pathlib.Path(sys.argv[2]); "
    "(out / 'ok.png').write_bytes(b'png'); "
    "m = {'metrics': {'noise': {'value': 7, 'range': [0, 5]}}, "
    "'plots': [{'path': 'ok.png', 'category': 'noise', 'caption': '<script>x</script>'}, "
    "{'path': '../../etc/passwd', 'category': 'noise'}]}; "
    "(out / 'p3s-results.json').write_text('{not json' if name.startswith('bad') else json.dumps(m))"
)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, Path]]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    s = Stack(make_settings(tmp_path), watch=watch, pilots=1)
    s.import_template(graphml({"dqm": {"command": f"{sys.executable} -c \"{PAYLOAD}\" {{input_name}} {{outdir}}"}},
                              name="dqm"), name="dqm")
    s.start()
    try:
        yield s, watch
    finally:
        s.stop()


def test_a_finished_job_brings_its_results_and_a_bad_manifest_only_warns(stack: tuple[Stack, Path]) -> None:
    s, watch = stack
    (watch / "run5_1.hdf5").write_bytes(b"x")
    (watch / "bad_run6_1.hdf5").write_bytes(b"x")
    jobs = wait_for(lambda: terminal_jobs(s, 2), timeout=30, what="both jobs to end")
    assert [j["state"] for j in jobs] == ["finished", "finished"], jobs
    by_file = {Path(j["file"]).name: j for j in jobs}
    assert "results: plot '../../etc/passwd' refused: a path with '..'" in by_file["run5_1.hdf5"]["reason"]
    assert "manifest p3s-results.json refused: manifest is not JSON" in by_file["bad_run6_1.hdf5"]["reason"]
    (result,) = s.query(query.list_results)
    assert (result["file"], result["run"], result["subrun"]) == ("run5_1.hdf5", 5, 1)
    assert [(f["path"], f["caption"]) for f in result["files"]] == [("ok.png", "<script>x</script>")]
    assert result["metrics"][0]["alarm"] and result["warnings"]
    # Recorded in the transaction that recorded the result.
    assert [(a["template"], a["metric"], a["value"]) for a in s.query(query.list_alarms)] == [("dqm", "noise", 7.0)]
