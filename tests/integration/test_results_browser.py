"""The Results pages in a real browser: headless Chromium (Debian's) driven by Playwright.

One pipeline for the module (dispatcher, watcher, a pilot and ``p3s web``,
each a process, on RabbitMQ and PostgreSQL) and one browser.  The shipped
example DQM payload (config/templates/dqm_payload.py) processes a file of
run 101 and then one of run 102; a payload of the test's own writes a
manifest full of hostile strings (markup, a script, ``../`` and absolute
paths, a symlink out of its output directory).  What the pages show is
checked against ``/api/results`` (``p3s results --json``) of the same database.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import web_fixtures
from tests.procs import ROOT
from tests.stack import graphml
from tests.web_fixtures import WebPipeline, screenshot

# The module-scoped fixtures, seen by pytest as this module's own.
chromium = web_fixtures.chromium
module_broker_url = web_fixtures.module_broker_url
module_database_url = web_fixtures.module_database_url

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

DQM = ROOT / "config" / "templates" / "dqm_results.graphml"
PAYLOAD = ROOT / "config" / "templates" / "dqm_payload.py"
SHIPPED_COMMAND = "python3 /opt/p3s/config/templates/dqm_payload.py"
SCRIPT = "<script>window.__pwned = 1</script>"
MARKUP = f'{SCRIPT}<img src=x onerror="window.__pwned=2"><b>bold</b>'

# The hostile payload: a real PNG and SVG (with a script in it), and a manifest whose every free string is
# markup, with entries that leave the output directory by their text and by a symlink.
HOSTILE_PAYLOAD = r'''
import json, os, sys
from pathlib import Path
sys.path.insert(0, {templates!r})
from dqm_payload import histogram_png
out = Path(sys.argv[2])
(out / "plot.png").write_bytes(histogram_png([1] * 256))
(out / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="20" height="20">'
                                 '<script>window.__pwned = 3</script><rect width="20" height="20"/></svg>')
os.symlink({secret!r}, out / "link.png")
markup = {markup!r}
manifest = {{
    "metrics": {{"bad": {{"value": 1000, "unit": "<b>u</b>", "range": [0, 1]}}}},
    "plots": [{{"path": "plot.png", "category": "adc", "caption": markup}},
              {{"path": "drawing.svg", "category": "drawing", "caption": "an SVG with a script"}},
              {{"path": "../../../etc/passwd", "category": "up", "caption": markup}},
              {{"path": {secret!r}, "category": "absolute"}},
              {{"path": "link.png", "category": "symlink"}}],
    "labels": {{"note": markup}},
}}
(out / "p3s-results.json").write_text(json.dumps(manifest))
'''


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, module_broker_url: str,
        module_database_url: str) -> Iterator[WebPipeline]:
    tmp = tmp_path_factory.mktemp("results-browser")
    secret = tmp / "secret.png"
    secret.write_text("the password of the experiment\n")
    hostile = tmp / "hostile_payload.py"
    hostile.write_text(HOSTILE_PAYLOAD.format(templates=str(PAYLOAD.parent), secret=str(secret), markup=MARKUP))
    shipped = DQM.read_text()
    assert SHIPPED_COMMAND in shipped
    templates = {
        # The shipped example, run from this tree by this interpreter.
        "dqm_results": shipped.replace(SHIPPED_COMMAND, f"{sys.executable} {PAYLOAD}"),
        "hostile": graphml({"evil": {"command": f"{sys.executable} {hostile} {{input}} {{outdir}}"}},
                           trigger="*.evil", name="hostile"),
    }
    pipeline = WebPipeline(tmp, module_broker_url, module_database_url, templates)
    pipeline.secret = secret  # type: ignore[attr-defined]
    try:
        pipeline.start()
        # Run 101 (and the hostile file) first, then run 102: 102 is the newest result of the example.
        process(pipeline, ("np04_raw_run000101_0001.hdf5", 100), ("np04_raw_run000777_0001.evil", 1))
        process(pipeline, ("np04_raw_run000102_0003.hdf5", 120))
        yield pipeline
    finally:
        pipeline.stop()


def process(web: WebPipeline, *files: tuple[str, int]) -> None:
    """Files whose every byte is the number given, once their results are recorded."""
    for name, byte in files:
        web.write(name, bytes([byte]) * 4096)
    web.wait_for(lambda: {n for n, _ in files} <= {r["file"] for r in web.api("results", limit=1000)},
                 timeout=60, what=f"the results of {', '.join(n for n, _ in files)}")


@pytest.fixture(scope="module")
def page(chromium: Any) -> Iterator[Any]:
    ctx = chromium.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(30_000)  # generous: only a failing test waits so long
    try:
        yield ctx.new_page()
    finally:
        ctx.close()


NEWEST = """(category) => {
    const f = document.querySelector(`#newest figure[data-category="${category}"]`);
    if (!f) return null;
    const img = f.querySelector('img');
    return {run: f.dataset.run, subrun: f.dataset.subrun, age: f.querySelector('.age').textContent,
            loaded: img ? img.complete && img.naturalWidth : null, src: img ? img.getAttribute('src') : null};
}"""

POINTS = """(metric) => [...document.querySelectorAll(`svg.metric-history[data-metric="${metric}"] circle.point`)]
    .map(c => [Number(c.dataset.run), Number(c.dataset.value)])"""


def test_newest_plot_with_its_age_the_older_run_on_request_and_a_point_per_run(web: WebPipeline, page: Any) -> None:
    # /api/results is p3s results --json (tests/unit/test_web_results.py), without a process to start.
    listed = web.api("results", template="dqm_results")
    assert [(r["run"], r["subrun"]) for r in listed] == [(102, 3), (101, 1)]
    newest = next(f for f in listed[0]["files"] if f["category"] == "adc")

    page.goto(web.url("/results"))
    page.click('#result-templates a[href="/results/dqm_results"]')
    page.wait_for_url("**/results/dqm_results")  # and its load event: the images are in
    shown = page.evaluate(NEWEST, "adc")
    assert (shown["run"], shown["subrun"], shown["src"]) == ("102", "3", f"/results/files/{newest['id']}")
    assert shown["loaded"] == 256, "the PNG the payload drew, shown inline"
    assert shown["age"].endswith("s") and shown["age"] != "-"
    screenshot(page, "results-newest")

    page.select_option("#run-select", "101")
    page.click("#run-form [type=submit]")
    page.wait_for_url("**/results/dqm_results?run=101")
    older = page.evaluate(NEWEST, "adc")
    assert (older["run"], older["subrun"], older["loaded"]) == ("101", "1", 256)
    assert older["src"] == f"/results/files/{next(f['id'] for f in listed[1]['files'] if f['category'] == 'adc')}"
    assert page.locator("#results tbody tr").count() == 1
    screenshot(page, "results-run-101")

    means = {r["run"]: next(m["value"] for m in r["metrics"] if m["name"] == "mean_adc") for r in listed}
    points = sorted(tuple(p) for p in page.evaluate(POINTS, "mean_adc"))
    assert points == sorted(means.items()) == [(101, 100), (102, 120)]
    band = page.locator('svg.metric-history[data-metric="mean_adc"] rect.range')
    assert (band.get_attribute("data-lo"), band.get_attribute("data-hi")) == ("10", "200")

    page.select_option("#compare-form select[name=a]", "101")
    page.select_option("#compare-form select[name=b]", "102")
    page.click("#compare-form [type=submit]")
    page.wait_for_url("**/results/dqm_results/compare?a=101&b=102")
    row = page.locator('#compare-metrics tr[data-metric="mean_adc"] td')
    assert [row.nth(i).inner_text().strip() for i in range(2)] == ["100 ADC", "120 ADC"]
    assert page.locator("#compare-files img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)") == [256, 256]
    screenshot(page, "results-compare")


def test_hostile_manifest_strings_are_text_and_no_file_outside_the_output_directory_is_served(
        web: WebPipeline, page: Any) -> None:
    (result,) = web.api("results", template="hostile")
    recorded = {f["category"]: f for f in result["files"]}
    # The pilot refused what leaves the output directory; the rest is recorded, with the refusals as warnings.
    assert set(recorded) == {"adc", "drawing"}
    assert sum(" refused: " in w for w in result["warnings"]) == 3, result["warnings"]

    page.goto(web.url("/"))
    alarm = page.locator('#alarms tr[data-template="hostile"][data-metric="bad"]')
    assert alarm.locator("td").nth(2).inner_text() == "1000"
    page.click('#alarms a[href="/results/hostile"]')
    page.wait_for_url("**/results/hostile")
    assert page.evaluate("window.__pwned") is None, "a manifest's string ran as markup"
    caption = page.locator('#newest figure[data-category="adc"] .caption').inner_text()
    assert caption == MARKUP
    assert page.locator('#newest figure[data-category="adc"] img').evaluate("i => i.naturalWidth") == 256
    assert page.locator('#newest figure[data-category="drawing"] img').evaluate("i => i.naturalWidth") == 20
    assert MARKUP in page.locator("#results td.labels").inner_text()
    assert "../../../etc/passwd" in page.locator("#results td.warn").inner_text()
    assert page.locator("#alarms tr.alarm").count() == 1
    assert page.locator("#results b, #newest .caption b, #newest .caption img").count() == 0
    screenshot(page, "results-hostile")

    # An SVG opened by itself is inert: the sandbox policy stops its script.
    svg = httpx.get(web.url(f"/results/files/{recorded['drawing']['id']}"), timeout=10)
    assert svg.headers["content-type"] == "image/svg+xml" and "sandbox" in svg.headers["content-security-policy"]
    page.goto(web.url(f"/results/files/{recorded['drawing']['id']}"))
    assert page.evaluate("window.__pwned") is None

    # The plot, replaced since by a symlink out of the output directory, is no longer served.
    plot = Path(result["outdir"]) / recorded["adc"]["path"]
    assert httpx.get(web.url(f"/results/files/{recorded['adc']['id']}"), timeout=10).status_code == 200
    plot.unlink()
    plot.symlink_to(web.secret)  # type: ignore[attr-defined]
    for url in (f"/results/files/{recorded['adc']['id']}", "/results/files/..%2F..%2F..%2Fetc%2Fpasswd",
                "/results/files/999999"):
        response = httpx.get(web.url(url), timeout=10)
        assert response.status_code == 404 and "password" not in response.text, url
