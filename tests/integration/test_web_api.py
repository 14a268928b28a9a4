"""The web service's JSON API against the CLI's ``--json``, and its OpenAPI description fuzzed.

One pipeline for the module (dispatcher, watcher, a pilot and ``p3s web``,
each a process, on RabbitMQ and PostgreSQL), brought to a state that no longer
changes (every job ended but one that waits on a queue no pilot serves), then
read both ways.  Every ``/api/...`` listing must give the objects ``p3s ...
--json`` gives for the same state; the only keys left out are those that move
by themselves: ``at`` (the moment ``status`` was computed), a source's
``reported_s_ago`` and a pilot's ``last_seen`` (a heartbeat a second).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings

from p3s.dispatcher import admin
from tests import web_fixtures
from tests.stack import graphml, probe_command
from tests.web_fixtures import WebPipeline

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

# The module-scoped fixtures, seen by pytest as this module's own.
module_broker_url = web_fixtures.module_broker_url
module_database_url = web_fixtures.module_database_url

FILES = ["run000001.dat", "run000002.dat", "bad000001.dat", "held000001.dat"]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, module_broker_url: str,
        module_database_url: str) -> Iterator[WebPipeline]:
    tmp = tmp_path_factory.mktemp("web-api")
    templates = {
        "probe": graphml({"a": {"command": probe_command()}, "b": {"command": probe_command()}},
                         edges=[("a", "b")], trigger="run*.dat", name="probe"),
        "fails": graphml({"bad": {"command": probe_command("--exit", "3")}, "after": {"command": probe_command()}},
                         edges=[("bad", "after")], trigger="bad*.dat", name="fails"),
        # Waits on a queue no pilot serves, for longer than any test runs: it stays queued throughout.
        "held": graphml({"wait": {"command": probe_command(), "queue": "nobody"}}, trigger="held*.dat",
                        budget_s=3600, name="held"),
    }
    pipeline = WebPipeline(tmp, module_broker_url, module_database_url, templates, P3S_WEB_CACHE_S="0.1")
    pipeline.edit(admin.set_priority, "probe", "b", 7)
    try:
        pipeline.start()
        for name in FILES:
            pipeline.write(name)
        pipeline.wait_for(lambda: settled(pipeline), what="every job but the held one to end")
        yield pipeline
    finally:
        pipeline.stop()


def settled(web: WebPipeline) -> bool:
    """Every job ended but the held one, and the pilot's next heartbeat has counted the jobs it ran."""
    jobs = web.parts.db_jobs()
    active = [j for j in jobs if j["state"] in ("pending", "queued", "running")]
    if len(jobs) != 7 or [(j["node"], j["state"]) for j in active] != [("wait", "queued")]:
        return False
    ran = sum(j["pilot_id"] == "web-pilot" for j in jobs)
    return [(p["state"], p["jobs_done"]) for p in web.parts.query(admin.list_pilots)] == [("idle", ran)]


def without(value: Any, keys: set[str]) -> Any:
    """``value`` with ``keys`` removed from every object in it, however deep."""
    if isinstance(value, dict):
        return {k: without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [without(v, keys) for v in value]
    return value


#: Keys whose values move by themselves between two reads of the same state: the moment ``status`` was
#: computed, how long ago a watcher reported its sources, a pilot's heartbeat (one a second) and its age.
STATUS_MOVING = {"at", "reported_s_ago"}
PILOT_MOVING = {"last_seen", "last_seen_s_ago"}

#: Each API answer, the CLI command that must print the same objects, and the keys left out of both.
TWINS = {
    "files": ("files", {}, ["files"], set()),
    "files 2": ("files", {"limit": "2"}, ["files", "--limit", "2"], set()),
    "workflows": ("workflows", {}, ["workflows"], set()),
    "workflows finished": ("workflows", {"state": "finished"}, ["workflows", "--state", "finished"], set()),
    "jobs": ("jobs", {}, ["jobs"], set()),
    "jobs failed": ("jobs", {"state": "failed"}, ["jobs", "--state", "failed"], set()),
    "pilots": ("pilots", {}, ["pilots"], PILOT_MOVING),
    "templates": ("templates", {}, ["dag", "list"], set()),
    "templates all": ("templates", {"all": "1"}, ["dag", "list", "--all"], set()),
    "priorities": ("priorities", {}, ["priority", "list"], set()),
    "status": ("status", {}, ["status"], STATUS_MOVING),
}


@pytest.fixture(scope="module")
def cli(web: WebPipeline) -> dict[str, Any]:
    """What each CLI twin prints for the settled state; read once (each is a process of a second or more)."""
    commands = {name: args for name, (_, _, args, _) in TWINS.items()}
    commands["jobs of one workflow"] = ["jobs", "--workflow", str(web.workflow_of("run000001.dat")["id"])]
    return dict(zip(commands, web.cli_many(*commands.values()), strict=True))


def test_every_listing_matches_the_cli_json(web: WebPipeline, cli: dict[str, Any]) -> None:
    for name, (path, params, args, moving) in TWINS.items():
        got = web.api(path, **params)
        assert without(got, moving) == without(cli[name], moving), f"/api/{path} {params} != p3s {' '.join(args)}"
    assert {f["name"] for f in cli["files"]} == set(FILES)
    assert {j["state"] for j in cli["jobs"]} == {"finished", "failed", "dropped", "queued"}
    assert [p["template"] for p in cli["priorities"] if p["node"] == "b"] == ["probe"]


def test_each_workflow_and_job_matches_the_cli(web: WebPipeline, cli: dict[str, Any]) -> None:
    workflows, jobs = cli["workflows"], cli["jobs"]
    assert len(workflows) == len(FILES)
    for wf in workflows:
        got = web.api(f"workflows/{wf['id']}")
        # Its jobs are its rows of `p3s jobs --json`, in the same order (once checked with --workflow itself).
        assert got.pop("jobs") == [j for j in jobs if j["workflow_id"] == wf["id"]], f"/api/workflows/{wf['id']}"
        assert got == wf, f"/api/workflows/{wf['id']}"
    one = cli["jobs of one workflow"]
    assert web.api(f"workflows/{one[0]['workflow_id']}")["jobs"] == one
    for job in jobs:
        got = web.api(f"jobs/{job['id']}")
        assert {k: got.get(k) for k in job} == job, f"/api/jobs/{job['id']}"
        assert isinstance(got["argv"], list) and got["argv"], got


def test_the_overview_holds_the_status(web: WebPipeline, cli: dict[str, Any]) -> None:
    overview = web.api("overview")
    assert without(overview["status"], STATUS_MOVING) == without(cli["status"], STATUS_MOVING)


def test_bad_parameters_are_client_errors_and_unknown_ids_not_found(web: WebPipeline) -> None:
    import httpx

    with httpx.Client(base_url=web.base_url, timeout=10) as client:
        for path in ("/api/jobs?state=bogus", "/api/workflows?state=bogus", "/api/files?limit=-1",
                     "/api/jobs?limit=many", "/api/workflows/abc", "/api/jobs/abc"):
            answer = client.get(path)
            assert answer.status_code in (400, 404, 422), f"{path}: {answer.status_code} {answer.text[:500]}"
        for path in ("/api/workflows/999999", "/api/jobs/999999"):
            assert client.get(path).status_code == 404, path


#: Generated requests per operation and mode: enough to reach odd values of every parameter, few enough
#: to be quick (an operation without parameters is called once: there is nothing to vary).  Negative
#: cases cost ten times as much to generate (about 50 ms each), hence fewer of them.
EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 4}


def test_no_generated_request_makes_a_server_error(web: WebPipeline) -> None:
    """Every operation of /openapi.json, called with requests generated from its description: requests it
    allows (positive) and requests it forbids (negative: wrong types, out of range, unknown values)."""
    schema = schemathesis.openapi.from_url(web.url("/openapi.json"))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/files", "/api/workflows/{id}", "/api/jobs/{id}", "/api/status"}
    calls: list[tuple[str, str]] = []
    for operation in operations:
        fuzz(web, operation, GenerationMode.POSITIVE, calls)
        if operation.query or operation.path_parameters:
            fuzz(web, operation, GenerationMode.NEGATIVE, calls)
    assert {label for label, _ in calls} == {op.label for op in operations}, "an operation was never called"
    assert ("GET /api/jobs", "negative") in calls


def fuzz(web: WebPipeline, operation: Any, mode: GenerationMode, calls: list[tuple[str, str]]) -> None:
    """Call ``operation`` with cases generated in ``mode``; fail on the first answer that is a server error."""
    from schemathesis.checks import not_a_server_error

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def call(case: Any) -> None:
        calls.append((operation.label, mode.value))
        case.call_and_validate(base_url=web.base_url, checks=[not_a_server_error], timeout=10)

    call()
