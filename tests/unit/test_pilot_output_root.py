"""A pilot on another host writes outputs only where its own output_root says the shared storage is."""

from __future__ import annotations

from pathlib import Path

from p3s.pilot.runner import outside_output_root, run_payload
from p3s.states import JobState
from tests.unit.test_pilot_runner import task


def test_an_output_directory_outside_the_pilots_output_root_fails_the_job_and_makes_nothing(tmp_path: Path) -> None:
    shared, local = tmp_path / "shared", tmp_path / "dispatcher-host-default"
    outdir = local / "1" / "n"
    outcome = run_payload(task(["/bin/true"], outdir=str(outdir)), work_root=str(tmp_path / "work"),
                          log_root=tmp_path / "logs", on_start=lambda _t: None, between_slices=lambda: None,
                          kill_requested=lambda: False, output_root=str(shared))
    assert outcome.state == JobState.FAILED
    assert outcome.reason == (f"its output directory {outdir} is not under this pilot's output_root {shared}: "
                              "the dispatcher and every pilot must name the same shared storage, at the same path")
    assert not local.exists(), "nothing is written where only this host would see it"


def test_an_output_directory_under_the_pilots_output_root_runs(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    outdir = shared / "1" / "n"
    outcome = run_payload(task(["/bin/true"], outdir=str(outdir)), work_root=str(tmp_path / "work"),
                          log_root=tmp_path / "logs", on_start=lambda _t: None, between_slices=lambda: None,
                          kill_requested=lambda: False, output_root=str(shared) + "/")
    assert outcome.state == JobState.FINISHED, outcome
    assert outdir.is_dir()


def test_only_a_path_under_the_root_is_under_it() -> None:
    assert outside_output_root("/eos/p3s/outputs/4/reco", "/eos/p3s/outputs") == ""
    assert outside_output_root("/eos/p3s/outputs/../elsewhere/4", "/eos/p3s/outputs")
    assert outside_output_root("/eos/p3s/outputs-old/4/reco", "/eos/p3s/outputs")
    assert outside_output_root("/anywhere/4/reco", "") == "", "a pilot with no output_root of its own checks nothing"
