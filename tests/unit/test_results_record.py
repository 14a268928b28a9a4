"""Recording results on SQLite: run and subrun, freshness, alarms raised and cleared, listings, retention."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from p3s import db
from p3s.config import Settings
from p3s.db import Job, ResultRecord
from p3s.dispatcher.context import Context
from p3s.dispatcher.purge import purge
from p3s.results import query
from p3s.results.manifest import collect, parse_manifest
from p3s.results.record import export_alarms, record_result
from tests.stack import make_settings
from tests.unit.test_purge_status import template, workflow

DAY = 86400.0
NOW = time.time()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    ranges = {"dqm": {"mean_adc": [50, 150]}}
    return make_settings(tmp_path, P3S_RESULTS_RANGES=json.dumps(ranges))


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    # The models' tables without Alembic (a second per test): tests/unit/test_migration_indexes.py
    # shows the migrations make exactly these.
    engine = db.make_engine(settings.database_url)
    db.Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def gauge(template_name: str, metric: str) -> float | None:
    return REGISTRY.get_sample_value("p3s_dqm_alarm", {"template": template_name, "metric": metric})


class Runs:
    """Files of the template "dqm" whose single job finished, with results recorded as a dispatcher would."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        with Session(engine) as s, s.begin():
            self.template_id = template(s, "dqm", NOW - 100 * DAY)

    def result(self, name: str, seen_at: float, mean_adc: float, occupancy: float = 0.9, delay: float = 5.0,
               plots: bool = True) -> tuple[int, int]:
        """A finished job for file ``name`` with these metrics; its (job id, result id)."""
        with Session(self.engine) as s, s.begin():
            wf_id = workflow(s, self.template_id, name, seen_at, jobs=("finished",), tpl="dqm")
            job_id = s.scalar(select(Job.id).where(Job.workflow_id == wf_id))
        assert job_id is not None
        outdir = self.settings.output_path / str(wf_id) / "n0"
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "adc.png").write_bytes(b"png of " + name.encode())
        manifest = parse_manifest(json.dumps({
            "metrics": {"mean_adc": {"value": mean_adc, "unit": "ADC", "range": [10, 200]},
                        "occupancy": {"value": occupancy, "range": [0.5, 1]}},
            "plots": [{"path": "adc.png", "category": "adc"}] if plots else [],
        }))
        ctx = Context(self.settings, now=seen_at + delay)
        with Session(self.engine) as s, s.begin():
            record = record_result(s, job_id, collect(outdir, manifest), ctx)
            assert record is not None
            result_id = record.id
        ctx.committed()
        return job_id, result_id

    def listing(self, **kwargs: Any) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            return query.list_results(s, **kwargs)

    def alarms(self) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            return query.list_alarms(s, template="dqm")


@pytest.fixture
def runs(settings: Settings, engine: Engine) -> Runs:
    return Runs(settings, engine)


def test_results_carry_run_subrun_age_and_on_time(runs: Runs) -> None:
    runs.result("np04_raw_run000010_0001.hdf5", NOW - 600, 100, delay=20)
    runs.result("np04_raw_run000011_0002.hdf5", NOW - 500, 100, delay=90)  # budget 60 s: late
    newest, oldest = runs.listing(template="dqm")
    assert (oldest["run"], oldest["subrun"], oldest["age_s"], oldest["on_time"]) == (10, 1, 20.0, True)
    assert (newest["run"], newest["subrun"], newest["age_s"], newest["on_time"]) == (11, 2, 90.0, False)
    assert [r["run"] for r in runs.listing(run=10)] == [10]
    assert {m["name"]: (m["lo"], m["hi"]) for m in oldest["metrics"]} == {
        "mean_adc": (50.0, 150.0), "occupancy": (0.5, 1.0)}, "the config's range wins over the manifest's"
    assert oldest["files"][0]["path"] == "adc.png" and len(oldest["files"][0]["sha256"]) == 64


def test_an_alarm_is_raised_by_a_value_out_of_range_and_cleared_by_a_later_one_in_range(runs: Runs,
                                                                                     engine: Engine) -> None:
    runs.result("run20_1.hdf5", NOW - 400, 100)
    assert runs.alarms() == [] and gauge("dqm", "mean_adc") in (None, 0.0)
    # In the manifest's range [10, 200], out of the config's [50, 150].
    _job, raising = runs.result("run20_2.hdf5", NOW - 300, 180)
    (alarm,) = runs.alarms()
    assert (alarm["metric"], alarm["value"], alarm["lo"], alarm["hi"], alarm["result_id"]) == (
        "mean_adc", 180.0, 50.0, 150.0, raising)
    assert gauge("dqm", "mean_adc") == 1.0
    # The result of an older file, recorded late, decides nothing.
    runs.result("run20_0.hdf5", NOW - 350, 100)
    assert len(runs.alarms()) == 1 and gauge("dqm", "mean_adc") == 1.0
    runs.result("run21_1.hdf5", NOW - 200, 120)
    assert runs.alarms() == [] and gauge("dqm", "mean_adc") == 0.0
    with Session(engine) as s:
        (cleared,) = query.list_alarms(s, template="dqm", raised_only=False)
    assert cleared["cleared_at"] is not None and cleared["raised_at"] is not None
    # What a restarted dispatcher exports comes from the table.
    from p3s import metrics

    metrics.DQM_ALARM.labels("dqm", "mean_adc").set(1)
    with Session(engine) as s:
        export_alarms(s)
    assert gauge("dqm", "mean_adc") == 0.0


def refused(what: str) -> float:
    return REGISTRY.get_sample_value("p3s_results_refused_total", {"template": "dqm", "what": what}) or 0.0


def test_a_second_report_records_nothing_and_refusals_are_warnings_on_the_job(runs: Runs, settings: Settings,
                                                                             engine: Engine) -> None:
    job_id, _ = runs.result("run30_1.hdf5", NOW - 100, 100)
    with Session(engine) as s, s.begin():
        others = [s.scalar(select(Job.id).where(Job.workflow_id == workflow(s, runs.template_id, name, NOW - 50,
                                                                            jobs=("finished",), tpl="dqm")))
                  for name in ("run31_1.hdf5", "run32_1.hdf5")]
    before = refused("entry"), refused("manifest")
    ctx = Context(settings, now=NOW)
    with Session(engine) as s, s.begin():
        some = {"accepted": True, "metrics": [], "files": [], "labels": {},
                "warnings": ["plot '../x' refused: a path with '..'", "file 'big': no checksum, the budget ran out"]}
        assert record_result(s, job_id, some, ctx) is None, "its job has a result already"
        assert record_result(s, others[0], some, ctx) is not None
        assert record_result(s, others[1], {"accepted": False, "warnings": ["manifest refused: not JSON"]}, ctx) is None
    ctx.committed()
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(ResultRecord)) == 2
        reasons = [s.get(Job, i).reason for i in (job_id, *others)]
    assert reasons[0] == "", "a second report changes nothing"
    assert "results: plot '../x' refused: a path with '..'; file 'big': no checksum" in reasons[1]
    assert "results: manifest refused: not JSON" in reasons[2]
    assert (refused("entry"), refused("manifest")) == (before[0] + 1, before[1] + 1)


def test_newest_of_each_category_history_and_files_on_disk(runs: Runs, engine: Engine, settings: Settings) -> None:
    runs.result("run40_1.hdf5", NOW - 300, 60)
    _job, newest = runs.result("run41_1.hdf5", NOW - 200, 70)
    runs.result("run42_1.hdf5", NOW - 100, 80, plots=False)
    with Session(engine) as s:
        (adc,) = query.newest_by_category(s, "dqm")
        assert (adc["category"], adc["result_id"], adc["run"]) == ("adc", newest, 41)
        (older,) = query.newest_by_category(s, "dqm", run=40)
        assert older["run"] == 40
        history = query.metric_history(s, "dqm", "mean_adc")
        assert [(p["run"], p["value"]) for p in history] == [(40, 60.0), (41, 70.0), (42, 80.0)]
        assert [r["run"] for r in query.runs(s, "dqm")] == [42, 41, 40]
        assert query.metric_names(s, "dqm") == ["mean_adc", "occupancy"]
        path = query.file_on_disk(s, adc["id"])
        assert path is not None and path.read_bytes() == b"png of run41_1.hdf5"
        # Swapped for a symlink out of the output directory since: nothing is served.
        path.unlink()
        os.symlink("/etc/passwd", path)
        assert query.file_on_disk(s, adc["id"]) is None


def test_retention_keeps_the_newest_of_each_category_and_files_stay_unless_allowed(
        runs: Runs, engine: Engine, settings: Settings) -> None:
    old = NOW - 40 * DAY
    runs.result("run50_1.hdf5", old, 100)
    runs.result("run51_1.hdf5", old + 10, 100)  # the newest "adc" plot: kept however old
    runs.result("run52_1.hdf5", old + 20, 100, plots=False)  # numbers only: kept only as the newest of all
    runs.result("run53_1.hdf5", NOW - DAY, 100, plots=False)
    png = {r["run"]: Path(r["outdir"]) / "adc.png" for r in runs.listing() if r["files"]}
    counts = purge(engine, NOW - 30 * DAY, output_root=settings.output_path, results_cutoff=NOW - 30 * DAY)
    assert {r["run"] for r in runs.listing()} == {51, 53}
    assert (counts.workflows, counts.results, counts.result_files) == (3, 2, 0)
    # delete_files = false: the records went with their workflows, every listed file stays.
    assert png[50].exists() and png[51].exists()


def test_retention_deletes_the_files_of_old_results_where_allowed(runs: Runs, engine: Engine,
                                                                 settings: Settings) -> None:
    old = NOW - 40 * DAY
    runs.result("run60_1.hdf5", old, 100)
    runs.result("run61_1.hdf5", old + 10, 100)
    png = {r["run"]: Path(r["outdir"]) / "adc.png" for r in runs.listing()}
    (png[60].parent / "not-listed.txt").write_text("x")
    # Records kept for 60 days, results for 30: the result goes before its workflow, and takes its files.
    counts = purge(engine, NOW - 60 * DAY, output_root=settings.output_path, results_cutoff=NOW - 30 * DAY,
                   delete_result_files=True)
    assert {r["run"] for r in runs.listing()} == {61}
    assert (counts.workflows, counts.results, counts.result_files) == (0, 1, 1)
    assert not png[60].exists() and png[61].exists()
    assert (png[60].parent / "not-listed.txt").exists(), "only the files a result lists"


def test_p3s_results_lists_results_and_alarms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from p3s import cli

    monkeypatch.setenv("P3S_STATE_DIR", str(tmp_path / "cli-state"))
    monkeypatch.setenv("P3S_RESULTS_RANGES", json.dumps({"dqm": {"mean_adc": [50, 150]}}))
    settings = make_settings(tmp_path, P3S_STATE_DIR=str(tmp_path / "cli-state"),
                             P3S_RESULTS_RANGES=json.dumps({"dqm": {"mean_adc": [50, 150]}}))
    engine = db.make_engine(settings.database_url)
    db.Base.metadata.create_all(engine)
    with engine.begin() as conn:  # the command checks the schema's revision: the models' tables are the head's
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(text("INSERT INTO alembic_version VALUES (:head)"), {"head": db.head_revision()})
    try:
        runs = Runs(settings, engine)
        runs.result("run70_1.hdf5", NOW - 200, 100)
        _job, raising = runs.result("run71_2.hdf5", NOW - 100, 190, occupancy=0.95)
    finally:
        engine.dispose()
    assert cli.main(["results", "--template", "dqm", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["subrun"]) for r in listed] == [(71, 2), (70, 1)]
    assert cli.main(["results", "--run", "70"]) == 0
    table = capsys.readouterr().out
    assert "mean_adc=100 ADC" in table and "run71" not in table
    assert "ALARM dqm mean_adc = 190, expected [50, 150] (result %d)" % raising in table
    assert cli.main(["results", "--alarms", "--json"]) == 0
    assert [(a["metric"], a["result_id"]) for a in json.loads(capsys.readouterr().out)] == [("mean_adc", raising)]
