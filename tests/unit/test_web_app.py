"""The web service on SQLite, without a broker: its JSON is the CLI's, its HTML escapes, its forms need a login
and a CSRF token, bad parameters are client errors, and the overview answers the shifter's questions."""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from p3s import db
from p3s.dagengine import parse_graphml
from p3s.db import Pilot
from p3s.dispatcher import admin, intake
from p3s.dispatcher.context import Context
from p3s.dispatcher.jobs import apply_job_report
from p3s.messages import DataEvent, JobReport
from p3s.states import JobState
from p3s.web.app import create_app
from tests.stack import graphml, make_settings

EVIL = '<script>alert(1)</script><b>bold</b>&"\'.dat'
PASSWORD = "correct horse"
TOKEN = "t0ken-of-bob-0123456789"


class World:
    """A database with two templates, four files and their jobs, and a client of the web service over it."""

    def __init__(self, tmp_path: Path, schema: Path, **env: str) -> None:
        (tmp_path / "passwords").write_text(f"alice:{PASSWORD}\n")
        (tmp_path / "tokens").write_text(f"bob:{TOKEN}\n")
        self.settings = make_settings(tmp_path, P3S_WEB_PASSWORD_FILE=str(tmp_path / "passwords"),
                                      P3S_WEB_TOKEN_FILE=str(tmp_path / "tokens"), P3S_WEB_NOMINAL_PILOTS="4",
                                      P3S_SAMPLING='{"raw": 0.5}', **{"P3S_WEB_CACHE_S": "60", **env})
        # A copy of one upgraded database: running the migrations for each test would cost seconds.
        path = Path(self.settings.database_url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(schema, path)
        self.engine = db.make_engine(self.settings.database_url)
        self.ctx = Context(self.settings)
        self.tokens: dict[int, str] = {}
        self.client = TestClient(create_app(self.settings, engine=self.engine, broker_counts=False))

    def record(self, *names: str) -> None:
        now = time.time()
        events = [DataEvent(name=n, path=f"/data/{n}", stream="raw", seen_at=now, force=True) for n in names]
        with Session(self.engine) as s, s.begin():
            for task in intake.record_events(s, events, self.ctx):
                self.tokens[task.job_id] = task.token

    def report(self, job_id: int, state: JobState, **kw: Any) -> None:
        with Session(self.engine) as s, s.begin():
            for task in apply_job_report(s, JobReport(job_id, state, "pilot-1", token=self.tokens[job_id], **kw),
                                         self.ctx):
                self.tokens[task.job_id] = task.token

    def jobs(self) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            return admin.list_jobs(s, limit=1000)

    def csrf(self, path: str = "/login") -> str:
        found = re.search(r'name="csrf_token" value="([^"]+)"', self.client.get(path).text)
        assert found, f"no CSRF token on {path}"
        return found.group(1)

    def login(self, username: str = "alice", password: str = PASSWORD) -> Any:
        return self.client.post("/login", data={"username": username, "password": password,
                                                "csrf_token": self.csrf()}, follow_redirects=False)


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at the schema's head with the template ``probe`` in it."""
    path = tmp_path_factory.mktemp("web-schema") / "p3s.db"
    engine = db.make_engine(f"sqlite:///{path}")
    # The models' tables, as the migrations make them (tests of the migrations check that): faster than Alembic.
    db.Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        admin.import_template(s, parse_graphml(graphml(
            {"a": {"command": "echo {input}", "env": '{"SECRET_KEY": "hunter2"}'}, "b": {"command": "true"}},
            edges=[("a", "b")], trigger="*.dat", name="probe"), name="probe"))
    engine.dispose()
    return path


@pytest.fixture
def world(tmp_path: Path, schema: Path) -> Iterator[World]:
    w = World(tmp_path, schema)
    w.record("run1.dat", EVIL)
    a1 = next(j for j in w.jobs() if j["node"] == "a" and j["file"] == "/data/run1.dat")
    now = time.time()
    w.report(a1["id"], JobState.RUNNING, started_at=now)
    w.report(a1["id"], JobState.FAILED, ended_at=now, exit_code=3, reason="exit code 3: <i>broken</i>")
    yield w
    w.client.close()
    w.engine.dispose()


def test_api_listings_are_the_cli_objects_and_filters_narrow_them(world: World) -> None:
    client = world.client
    with Session(world.engine) as s:
        assert client.get("/api/files").json() == admin.list_files(s)
        assert client.get("/api/workflows").json() == admin.list_workflows(s)
        assert client.get("/api/jobs").json() == admin.list_jobs(s)
        assert client.get("/api/jobs", params={"state": "failed"}).json() == admin.list_jobs(s, state="failed")
        assert client.get("/api/templates?all=1").json() == admin.list_templates(s, include_deleted=True)
        assert client.get("/api/priorities").json() == admin.list_priorities(s)
    names = lambda **p: [f["name"] for f in client.get("/api/files", params=p).json()]  # noqa: E731
    assert names(name="run1") == ["run1.dat"]
    # LIKE's own wildcards in a search are plain characters.
    assert names(name="%") == [] and names(name="_") == []
    assert names(name="<script>") == [EVIL]
    assert names(decision="accepted", limit="1") == [EVIL]
    assert names(since=str(time.time() + 60)) == [] and len(names(until=str(time.time() + 60))) == 2
    jobs = client.get("/api/jobs", params={"template": "probe", "node": "a", "pilot": "pilot-1"}).json()
    assert [(j["node"], j["state"]) for j in jobs] == [("a", "failed")]
    (wf,) = [w for w in client.get("/api/workflows").json() if w["file"] == "/data/run1.dat"]
    detail = client.get(f"/api/workflows/{wf['id']}").json()
    assert detail.pop("jobs") == client.get("/api/jobs", params={"workflow": wf["id"]}).json()
    assert detail == wf


def test_bad_parameters_are_400_and_unknown_ids_404_never_500(world: World) -> None:
    client = world.client
    for path in ("/api/jobs?state=bogus", "/api/workflows?state=bogus", "/api/files?decision=maybe",
                 "/api/files?limit=-1", "/api/files?limit=0", "/api/files?limit=1001", "/api/jobs?limit=many",
                 "/api/files?since=yesterday", "/api/files?since=nan", "/api/workflows/abc", "/api/jobs/-1",
                 "/api/templates?all=perhaps", "/api/files?name=" + "x" * 600, "/jobs?workflow=x", "/workflows/1x"):
        answer = client.get(path)
        assert answer.status_code == 400, f"{path}: {answer.status_code} {answer.text[:300]}"
        if path.startswith("/api/"):
            assert answer.json()["status"] == 400 and answer.json()["error"]
        else:
            assert "<main id=\"content\">" in answer.text
    for path in ("/api/workflows/999999", "/api/jobs/999999", "/workflows/999999", "/jobs/999999",
                 "/templates/nothing", "/templates/nothing/graphml", "/workflows/999999/dag.svg"):
        assert client.get(path).status_code == 404, path
    assert client.get("/healthz").json()["refused"]["parameter"] == 15


def test_untrusted_names_are_text_everywhere(world: World) -> None:
    client = world.client
    (wf,) = [w for w in client.get("/api/workflows").json() if w["file"] == f"/data/{EVIL}"]
    job = next(j for j in world.jobs() if j["workflow_id"] == wf["id"] and j["node"] == "a")
    for path in ("/files", "/workflows", f"/workflows/{wf['id']}", "/jobs", f"/jobs/{job['id']}", "/"):
        html = client.get(path).text
        assert "<script>alert" not in html and "<b>bold" not in html, path
        if path != "/":  # the one that shows no file name
            assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in html, path
    # The failure's reason is text too.
    assert "&lt;i&gt;broken&lt;/i&gt;" in client.get("/").text


def test_the_job_page_shows_argv_env_names_and_the_log_tail_but_no_env_value(world: World) -> None:
    job = next(j for j in world.jobs() if j["node"] == "a" and j["file"] == "/data/run1.dat")
    log = world.settings.log_path / str(job["workflow_id"]) / f"{job['id']}-a.log"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"x" * 70_000 + b"\nlast line <tag>\n")
    got = world.client.get(f"/api/jobs/{job['id']}").json()
    assert {k: got[k] for k in job} == job
    assert got["argv"] == ["echo", "/data/run1.dat"] and got["env"] == ["SECRET_KEY"]
    assert got["log_tail"]["truncated"] and len(got["log_tail"]["text"]) == 64 * 1024
    assert got["log_tail"]["text"].endswith("last line <tag>\n")
    html = world.client.get(f"/jobs/{job['id']}").text
    assert "SECRET_KEY" in html and "hunter2" not in html and "hunter2" not in str(got)
    assert "last line &lt;tag&gt;" in html
    # A log path a pilot reported outside the log root is not read: it could name any file of this host.
    other = next(j for j in world.jobs() if j["node"] == "b" and j["file"] == "/data/run1.dat")
    secret = world.settings.state_path / "web-secret"
    with Session(world.engine) as s, s.begin():
        s.execute(update(db.Job).where(db.Job.id == other["id"]).values(log=str(secret), state="finished"))
    tail = world.client.get(f"/api/jobs/{other['id']}").json()["log_tail"]
    assert tail["text"] == "" and tail["path"] is None and secret.read_text().strip() not in str(tail)


def test_operator_actions_need_a_csrf_token_and_a_login(world: World, caplog: pytest.LogCaptureFixture) -> None:
    client = world.client
    form = {"template": "probe", "node": "b", "priority": "8"}
    assert client.post("/priority", data=form).status_code == 403  # no token
    assert client.post("/priority", data={**form, "csrf_token": "forged"}).status_code == 403
    assert client.post("/priority", data={**form, "csrf_token": world.csrf()}).status_code == 401  # no login
    assert world.login(password="wrong").status_code == 401
    assert client.get("/healthz").json()["refused"] == {"csrf": 2, "login": 2}
    answer = world.login()
    assert answer.status_code == 303
    # A login makes a new session: the token of the page before it is no longer good.
    assert client.post("/priority", data={**form, "csrf_token": "forged"}).status_code == 403
    page = client.get("/templates").text
    assert '<span id="operator">alice</span>' in page and 'id="import-form"' in page
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    with caplog.at_level(logging.INFO, logger="p3s.web"):
        answer = client.post("/priority", data={**form, "csrf_token": token}, follow_redirects=False)
        assert answer.status_code == 303
        bad = client.post("/priority", data={**form, "priority": "12", "csrf_token": token})
        assert bad.status_code == 400 and "0 to 9" in bad.text
    prio = {(p["template"], p["node"]): p["priority"] for p in client.get("/api/priorities").json()}
    assert prio[("probe", "b")] == 8
    assert "operator alice set priority of probe/b to 8" in caplog.text
    # A bearer token needs no cookie, so no CSRF token either.
    bearer = TestClient(client.app)
    answer = bearer.post("/priority", data={**form, "priority": "2"}, follow_redirects=False,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 303
    assert bearer.post("/priority", data=form, headers={"Authorization": "Bearer nope"}).status_code == 403


def test_an_operator_uploads_deletes_and_cancels_as_the_cli_does(world: World) -> None:
    client = world.client
    world.login()
    token = world.csrf("/templates")
    upload = graphml({"only": {"command": "true"}}, trigger="up*.raw", name="uploaded")
    # The graph names no template: the file's name does, unless the form gives one.
    answer = client.post("/templates/import", data={"csrf_token": token},
                         files={"file": ("uploaded.graphml", upload.encode(), "application/xml")},
                         follow_redirects=False)
    assert answer.status_code == 303
    assert "template uploaded version 1" in client.get("/templates").text
    answer = client.post("/templates/import", data={"csrf_token": token, "name": "uploaded"},
                         files={"file": ("other.graphml", upload.encode(), "application/xml")})
    assert "template uploaded version 1: unchanged, no new version" in answer.text
    bad = client.post("/templates/import", data={"csrf_token": token},
                      files={"file": ("x.graphml", b"<graphml><graph><node id='a'/>", "application/xml")})
    assert bad.status_code == 400
    with Session(world.engine) as s:
        assert [t["name"] for t in admin.list_templates(s)] == ["probe", "uploaded"]
    assert client.post("/templates/uploaded/delete", data={"csrf_token": token},
                       follow_redirects=False).status_code == 303
    assert client.post("/templates/uploaded/delete", data={"csrf_token": token}).status_code == 404
    (wf,) = [w for w in client.get("/api/workflows").json() if w["file"] == f"/data/{EVIL}"]
    assert client.post(f"/workflows/{wf['id']}/cancel", data={"csrf_token": token},
                       follow_redirects=False).status_code == 303
    jobs = client.get(f"/api/workflows/{wf['id']}").json()
    assert jobs["state"] == "incomplete"
    assert {j["state"] for j in jobs["jobs"]} == {"dropped"}


def test_viewers_need_a_login_when_anonymous_view_is_off(tmp_path: Path, schema: Path) -> None:
    w = World(tmp_path, schema, P3S_WEB_ANONYMOUS_VIEW="false")
    try:
        answer = w.client.get("/files", follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
        assert w.client.get("/api/files").status_code == 401
        assert w.client.get("/healthz").status_code == 200 and w.client.get("/openapi.json").status_code == 200
        w.login()
        assert w.client.get("/files").status_code == 200 and w.client.get("/api/files").json() == []
        assert TestClient(w.client.app).get("/api/files", headers={"Authorization": f"Bearer {TOKEN}"}).json() == []
    finally:
        w.engine.dispose()


def test_the_overview_counts_arrivals_checks_pilots_and_lists_failures(world: World) -> None:
    now = time.time()
    with Session(world.engine) as s, s.begin():
        for i, state in enumerate(["idle", "busy", "lost", "stopped"]):
            s.add(Pilot(id=f"p{i}", host="h", pid=i, queues="default", state=state, started_at=now,
                        last_seen=now, jobs_done=0))
        # A file received two hours ago counts in the last 24 h only.
        s.execute(update(db.FileRecord).where(db.FileRecord.name == "run1.dat").values(received_at=now - 7200))
    data = world.client.get("/api/overview").json()
    assert data["arrivals"]["1m"]["accepted"] == 1 and data["arrivals"]["24h"]["accepted"] == 2
    assert data["arrivals"]["1h"]["shed"] == 0
    checks = {c["check"]: (c["value"], c["verdict"]) for c in data["pilots_check"]}
    assert checks == {"alive": (2, "WARN"), "busy": (1, "OK"), "lost": (1, "WARN")}
    assert [(f["state"], f["reason"]) for f in data["failures"]] == [("failed", "exit code 3: <i>broken</i>")]
    assert {h["hop"] for h in data["hops"]} >= {"seen_to_started", "seen_to_complete"}
    html = world.client.get("/").text
    assert re.search(r'data-window="24h" data-decision="accepted">2<', html)
    assert re.search(r'data-check="alive">.*?class="verdict warn">WARN<', html, re.S)
    assert '<svg id="latency-plot"' in html and 'data-refresh="/?live=1"' in html
    live = world.client.get("/?live=1").text
    assert live.lstrip().startswith('<p class="stamp">') and "<nav>" not in live
    sampling = world.client.get("/api/sampling").json()
    assert sampling["streams"] == [{"stream": "raw", "configured": 0.5, "accepted": 1, "sampled_out": 0,
                                    "files": 1, "observed": 1.0}]


def test_the_overview_is_computed_once_per_cache_period(world: World) -> None:
    web = world.client.app.state.web
    first = web.overview_cache.get()
    world.record("run2.dat")
    assert world.client.get("/api/overview").json() == first  # within cache_s: not computed again
    assert web.overview_cache.get() is first
    web.overview_cache._at -= 60
    assert web.overview_cache.get()["arrivals"]["1m"]["accepted"] == first["arrivals"]["1m"]["accepted"] + 1


def test_openapi_describes_every_api_route(world: World) -> None:
    spec = world.client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    routes = {r.path for r in world.client.app.routes if getattr(r, "path", "").startswith("/api/")}
    assert routes == set(spec["paths"])
    for path, item in spec["paths"].items():
        assert {"200", "400"} <= set(item["get"]["responses"]), path


def test_p3s_web_refuses_a_bad_bind_and_an_unready_database(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from p3s.cli import EXIT_UNAVAILABLE, EXIT_USAGE, main

    monkeypatch.setenv("P3S_STATE_DIR", str(tmp_path / "state"))
    assert main(["web", "--bind", "localhost"]) == EXIT_USAGE
    assert "--bind: expected HOST:PORT" in capsys.readouterr().err
    monkeypatch.setenv("P3S_WEB_BIND", "127.0.0.1:99999")
    assert main(["web"]) == EXIT_USAGE
    assert "web.bind" in capsys.readouterr().err
    monkeypatch.delenv("P3S_WEB_BIND")
    assert main(["web", "--bind", "127.0.0.1:8999"]) == EXIT_UNAVAILABLE  # no schema yet: p3s db upgrade
    assert "p3s db upgrade" in capsys.readouterr().err


def test_svg_pictures_are_well_formed_and_carry_names_only_as_text() -> None:
    import xml.etree.ElementTree as ET

    from p3s.web import svg

    evil = 'x"><script>alert(1)</script>&'
    picture = svg.dag(["a", evil, "c"], [("a", evil), ("a", "c"), (evil, "c")], {"a": "finished", evil: "running"},
                      links={"a": "/jobs/1"})
    root = ET.fromstring(str(picture))  # well-formed XML: nothing a name holds closed an element
    ns = {"s": "http://www.w3.org/2000/svg"}
    nodes = root.findall(".//s:g[@class='node']", ns)
    assert [(g.get("data-node"), g.get("data-state")) for g in nodes] == [("a", "finished"), (evil, "running"),
                                                                          ("c", "")]
    assert root.findall(".//s:script", ns) == []
    # Layered: a above the other two, c below the node it also depends on.
    ys = {g.get("data-node"): float(g.find("s:rect", ns).get("y")) for g in nodes}  # type: ignore[union-attr]
    assert ys["a"] < ys[evil] < ys["c"]
    plot = ET.fromstring(str(svg.latency_plot({"from": 0.0, "to": 7200.0, "seen_to_started": [[600.0, 2.0]],
                                               "seen_to_complete": [[600.0, 3.5], [4200.0, 1.0]]})))
    assert plot.get("id") == "latency-plot"
    assert {p.get("data-series") for p in plot.findall(".//s:polyline", ns)} == {"seen_to_started",
                                                                                 "seen_to_complete"}


def test_the_overview_answers_and_says_so_when_the_broker_does_not(tmp_path: Path, schema: Path) -> None:
    w = World(tmp_path, schema, P3S_BROKER_URL="amqp://guest:guest@127.0.0.1:9/")  # the discard port: refused
    try:
        client = TestClient(create_app(w.settings, engine=w.engine))
        answer = client.get("/")
        assert answer.status_code == 200
        assert re.search(r'id="queues-note">broker unreachable: [^<]*127\.0\.0\.1:9', answer.text)
        assert "guest:guest" not in answer.text  # the password masked
        data = client.get("/api/overview").json()
        assert data["broker_unreachable"] and all(q["depth"] is None for q in data["queues"])
        # Computed again within the retry period, the overview does not wait for the broker but says why.
        web = client.app.state.web  # type: ignore[attr-defined]
        web.overview_cache._at -= 60
        again = web.overview_cache.get()
        assert again["broker_unreachable"] and again["status"]["broker_unreachable"]
        note = again["queues_note"]
        assert note.startswith("broker unreachable: ") and note.endswith("(asked again within 15s)")
    finally:
        w.engine.dispose()


def test_files_in_a_time_window_are_listed_newest_received_first(world: World) -> None:
    from p3s.db import FileRecord

    world.record("early.dat", "late.dat")
    with Session(world.engine) as s, s.begin():
        # Two dispatchers may record files out of the order they were received in.
        s.execute(update(FileRecord).where(FileRecord.name == "late.dat").values(received_at=1000.0))
        s.execute(update(FileRecord).where(FileRecord.name == "early.dat").values(received_at=2000.0))
    answer = world.client.get("/api/files?since=500&until=5000").json()
    assert [f["name"] for f in answer] == ["early.dat", "late.dat"]
    assert [f["name"] for f in world.client.get("/api/files?since=1500&until=5000").json()] == ["early.dat"]
