"""The Results pages on SQLite, without a broker: JSON twins are ``p3s results --json``, pages show the newest
plot of each category with its age and run, a run brings up its own results, the history has a point per
result, hostile manifest strings are text, and no file outside a job's output directory is served."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from p3s import db
from p3s.db import Alarm, ResultFile, ResultMetric, ResultRecord
from p3s.results import query
from p3s.web.app import create_app
from tests.stack import make_settings

EVIL = '<script>alert(1)</script><b>bold</b>&"\''
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'


class World:
    """Results of template ``dqm`` in runs 101 and 102 (and one hostile result), files on disk, and a client."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.tmp = tmp_path
        self.settings = make_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'p3s.db'}", **env)
        self.engine = db.make_engine(self.settings.database_url)
        db.Base.metadata.create_all(self.engine)
        self.secret = tmp_path / "secret.txt"
        self.secret.write_text("the password of the experiment\n")
        self.now = time.time()
        self.ids: dict[str, int] = {}
        self.result(101, 1, mean=100, seen=self.now - 3600, plot="old")
        self.result(101, 2, mean=110, seen=self.now - 3000, plot="older")
        self.result(102, 1, mean=180, seen=self.now - 60, plot="new")
        with Session(self.engine) as s, s.begin():
            s.add(Alarm(template="dqm", metric="mean_adc", raised=True, value=180, lo=50, hi=150,
                        result_id=self.ids["new"], seen_at=self.now - 60, raised_at=self.now - 50))
        self.client = TestClient(create_app(self.settings, engine=self.engine, broker_counts=False))

    def result(self, run: int | None, subrun: int | None, mean: float, seen: float, plot: str,
               template: str = "dqm", files: list[tuple[str, str, str]] | None = None, **extra: Any) -> int:
        """A result whose output directory holds ``{plot}.png``; ``files`` adds (kind, path, caption) rows."""
        outdir = self.tmp / "out" / plot
        outdir.mkdir(parents=True)
        (outdir / f"{plot}.png").write_bytes(PNG)
        with Session(self.engine) as s, s.begin():
            r = ResultRecord(job_id=len(self.ids) + 1, workflow_id=len(self.ids) + 1, template=template, node="adc",
                             file_name=f"np04_raw_run{run}_{subrun}.hdf5", stream="raw", run=run, subrun=subrun,
                             seen_at=seen, recorded_at=seen + 5, age_s=5.0, budget_s=300.0, on_time=True,
                             outdir=str(outdir), labels=extra.pop("labels", {"input": "x"}),
                             warnings=extra.pop("warnings", ""))
            s.add(r)
            s.flush()
            s.add(ResultMetric(result_id=r.id, template=template, name="mean_adc", value=mean, unit="ADC", lo=50,
                               hi=150, in_range=50 <= mean <= 150))
            rows = [("plot", f"{plot}.png", f"ADC of {plot}", "adc"), *((k, p, c, "extra") for k, p, c in files or [])]
            s.add_all(ResultFile(result_id=r.id, template=template, kind=kind, path=path, category=cat,
                                 caption=caption, size=1, sha256="") for kind, path, caption, cat in rows)
            self.ids[plot] = r.id
            return r.id

    def file_id(self, path: str) -> int:
        with Session(self.engine) as s:
            return s.query(ResultFile.id).filter(ResultFile.path == path).one()[0]

    def q(self, fn: Any, *args: Any, **kw: Any) -> Any:
        with Session(self.engine) as s:
            return fn(s, *args, **kw)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.client.close()
    w.engine.dispose()


def points(html: str) -> list[tuple[str, str, str]]:
    """(run, subrun, value) of each point of the history plots in ``html``."""
    return re.findall(r'<circle class="point[^"]*"[^>]*data-run="([^"]*)" data-subrun="([^"]*)" data-value="([^"]*)"',
                      html)


def test_api_twins_are_the_cli_objects(world: World) -> None:
    get = lambda path, **p: world.client.get(path, params=p).json()  # noqa: E731
    assert get("/api/results") == world.q(query.list_results)
    assert get("/api/results", template="dqm", run="101") == world.q(query.list_results, template="dqm", run=101)
    assert [r["subrun"] for r in get("/api/results", run="101")] == [2, 1]
    assert get("/api/results", template="nothing") == []
    assert get("/api/alarms") == world.q(query.list_alarms) and len(get("/api/alarms")) == 1
    detail = get("/api/results/dqm")
    assert detail["newest"] == world.q(query.newest_by_category, "dqm")
    assert [f["path"] for f in detail["newest"]] == ["new.png"]
    assert [f["path"] for f in get("/api/results/dqm", run="101")["newest"]] == ["older.png"]
    assert get("/api/results/dqm/metrics/mean_adc") == world.q(query.metric_history, "dqm", "mean_adc")
    compare = get("/api/results/dqm/compare", a="101", b="102")
    assert (compare["a"]["metrics"]["mean_adc"]["value"], compare["b"]["metrics"]["mean_adc"]["value"]) == (110, 180)


def test_pages_show_newest_plot_with_age_a_run_on_request_history_and_compare(world: World) -> None:
    client = world.client
    index = client.get("/results")
    assert index.status_code == 200 and 'href="/results/dqm"' in index.text and 'id="alarms"' in index.text
    page = client.get("/results/dqm").text
    newest = re.search(r'<figure class="result-entry"[^>]*data-run="102" data-subrun="1" data-file-id="(\d+)"', page)
    assert newest and f'<img src="/results/files/{newest.group(1)}"' in page
    assert 'class="age">5.00s<' in page and "on time" in page
    assert 'data-metric="mean_adc"' in page and "ALARM" in page
    assert sorted(points(page)) == [("101", "1", "100"), ("101", "2", "110"), ("102", "1", "180")]
    assert re.search(r'<rect class="range"[^>]*data-lo="50" data-hi="150"', page)
    older = client.get("/results/dqm", params={"run": "101"}).text
    assert f'/results/files/{world.file_id("older.png")}"' in older and "new.png" not in older
    assert '<option value="101" selected>' in older
    svg = client.get("/results/dqm/metrics/mean_adc.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and len(points(svg.text)) == 3
    compare = client.get("/results/dqm/compare", params={"a": "101", "b": "102"}).text
    assert re.search(r'data-run="101">110 ADC</td>', compare) and re.search(r'data-run="102">180 ADC ALARM</td>',
                                                                           compare)
    overview = client.get("/").text
    assert re.search(r'<table id="alarms">.*data-metric="mean_adc"', overview, re.S)


def test_files_are_served_with_a_restrictive_type_only_from_inside_the_output_directory(world: World) -> None:
    outdir = world.tmp / "out" / "hostile"
    world.result(103, 1, mean=100, seen=world.now, plot="hostile", files=[
        ("plot", "drawing.svg", "svg"), ("file", "page.html", "html"), ("file", "../../secret.txt", "up"),
        ("file", str(world.secret), "absolute"), ("file", "link.txt", "symlink"), ("file", "gone.png", "gone")])
    (outdir / "drawing.svg").write_bytes(SVG)
    (outdir / "page.html").write_text("<script>alert(1)</script>")
    os.symlink(world.secret, outdir / "link.txt")
    client = world.client
    png = client.get(f"/results/files/{world.file_id('hostile.png')}")
    assert png.status_code == 200 and png.content == PNG and png.headers["content-type"] == "image/png"
    assert png.headers["x-content-type-options"] == "nosniff"
    svg = client.get(f"/results/files/{world.file_id('drawing.svg')}")
    assert svg.headers["content-type"] == "image/svg+xml" and "sandbox" in svg.headers["content-security-policy"]
    html = client.get(f"/results/files/{world.file_id('page.html')}")
    assert html.headers["content-type"] == "application/octet-stream"
    assert html.headers["content-disposition"] == "attachment"
    for path in ("../../secret.txt", str(world.secret), "link.txt", "gone.png"):
        response = client.get(f"/results/files/{world.file_id(path)}")
        assert response.status_code == 404 and "password" not in response.text, path
    for url in ("/results/files/999999", "/results/files/..%2F..%2Fsecret.txt", "/results/files/-1",
                f"/results/files/{2**64}"):
        assert client.get(url).status_code == 404, url
    assert client.get("/healthz").json()["refused"].get("result_file", 0) >= 5


def test_hostile_manifest_strings_are_text(world: World) -> None:
    world.result(104, 1, mean=100, seen=world.now, plot="evil", template="evil", labels={"note": EVIL},
                 warnings=f"plots[0] refused: {EVIL}", files=[("plot", "caption.png", EVIL)])
    (world.tmp / "out" / "evil" / "caption.png").write_bytes(PNG)
    page = world.client.get("/results/evil")
    assert page.status_code == 200
    assert "<script>" not in page.text and "<b>bold" not in page.text
    assert page.text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # label, warning, caption
    # The alt text of an <img> is an attribute: its quotes are escaped too.
    assert 'alt="&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;&amp;&#34;&#39;"' in page.text


def test_bad_parameters_are_client_errors_and_unknown_names_are_not_found(world: World) -> None:
    client = world.client
    assert client.get("/results/dqm", params={"run": "x"}).status_code == 400
    assert client.get("/api/results", params={"run": "-3"}).status_code == 400
    assert client.get("/results/dqm/compare", params={"a": "101"}).status_code == 400
    assert client.get("/results/" + "t" * 129).status_code == 400
    missing = client.get("/results/%3Cscript%3Enothing")
    assert missing.status_code == 404 and "<script>" not in missing.text
    assert client.get("/api/results/nothing").json()["status"] == 404
    assert client.get("/results/dqm/metrics/none.svg").status_code == 404
    assert client.get("/results/dqm/compare", params={"a": "1", "b": "2"}).status_code == 404
    assert client.get("/healthz").json()["refused"]["parameter"] == 4


def test_viewing_needs_a_login_where_configured(tmp_path: Path) -> None:
    (tmp_path / "passwords").write_text("alice:pw\n")
    w = World(tmp_path, P3S_WEB_ANONYMOUS_VIEW="false", P3S_WEB_PASSWORD_FILE=str(tmp_path / "passwords"))
    try:
        for url in ("/results", "/results/dqm", f"/results/files/{w.file_id('new.png')}"):
            assert w.client.get(url, follow_redirects=False).status_code == 303, url
        assert w.client.get("/api/results").status_code == 401
    finally:
        w.client.close()
        w.engine.dispose()
