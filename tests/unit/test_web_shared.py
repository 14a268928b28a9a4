"""Answers shared between the clients asking the same thing: for ``web.cache_s``, per path, query and
operator; each client keeps its own CSRF token and flash message, and an operator's action starts afresh."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from p3s.web.app import _environment
from tests.stack import graphml
from tests.unit.test_web_app import PASSWORD, World, schema  # noqa: F401  (the fixture)


@pytest.fixture
def world(tmp_path: Path, schema: Path) -> Iterator[World]:  # noqa: F811
    w = World(tmp_path, schema)  # web.cache_s = 60: nothing expires during a test
    w.record("run1.dat")
    yield w
    w.client.close()
    w.engine.dispose()


def names(answer: list[dict[str, str]]) -> list[str]:
    return sorted(Path(f["path"]).name for f in answer)


def test_a_page_is_computed_once_per_cache_period_for_every_client_asking_it(world: World) -> None:
    first = world.client.get("/api/files").json()
    html = world.client.get("/files").text
    world.record("run2.dat")
    other = TestClient(world.client.app)
    # The same path and query, by this client or another: the answer computed before.
    assert world.client.get("/api/files").json() == first
    assert other.get("/api/files").json() == first
    assert other.get("/files").text == html and "run2.dat" not in html
    # Another query is another answer, computed now.
    assert names(other.get("/api/files?limit=50").json()) == ["run1.dat", "run2.dat"]
    assert "run2.dat" in other.get("/files?limit=50").text


def test_with_cache_s_zero_every_request_is_computed(tmp_path: Path, schema: Path) -> None:  # noqa: F811
    w = World(tmp_path, schema, P3S_WEB_CACHE_S="0")
    try:
        w.record("run1.dat")
        assert names(w.client.get("/api/files").json()) == ["run1.dat"]
        w.record("run2.dat")
        assert names(w.client.get("/api/files").json()) == ["run1.dat", "run2.dat"]
        w.record("run3.dat")
        assert "run3.dat" in w.client.get("/files").text
    finally:
        w.client.close()
        w.engine.dispose()


def test_an_operators_action_is_seen_at_once_by_every_client(world: World) -> None:
    viewer = TestClient(world.client.app)
    assert [t["name"] for t in viewer.get("/api/templates").json()] == ["probe"]
    before = viewer.get("/templates").text
    world.login()
    upload = graphml({"only": {"command": "true"}}, trigger="up*.raw", name="uploaded")
    answer = world.client.post("/templates/import", data={"csrf_token": world.csrf("/templates")},
                               files={"file": ("uploaded.graphml", upload.encode(), "application/xml")},
                               follow_redirects=False)
    assert answer.status_code == 303
    assert [t["name"] for t in viewer.get("/api/templates").json()] == ["probe", "uploaded"]
    assert viewer.get("/templates").text != before


def test_each_session_keeps_its_own_csrf_token_and_flash_in_a_shared_page(world: World) -> None:
    first = world.client
    second = TestClient(world.client.app)
    for client in (first, second):
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore
        assert client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token},
                           follow_redirects=False).status_code == 303
    # The flash of the login is this client's alone, and shown once.
    assert "logged in as alice" in first.get("/templates").text
    pages = [c.get("/templates").text for c in (first, second)]
    assert "logged in as alice" not in pages[0]
    tokens = [re.findall(r'name="csrf_token" value="([^"]+)"', page) for page in pages]
    assert all(tokens) and set(tokens[0]) != set(tokens[1]) and len(set(tokens[0])) == 1
    web = world.client.app.state.web
    assert all(web.csrf_marker not in page for page in pages)
    # Each token acts only with its own session.
    form = {"template": "probe", "node": "b", "priority": "7"}
    assert second.post("/priority", data={**form, "csrf_token": tokens[0][0]}).status_code == 403
    assert second.post("/priority", data={**form, "csrf_token": tokens[1][0]},
                       follow_redirects=False).status_code == 303


def test_a_page_without_a_form_sets_no_cookie(world: World) -> None:
    viewer = TestClient(world.client.app)
    for path in ("/", "/files", "/jobs", "/api/jobs", "/templates"):
        answer = viewer.get(path)
        assert answer.status_code == 200 and "set-cookie" not in answer.headers, path
    # The login form carries a token, so it makes a session.
    assert "p3s_session=" in viewer.get("/login").headers["set-cookie"]


def test_a_bad_request_is_answered_for_its_client_and_not_shared(world: World) -> None:
    for _ in range(2):
        answer = world.client.get("/jobs?state=nonsense")
        assert answer.status_code == 400 and "nonsense" in answer.text
    assert world.client.get("/healthz").json()["refused"]["parameter"] == 2
    assert world.client.get("/jobs/999999").status_code == 404


def test_rows_fields_are_found_and_a_dicts_own_methods_stay_its_own() -> None:
    env = _environment()
    # A row's field by name; a metric called "get" or "items" does not hide the dict's methods.
    page = env.from_string("{{ row.state }} {{ metrics.get('x') }} {% for k, v in metrics.items() %}{{ k }}{% endfor %}"
                           " {{ row.missing is undefined }}")
    assert page.render(row={"state": "finished"}, metrics={"get": 1, "items": 2, "x": 3}) == (
        "finished 3 getitemsx True")
