"""The web monitor in a real browser: headless Chromium (Debian's) driven by Playwright.

One pipeline for the module (dispatcher, watcher, a pilot and ``p3s web``,
each a process, on RabbitMQ and PostgreSQL) and one browser; each test opens
its own browser context, so a login in one test is not seen by another.
What operators do on the pages is checked against the CLI's ``--json`` view
of the same state, run in a subprocess with the same settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from p3s.dispatcher import admin
from tests import web_fixtures
from tests.stack import graphml, probe_command
from tests.web_fixtures import OPERATOR, PASSWORD, WebPipeline, csrf_of, refused, screenshot

# The module-scoped fixtures, seen by pytest as this module's own.
chromium = web_fixtures.chromium
module_broker_url = web_fixtures.module_broker_url
module_database_url = web_fixtures.module_database_url

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

CANCELLED = "cancelled by operator"
# Valid as a file name (no slash): if it reached the page as markup, the <img> would run its
# onerror handler (also when inserted by a live refresh through innerHTML) and <b> would be an element.
HOSTILE = 'held<img src=nowhere onerror="window.__pwned=1"><b>bold run.raw'


def held(name: str, trigger: str) -> str:
    """A template whose one stage waits on a queue no pilot serves: its workflow stays running (for an hour)."""
    return graphml({"wait": {"command": probe_command(), "queue": "nobody", "priority": "2"}},
                   trigger=trigger, budget_s=3600, name=name)


def gate_of(root: Path) -> Path:
    """The file the live template's first stage waits for."""
    return root / "gate"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, module_broker_url: str,
        module_database_url: str) -> Iterator[WebPipeline]:
    tmp = tmp_path_factory.mktemp("web-browser")
    gate = gate_of(tmp)
    templates = {
        # Its first stage holds on until the test opens the gate, so the pages see it running first.
        "live": graphml({"a": {"command": probe_command("--until", str(gate))}, "b": {"command": probe_command()}},
                        edges=[("a", "b")], trigger="live*.raw", name="live"),
        "plain": graphml({"probe": {"command": probe_command()}}, trigger="x*.raw", name="plain"),
        "fails": graphml({"decode": {"command": probe_command("--exit", "3")}}, trigger="bad*.raw", name="fails"),
        "held": held("held", "held*.raw"),
        "doomed": held("doomed", "doomed*.raw"),  # an operator deletes it
    }
    pipeline = WebPipeline(tmp, module_broker_url, module_database_url, templates,
                           P3S_WEB_REFRESH_S="0.5", P3S_WEB_CACHE_S="0.2")
    try:
        yield pipeline.start()
    finally:
        pipeline.stop()


@pytest.fixture
def context(chromium: Any) -> Iterator[Any]:
    ctx = chromium.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(60_000)  # generous: only a failing test waits so long
    try:
        yield ctx
    finally:
        ctx.close()


class Watched:
    """A page whose navigations are counted: a live refresh must not be one."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.navigations: list[str] = []
        page.on("framenavigated", lambda frame: frame == page.main_frame and self.navigations.append(frame.url))

    def open(self, url: str) -> Watched:
        self.page.goto(url)
        self.navigations.clear()
        # A reload or a navigation makes a new document, without this mark.
        self.page.evaluate("window.__sameDocument = true")
        return self

    def assert_not_reloaded(self) -> None:
        assert self.navigations == [], f"the page navigated: {self.navigations}"
        assert self.page.evaluate("window.__sameDocument === true"), "the document was replaced"


def login(context: Any, web: WebPipeline) -> Any:
    page = context.new_page()
    page.goto(web.url("/login"))
    page.fill("#login-form input[name=username]", OPERATOR)
    page.fill("#login-form input[name=password]", PASSWORD)
    page.click("#login-form [type=submit]")
    page.wait_for_selector("#operator")
    assert page.inner_text("#operator").strip() == OPERATOR
    return page


# -- live pages -----------------------------------------------------------------------------


ARRIVALS = """([window, decision]) => {
    const cell = document.querySelector(`#arrivals [data-window="${window}"][data-decision="${decision}"]`);
    return cell ? Number(cell.textContent.trim()) : 0;
}"""

ON_TIME = """(template) => {
    const row = document.querySelector(`#on-time [data-template="${template}"]`);
    return row ? [...row.querySelectorAll('td')].slice(0, 2).map(td => td.textContent.trim()).join(' ') : '';
}"""

DAG_STATES = """() => Object.fromEntries(
    [...document.querySelectorAll('#dag g.node')].map(g => [g.dataset.node, g.dataset.state]))"""


def test_a_new_file_turns_finished_on_the_open_pages_without_a_reload(web: WebPipeline, context: Any) -> None:
    overview = Watched(context.new_page()).open(web.url("/"))
    before = overview.page.evaluate(ARRIVALS, ["1m", "accepted"])

    web.write("live000001.raw")
    wf = web.workflow_of("live000001.raw")
    assert wf["state"] == "running", wf
    dag = Watched(context.new_page()).open(web.url(f"/workflows/{wf['id']}"))
    states = dag.page.evaluate(DAG_STATES)
    assert set(states) == {"a", "b"}, states
    assert states["b"] == "pending" and states["a"] in ("queued", "running"), states

    # The overview counts the new file without being reloaded.
    overview.page.wait_for_function(f"() => ({ARRIVALS})(['1m', 'accepted']) > {before}")
    assert overview.page.evaluate(ARRIVALS, ["24h", "accepted"]) >= 1

    gate_of(web.root).write_text("open")
    dag.page.wait_for_function(
        f"() => {{ const s = ({DAG_STATES})(); return s.a === 'finished' && s.b === 'finished'; }}")
    dag.page.wait_for_function("() => document.querySelector('#workflow-state').textContent.trim() === 'finished'")
    # The overview's on-time panel counts the workflow as ended, and on time.
    overview.page.wait_for_function(f"() => ({ON_TIME})('live') === '1 1'")

    assert {j["node"]: j["state"] for j in web.jobs_of(wf["id"])} == {"a": "finished", "b": "finished"}
    overview.assert_not_reloaded()
    dag.assert_not_reloaded()
    screenshot(overview.page, "overview-live")
    screenshot(dag.page, "workflow-live")


# -- operators and viewers -----------------------------------------------------------------


def recorded(web: WebPipeline) -> dict[str, Any]:
    """Everything an operator action could change, read by the functions the CLI's listings call."""
    return {
        "templates": web.parts.query(admin.list_templates, include_deleted=True),
        "priorities": web.parts.query(admin.list_priorities),
        "workflows": web.parts.query(admin.list_workflows, limit=100000),
        "jobs": web.parts.query(admin.list_jobs, limit=100000),
    }


def submit(page: Any, form: str) -> str:
    """Send ``form`` and wait for the page the server answers with; that page's flash line."""
    with page.expect_navigation():
        page.click(f"{form} [type=submit]")
    flash = page.locator("#flash")
    return flash.inner_text() if flash.count() else ""


def test_an_operator_imports_a_template_raises_a_priority_and_cancels_a_workflow(
        web: WebPipeline, context: Any, tmp_path: Path) -> None:
    page = login(context, web)

    upload = tmp_path / "uploaded.graphml"
    upload.write_text(held("uploaded", "up*.raw"))
    page.goto(web.url("/templates"))
    page.set_input_files("#import-form input[type=file]", str(upload))
    assert "template uploaded version 1" in submit(page, "#import-form")
    assert page.locator('#templates [data-template="uploaded"]').count() == 1

    page.goto(web.url("/templates"))
    form = page.locator("#priority-form")
    form.locator("[name=template]").fill("uploaded")
    form.locator("[name=node]").fill("wait")
    form.locator("[name=priority]").fill("8")
    assert "priority 8" in submit(page, "#priority-form")

    web.write("up000001.raw")
    wf = web.workflow_of("up000001.raw")
    web.wait_for(lambda: web.jobs_of(wf["id"]), what="the uploaded template's job")
    page.goto(web.url(f"/workflows/{wf['id']}"))
    submit(page, "#cancel-form")
    assert page.inner_text("#workflow-state") == "incomplete"

    page.goto(web.url("/templates/doomed"))
    assert "deleted" in submit(page, ".delete-form")

    # The CLI's view of the same state: every action is there.
    templates, priorities, workflows, jobs = web.cli_many(
        ["dag", "list", "--all"], ["priority", "list"], ["workflows"], ["jobs", "--workflow", str(wf["id"])])
    versions = {t["name"]: (t["version"], t["state"]) for t in templates}
    assert versions["uploaded"] == (1, "active") and versions["doomed"] == (1, "deleted"), templates
    assert next(t for t in templates if t["name"] == "uploaded")["trigger"] == "up*.raw"
    assert [p["priority"] for p in priorities if (p["template"], p["node"]) == ("uploaded", "wait")] == [8]
    assert next(w for w in workflows if w["id"] == wf["id"])["state"] == "incomplete", workflows
    assert [(j["state"], j["reason"], j["priority"]) for j in jobs] == [("dropped", CANCELLED, 8)], jobs

    # Each action is logged with who did it.
    log = web.web.log()
    for line in ("imported template uploaded", "set priority of uploaded/wait to 8",
                 f"cancelled workflow {wf['id']}", "deleted template doomed"):
        assert f"operator {OPERATOR} {line}" in log, line


def with_token(body: dict[str, Any], token: str) -> dict[str, Any]:
    return {**body, "data": {**body.get("data", {}), "csrf_token": token}}


def test_a_viewer_cannot_act_and_a_forged_post_is_refused(web: WebPipeline, context: Any, chromium: Any) -> None:
    import httpx

    web.write("held000001.raw")
    wf = web.workflow_of("held000001.raw")
    web.wait_for(lambda: web.jobs_of(wf["id"]), what="the held workflow's job")
    before = recorded(web)

    # A viewer sees the pages but none of the operator's forms.
    page = context.new_page()
    for path, forms in (("/templates", ["#import-form", "#priority-form", ".delete-form"]),
                        ("/templates/held", ["#priority-form", ".delete-form"]),
                        (f"/workflows/{wf['id']}", ["#cancel-form"])):
        page.goto(web.url(path))
        assert page.locator("#content").count() == 1
        for selector in forms:
            assert page.locator(selector).count() == 0, f"{selector} shown to a viewer on {path}"

    upload = held("sneaky", "sneaky*.raw").encode()
    actions = [
        ("/templates/import", {"files": {"file": ("sneaky.graphml", upload, "application/xml")}}),
        ("/templates/held/delete", {"data": {}}),
        ("/priority", {"data": {"template": "held", "node": "wait", "priority": "9"}}),
        (f"/workflows/{wf['id']}/cancel", {"data": {}}),
    ]
    counted = refused(web)
    with httpx.Client(base_url=web.base_url, timeout=10, follow_redirects=False) as viewer:
        # A session of the viewer's own, with a valid CSRF token, but no login: refused as not an operator.
        token = csrf_of(viewer.get("/login").text)
        for path, body in actions:
            answer = viewer.post(path, **with_token(body, token))
            assert answer.status_code == 401, f"viewer POST {path}: {answer.status_code} {answer.text[:500]}"
            answer = viewer.post(path, **body)
            assert answer.status_code == 403, f"viewer POST {path} without a token: {answer.status_code}"
    now = refused(web)
    assert now.get("login", 0) - counted.get("login", 0) == len(actions), now
    assert now.get("csrf", 0) - counted.get("csrf", 0) == len(actions), now

    # An operator's session cookie, taken from the browser, without the form's CSRF token: a forgery.
    operator = chromium.new_context()
    try:
        login(operator, web)
        cookies = {c["name"]: c["value"] for c in operator.cookies()}
    finally:
        operator.close()
    with httpx.Client(base_url=web.base_url, timeout=10, follow_redirects=False, cookies=cookies) as forger:
        me = forger.get("/templates")
        assert OPERATOR in me.text, "the cookie is a logged-in operator's"
        for path, body in actions:
            answer = forger.post(path, **body)
            assert answer.status_code == 403, f"forged POST {path}: {answer.status_code} {answer.text[:500]}"
            answer = forger.post(path, **with_token(body, "not-the-token"))
            assert answer.status_code == 403, f"POST {path} with a wrong token: {answer.status_code}"

    assert recorded(web) == before, "a refused action changed something"


# -- untrusted text ---------------------------------------------------------------------------


def test_a_file_name_with_markup_and_script_is_shown_as_text(web: WebPipeline, context: Any) -> None:
    web.write(HOSTILE)
    wf = web.workflow_of(HOSTILE)
    (job,) = web.wait_for(lambda: web.jobs_of(wf["id"]), what="the hostile file's job")
    page = context.new_page()
    for path, where in (("/files", "#files"), (f"/files?name={quote(HOSTILE)}", "#files"),
                        ("/jobs", "#jobs"), (f"/jobs/{job['id']}", "#content"), (f"/workflows/{wf['id']}", "#content")):
        page.goto(web.url(path))
        assert HOSTILE in page.inner_text(where), f"the name is not shown as text on {path}"
        assert_inert(page, where, path)
    # The workflow still runs (its stage waits on a queue no pilot serves), so its page refreshes its
    # live region through innerHTML, where an <img> would run its onerror: wait for a refresh to land.
    page.evaluate("document.querySelector('#workflow-state').__before = true")
    page.wait_for_function("() => document.querySelector('#workflow-state').__before !== true")
    assert HOSTILE in page.inner_text("#live")
    assert_inert(page, "#content", f"/workflows/{wf['id']} after a live refresh")


def assert_inert(page: Any, where: str, path: str) -> None:
    assert page.locator(f"{where} b").count() == 0, f"a <b> element was made from the name on {path}"
    assert page.locator(f"{where} img").count() == 0, f"an <img> element was made from the name on {path}"
    assert page.evaluate("typeof window.__pwned") == "undefined", f"the name's script ran on {path}"


# -- every page, for the record ---------------------------------------------------------------


def test_every_page_answers_and_is_saved_as_a_screenshot(web: WebPipeline, context: Any) -> None:
    page = login(context, web)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    web.write("x000042.raw")
    web.write("bad000042.raw")
    wf = web.workflow_of("x000042.raw")
    (job,) = web.wait_for(lambda: [j for j in web.jobs_of(wf["id"]) if j["state"] == "finished"],
                          what="the job of x000042.raw to finish")
    bad = web.workflow_of("bad000042.raw")
    (failed,) = web.wait_for(lambda: [j for j in web.jobs_of(bad["id"]) if j["state"] == "failed"],
                             what="the job of bad000042.raw to fail")
    pages = {"overview": "/", "status": "/status", "files": "/files", "workflows": "/workflows",
             "workflow": f"/workflows/{wf['id']}", "jobs": "/jobs", "job": f"/jobs/{job['id']}", "pilots": "/pilots",
             "templates": "/templates", "template": "/templates/live", "priorities": "/priorities",
             "sampling": "/sampling"}
    for name, path in pages.items():
        answer = page.goto(web.url(path))
        assert answer is not None and answer.status == 200, f"{path}: {answer and answer.status}"
        assert page.locator("main#content").count() == 1, f"{path} has no <main id=content>"
        if name == "overview":
            # The last failures: the failed job, with its exit code.
            page.wait_for_selector(f'#failures [data-job-id="{failed["id"]}"]')
        if name == "job":
            assert "probe: exiting with 0" in page.inner_text("#log-tail")
        assert screenshot(page, name).stat().st_size > 0
    assert not errors, errors
