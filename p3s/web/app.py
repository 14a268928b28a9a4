"""``p3s web``: the shifters' and operators' pages and their JSON twins, as a Starlette application.

Reads go through :mod:`p3s.web.queries`, which uses the CLI's own listings,
so ``/api/files`` is ``p3s files --json``.  Database work is synchronous
SQLAlchemy in plain ``def`` endpoints, which Starlette runs in its thread
pool: the event loop never waits for the database or the broker.  Operator
actions call the functions the CLI calls, behind a login and a CSRF token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import uvicorn
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from p3s.config import Settings
from p3s.dispatcher import admin, status
from p3s.errors import NotFound, P3SError, TemplateError
from p3s.results import query as result_query
from p3s.states import Decision, JobState, WorkflowState
from p3s.tables import safe
from p3s.web import auth, queries, svg
from p3s.web.openapi import openapi

log = logging.getLogger("p3s.web")

HERE = Path(__file__).resolve().parent
MAX_LIMIT = 1000
MAX_TEXT = 512  # the longest name column (files.name)
SESSION_MAX_AGE_S = 12 * 3600
BROKER_RETRY_S = 15.0


class BadRequest(HTTPException):
    """A query parameter or form field that cannot be used, said in one line."""

    def __init__(self, detail: str) -> None:
        super().__init__(400, detail)


class Params:
    """A request's query parameters, each checked against what the query will use."""

    def __init__(self, request: Request) -> None:
        self.query = request.query_params

    def text(self, name: str) -> str | None:
        value = self.query.get(name)
        if value is None or value == "":
            return None
        if len(value) > MAX_TEXT or "\x00" in value:
            raise BadRequest(f"{name}: at most {MAX_TEXT} characters of text")
        return value

    def choice(self, name: str, choices: Any) -> str | None:
        value = self.text(name)
        allowed = [str(c) for c in choices]
        if value is not None and value not in allowed:
            raise BadRequest(f"{name}: {value[:64]!r} is not one of {', '.join(allowed)}")
        return value

    def number(self, name: str) -> float | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            raise BadRequest(f"{name}: expected a number of seconds since the epoch, got {value[:64]!r}") from None
        if not math.isfinite(number):
            raise BadRequest(f"{name}: must be a finite number")
        return number

    def integer(self, name: str, default: int | None = None, low: int = 0, high: int = 2**63 - 1) -> int | None:
        value = self.text(name)
        if value is None:
            return default
        if not value.isdigit() and not (value.startswith("-") and value[1:].isdigit()):
            raise BadRequest(f"{name}: expected a whole number, got {value[:64]!r}")
        number = int(value)
        if not low <= number <= high:
            raise BadRequest(f"{name}: must be from {low} to {high}, got {number}")
        return number

    def limit(self) -> int:
        return int(self.integer("limit", 100, 1, MAX_LIMIT) or 100)

    def flag(self, name: str) -> bool:
        return self.choice(name, ("0", "1", "true", "false")) in ("1", "true")


def path_id(request: Request, name: str = "id") -> int:
    """A numeric id from the path; 400 if it is not one (a missing record is 404, later)."""
    text = request.path_params[name]
    if not text.isdigit() or len(text) > 18:
        raise BadRequest(f"{name}: expected a whole number, got {text[:64]!r}")
    return int(text)


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _secs(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    if value < 10:
        return f"{value:.2f}s"
    if value < 600:
        return f"{value:.1f}s"
    return f"{value / 60:.1f}min"


def _share(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Environment(jinja2.Environment):
    """Jinja2's environment, finding a row's field (``j.state``) without first failing to find an
    attribute of that name: a page of a hundred rows asks a thousand times."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        # What Jinja2 finds after getattr() has raised; a dict's own attributes (``metrics.get``) as before.
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)


def _environment() -> jinja2.Environment:
    env = _Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, secs=_secs, share=_share, txt=lambda v: "-" if v is None else safe(str(v)),
                       basename=lambda v: str(v).rsplit("/", 1)[-1])
    return env


class Web:
    """The service's state: settings, engine, operators, templates and the shared overview."""

    def __init__(self, settings: Settings, engine: Engine, ask_broker: bool, beside_pipeline: bool = False) -> None:
        self.settings = settings
        self.engine = engine
        self.ask_broker = ask_broker
        # In the pipeline's own process (p3s run --web): even the embedded broker reaches its pilots.
        self.beside_pipeline = beside_pipeline
        self.operators = auth.Operators.from_settings(settings)
        self.env = _environment()
        self.refused: dict[str, int] = {}
        self.broker_retry_at = 0.0  # time.monotonic() after which an unreachable broker is asked again
        self.broker_note = ""
        self.overview_cache = queries.Cached(self._overview, settings.web.cache_s)
        # Answers to GET requests, shared for cache_s by the clients asking the same thing.
        self.pages = queries.Shared(settings.web.cache_s)
        # Stands for the CSRF token in a shared answer; each client's own is put in its place.
        self.csrf_marker = secrets.token_hex(16)
        self.openapi_body: bytes | None = None

    # -- plumbing ----------------------------------------------------------------------

    def refuse(self, reason: str) -> None:
        """Count a refused request by why (shown at /healthz)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with Session(self.engine) as session:
            return fn(session, *args, **kwargs)

    def _overview(self) -> dict[str, Any]:
        # A broker that did not answer is asked again only after BROKER_RETRY_S: connecting may take its
        # whole timeout, and every client waiting on the shared overview would wait that long each time.
        ask = self.ask_broker and time.monotonic() >= self.broker_retry_at
        data = self.read(queries.overview, self.settings, time.time(), ask_broker=ask)
        if ask and data["broker_unreachable"]:
            self.broker_retry_at = time.monotonic() + BROKER_RETRY_S
            self.broker_note = data["queues_note"]
        elif self.ask_broker and not ask:
            for part in (data, data["status"]):
                part["queues_note"] = f"{self.broker_note} (asked again within {BROKER_RETRY_S:g}s)"
                part["broker_unreachable"] = True
        return data

    def who(self, request: Request) -> str | None:
        return auth.operator_of(request, self.operators)

    def may_view(self, request: Request) -> bool:
        return self.settings.web.anonymous_view or self.who(request) is not None

    def render(self, request: Request, name: str, status_code: int = 200, **data: Any) -> HTMLResponse:
        template = self.env.get_template(name)
        context = {
            "request": request,
            "operator": self.who(request),
            "csrf": self.csrf_marker if getattr(request.state, "shared", False) else _LazyCsrf(request),
            "refresh_s": self.settings.web.refresh_s,
            "anonymous_view": self.settings.web.anonymous_view,
            "flash": request.session.pop("flash", None),
            "live_url": None,
            **data,
        }
        if request.query_params.get("live") == "1" and "live" in template.blocks:
            # The live region alone, for the refresh script.
            body = "".join(template.blocks["live"](template.new_context(context)))
            return HTMLResponse(body, status_code, headers={"Cache-Control": "no-store"})
        return HTMLResponse(template.render(context), status_code, headers={"Cache-Control": "no-store"})

    def error(self, request: Request, code: int, detail: str) -> Response:
        if request.url.path.startswith("/api/") or request.url.path == "/openapi.json":
            return JSONResponse({"error": detail, "status": code}, code)
        return self.render(request, "error.html", code, code=code, detail=detail)

    def shared(self, request: Request, make: Callable[[], Response]) -> Response:
        """``make()``'s answer, shared for ``web.cache_s`` with every client asking the same path and query
        as the same operator (or none): fifty shifters watching one page cost one query and one rendering
        a second, not fifty.  An answer that carries a flash message is this client's alone."""
        if "flash" in request.session:
            return make()

        def frozen() -> tuple[int, bytes, dict[str, str]]:
            request.state.shared = True
            try:
                answer = make()
            finally:
                request.state.shared = False  # an error page is rendered for this client alone
            headers = {k: v for k, v in answer.headers.items() if k != "content-length"}
            return answer.status_code, bytes(answer.body), headers

        code, body, headers = self.pages.get((request.url.path, request.url.query, self.who(request)), frozen)
        marker = self.csrf_marker.encode()
        if marker in body:
            body = body.replace(marker, auth.csrf_token(request).encode())
        return Response(body, code, headers=headers)

    def changed(self) -> None:
        """An operator changed something: nothing shared from before may be shown again."""
        self.pages.clear()
        self.overview_cache.expire()

    # -- endpoints: a page and its JSON twin share one function -------------------------

    def pair(self, path: str, template: str, data: Callable[[Request], dict[str, Any] | list[Any]],
             page: Callable[[Request, Any], dict[str, Any]] | None = None) -> list[Route]:
        """``GET path`` (HTML) and ``GET /api/path`` (JSON) from the same data."""

        def html(request: Request) -> Response:
            if not self.may_view(request):
                return RedirectResponse(f"/login?next={quote(request.url.path)}", 303)

            def make() -> Response:
                value = data(request)
                extra = page(request, value) if page else {}
                return self.render(request, template, data=value, **extra)

            return self.shared(request, make)

        def api(request: Request) -> Response:
            if not self.may_view(request):
                self.refuse("login")
                return JSONResponse({"error": "log in to view (web.anonymous_view is false)", "status": 401}, 401)
            return self.shared(request, lambda: JSONResponse(data(request)))

        routes = [Route(path, html, name=template.removesuffix(".html"))]
        api_path = "/api/overview" if path == "/" else f"/api{path}"
        return [*routes, Route(api_path, api)]

    def viewer(self, fn: Callable[[Request], Response], share: bool = True) -> Callable[[Request], Response]:
        """``fn`` for viewers; its answers shared (:meth:`shared`) unless ``share`` is false (a file)."""

        def endpoint(request: Request) -> Response:
            if not self.may_view(request):
                return RedirectResponse(f"/login?next={quote(request.url.path)}", 303)
            return self.shared(request, lambda: fn(request)) if share else fn(request)

        return endpoint

    # -- data of each page ----------------------------------------------------------------

    def overview(self, request: Request) -> dict[str, Any]:
        Params(request).choice("live", ("1",))
        return self.overview_cache.get()

    def status(self, request: Request) -> dict[str, Any]:
        # Computed for this request (and shared for web.cache_s like any answer), not the overview's copy:
        # that one may have been started before the state the caller has just seen.
        return self.read(status.collect, self.settings, ask_broker=self.ask_broker)

    def files(self, request: Request) -> list[dict[str, Any]]:
        p = Params(request)
        return self.read(admin.list_files, limit=p.limit(), name=p.text("name"),
                         decision=p.choice("decision", [d.value for d in Decision]),
                         since=p.number("since"), until=p.number("until"))

    def workflows(self, request: Request) -> list[dict[str, Any]]:
        p = Params(request)
        return self.read(admin.list_workflows, limit=p.limit(),
                         state=p.choice("state", [s.value for s in WorkflowState]), template=p.text("template"))

    def workflow(self, request: Request) -> dict[str, Any]:
        Params(request).choice("live", ("1",))
        return self.read(queries.workflow, path_id(request))

    def jobs(self, request: Request) -> list[dict[str, Any]]:
        p = Params(request)
        return self.read(admin.list_jobs, limit=p.limit(), state=p.choice("state", [s.value for s in JobState]),
                         workflow_id=p.integer("workflow"), template=p.text("template"), node=p.text("node"),
                         pilot_id=p.text("pilot"))

    def job(self, request: Request) -> dict[str, Any]:
        return self.read(queries.job, self.settings, path_id(request))

    def pilots(self, request: Request) -> list[dict[str, Any]]:
        Params(request).choice("live", ("1",))
        return self.read(queries.pilot_rows, time.time(), Params(request).limit())

    def templates(self, request: Request) -> list[dict[str, Any]]:
        return self.read(admin.list_templates, include_deleted=Params(request).flag("all"))

    def priorities(self, request: Request) -> list[dict[str, Any]]:
        return self.read(admin.list_priorities)

    def sampling(self, request: Request) -> dict[str, Any]:
        return self.read(queries.sampling, self.settings, time.time())

    # -- pages that need more than their JSON -----------------------------------------

    def overview_page(self, request: Request, data: dict[str, Any]) -> dict[str, Any]:
        return {"plot": svg.latency_plot(data["latency_plot"]), "live_url": "/?live=1",
                "alarms": self.read(result_query.list_alarms),
                "windows": [w for w, _ in queries.WINDOWS], "decisions": [d.value for d in Decision]}

    def workflow_page(self, request: Request, data: dict[str, Any]) -> dict[str, Any]:
        live = None if WorkflowState(data["state"]) != WorkflowState.RUNNING else f"/workflows/{data['id']}?live=1"
        return {"dag": self.workflow_svg(data), "live_url": live}

    def pilots_page(self, request: Request, data: Any) -> dict[str, Any]:
        return {"live_url": "/pilots?live=1"}

    def filters_page(self, request: Request, data: Any) -> dict[str, Any]:
        return {"q": request.query_params, "decisions": [d.value for d in Decision],
                "job_states": [s.value for s in JobState], "workflow_states": [s.value for s in WorkflowState]}

    def workflow_svg(self, data: dict[str, Any]) -> str:
        tpl = self.read(queries.workflow_template, data["id"])
        jobs = {j["node"]: j for j in data["jobs"]}
        labels = {}
        for name, j in jobs.items():
            took = (j["ended_at"] - j["started_at"]) if j["ended_at"] and j["started_at"] else None
            labels[name] = j["state"] + (f" · {_secs(took)}" if took is not None else "")
        return svg.dag([n.name for n in tpl.nodes], list(tpl.edges), {n: j["state"] for n, j in jobs.items()},
                       links={n: f"/jobs/{j['id']}" for n, j in jobs.items()}, labels=labels)

    def workflow_dag(self, request: Request) -> Response:
        return Response(self.workflow_svg(self.workflow(request)), media_type="image/svg+xml")

    def job_page(self, request: Request) -> Response:
        return self.render(request, "job.html", data=self.job(request))

    def template_of(self, request: Request) -> Any:
        name = request.path_params["name"]
        if len(name) > 128:
            raise BadRequest("name: at most 128 characters")
        return self.read(queries.template_detail, name)

    def template_page(self, request: Request) -> Response:
        detail = self.template_of(request)
        tpl = detail["template"]
        picture = svg.dag([n.name for n in tpl.nodes], list(tpl.edges),
                          labels={n.name: f"queue {n.queue} · prio {n.priority}" for n in tpl.nodes})
        return self.render(request, "template.html", data=detail, dag=picture)

    def template_svg(self, request: Request) -> Response:
        tpl = self.template_of(request)["template"]
        return Response(svg.dag([n.name for n in tpl.nodes], list(tpl.edges)), media_type="image/svg+xml")

    def template_graphml(self, request: Request) -> Response:
        from p3s.dagengine import to_graphml

        tpl = self.template_of(request)["template"]
        # The name is the template's own, but keep the header to safe characters all the same.
        filename = "".join(c if c.isalnum() or c in "-_." else "_" for c in tpl.name) + ".graphml"
        return Response(to_graphml(tpl), media_type="application/graphml+xml",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    def healthz(self, request: Request) -> Response:
        # With several workers, each counts its own: the pid says which one answered.
        return JSONResponse({"ok": True, "pid": os.getpid(), "refused": self.refused})

    def openapi(self, request: Request) -> Response:
        if self.openapi_body is None:  # the same for the life of the process: encoded once
            self.openapi_body = JSONResponse(openapi()).body
        return Response(self.openapi_body, media_type="application/json")

    # -- login -------------------------------------------------------------------------

    def login_page(self, request: Request) -> Response:
        nxt = _next_path(request.query_params.get("next"))
        return self.render(request, "login.html", next=nxt, failed=False, configured=self.operators.any)

    async def login(self, request: Request) -> Response:
        form = await self.form(request)
        nxt = _next_path(_field(form, "next"))
        name = self.operators.login(_field(form, "username"), _field(form, "password"))
        if name is None:
            self.refuse("login")
            log.warning("web: failed login for %r from %s", _field(form, "username")[:64], _client(request))
            return self.render(request, "login.html", 401, next=nxt, failed=True, configured=self.operators.any)
        # A new session on login: whatever the old cookie held (its CSRF token too) is not carried over.
        request.session.clear()
        request.session["operator"] = name
        request.session["flash"] = f"logged in as {name}"
        log.info("operator %s logged in from %s", name, _client(request))
        return RedirectResponse(nxt, 303)

    async def logout(self, request: Request) -> Response:
        await self.form(request)
        name = request.session.get("operator")
        request.session.clear()
        if name:
            log.info("operator %s logged out", name)
        return RedirectResponse("/", 303)

    async def form(self, request: Request, operator: bool = False) -> Any:
        """The POSTed form, refused with 403 without this session's CSRF token (and 401 without an
        operator, if ``operator``)."""
        try:
            form = await request.form(max_files=1, max_fields=20)
        except Exception as exc:  # python-multipart raises several kinds for a malformed body
            self.refuse("form")
            raise BadRequest(f"unreadable form: {exc}") from None
        if not auth.csrf_ok(request, form.get("csrf_token"), self.operators):
            self.refuse("csrf")
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and send the form again")
        if operator and self.who(request) is None:
            self.refuse("login")
            raise HTTPException(401, "operator actions need a login")
        return form

    # -- operator actions ----------------------------------------------------------------

    async def action(self, request: Request, do: Callable[..., str], where: Callable[[Any], str]) -> Response:
        """Check the form and the operator, run ``do(form, operator)`` in the thread pool, say what it did."""
        form = await self.form(request, operator=True)
        who = self.who(request)
        assert who is not None
        try:
            said = await run_in_threadpool(do, form, who)
        except (NotFound, TemplateError, P3SError) as exc:
            code = 404 if isinstance(exc, NotFound) else (400 if isinstance(exc, TemplateError) else 409)
            self.refuse("action")
            log.info("operator %s: refused: %s", who, exc)
            return self.error(request, code, str(exc))
        self.changed()
        request.session["flash"] = said
        return RedirectResponse(where(form), 303)

    def _edit(self, fn: Callable[..., Any], *args: Any) -> Any:
        with Session(self.engine) as session, session.begin():
            return fn(session, *args)

    def do_import(self, form: Any, who: str) -> str:
        from p3s.dagengine import TemplateLimits, parse_graphml

        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise TemplateError("choose a GraphML file to import")
        limits = TemplateLimits(**dataclasses.asdict(self.settings.templates))
        upload.file.seek(0)
        data = upload.file.read(limits.max_bytes + 1)
        name = _field(form, "name").strip() or None
        # Without a name given or in the graph: the file's, as "tpc_dqm" for tpc_dqm.graphml.
        stem = Path(upload.filename or "").name.split(".", 1)[0] or None
        tpl = parse_graphml(data, name=name, limits=limits, default_name=stem)
        (line,) = self._edit(admin.import_templates, [tpl])
        log.info("operator %s imported template %s: %s", who, tpl.name, line)
        return line

    def do_delete(self, name: str) -> Callable[[Any, str], str]:
        def do(form: Any, who: str) -> str:
            self._edit(admin.delete_template, name)
            log.info("operator %s deleted template %s", who, name)
            return f"template {name}: deleted; no new workflows will be made from it"

        return do

    def do_priority(self, form: Any, who: str) -> str:
        template, node = _field(form, "template"), _field(form, "node")
        text = _field(form, "priority").strip()
        if not text.lstrip("-").isdigit() or len(text) > 3:
            raise TemplateError(f"priority must be a whole number from 0 to 9, got {text[:16]!r}")
        self._edit(admin.set_priority, template, node, int(text))
        log.info("operator %s set priority of %s/%s to %s", who, template, node, text)
        return f"stage {template}/{node}: priority {text} for tasks enqueued from now on"

    def do_cancel(self, what: str, ident: int) -> Callable[[Any, str], str]:
        def do(form: Any, who: str) -> str:
            from p3s.dispatcher import cancel

            result = cancel.cancel_and_tell(Session(self.engine), self.settings, what, ident,
                                            in_process=self.beside_pipeline)
            log.info("operator %s cancelled %s %s", who, what, ident)
            return "; ".join(result.lines())

        return do

    async def import_template(self, request: Request) -> Response:
        return await self.action(request, self.do_import, lambda form: "/templates")

    async def delete_template(self, request: Request) -> Response:
        name = request.path_params["name"]
        return await self.action(request, self.do_delete(name), lambda form: "/templates")

    async def set_priority(self, request: Request) -> Response:
        return await self.action(request, self.do_priority,
                                 lambda form: f"/templates/{quote(_field(form, 'template'), safe='')}#priorities")

    async def cancel_workflow(self, request: Request) -> Response:
        ident = path_id(request)
        return await self.action(request, self.do_cancel("workflow", ident), lambda form: f"/workflows/{ident}")

    async def cancel_job(self, request: Request) -> Response:
        ident = path_id(request)
        return await self.action(request, self.do_cancel("job", ident), lambda form: f"/jobs/{ident}")

    # -- the route table -----------------------------------------------------------------

    def routes(self) -> list[Any]:
        from p3s.web.results import results_routes  # it imports this module

        return [
            *self.pair("/", "overview.html", self.overview, self.overview_page),
            *self.pair("/status", "status.html", self.status),
            *self.pair("/files", "files.html", self.files, self.filters_page),
            *self.pair("/workflows", "workflows.html", self.workflows, self.filters_page),
            *self.pair("/workflows/{id}", "workflow.html", self.workflow, self.workflow_page),
            Route("/workflows/{id}/dag.svg", self.viewer(self.workflow_dag)),
            Route("/workflows/{id}/cancel", self.cancel_workflow, methods=["POST"]),
            *self.pair("/jobs", "jobs.html", self.jobs, self.filters_page),
            Route("/jobs/{id}", self.viewer(self.job_page)),
            Route("/api/jobs/{id}", self.api_of(self.job)),
            Route("/jobs/{id}/cancel", self.cancel_job, methods=["POST"]),
            *self.pair("/pilots", "pilots.html", self.pilots, self.pilots_page),
            *self.pair("/templates", "templates.html", self.templates, self.templates_page),
            Route("/templates/import", self.import_template, methods=["POST"]),
            Route("/templates/{name}", self.viewer(self.template_page)),
            Route("/templates/{name}/graphml", self.viewer(self.template_graphml)),
            Route("/templates/{name}/dag.svg", self.viewer(self.template_svg)),
            Route("/templates/{name}/delete", self.delete_template, methods=["POST"]),
            *self.pair("/priorities", "priorities.html", self.priorities),
            Route("/priority", self.set_priority, methods=["POST"]),
            *self.pair("/sampling", "sampling.html", self.sampling),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/healthz", self.healthz),
            Route("/openapi.json", self.openapi),
            *results_routes(self),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]

    def templates_page(self, request: Request, data: Any) -> dict[str, Any]:
        return {"priorities": self.read(admin.list_priorities), "all": Params(request).flag("all")}

    def api_of(self, fn: Callable[[Request], Any]) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            if not self.may_view(request):
                self.refuse("login")
                return JSONResponse({"error": "log in to view (web.anonymous_view is false)", "status": 401}, 401)
            return self.shared(request, lambda: JSONResponse(fn(request)))

        return endpoint


class _LazyCsrf:
    """The session's CSRF token, made only if a template shows it: a page without a form sets no cookie."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def __str__(self) -> str:
        return auth.csrf_token(self.request)

    def __html__(self) -> str:
        return str(self)


def _field(form: Any, name: str) -> str:
    value = form.get(name)
    if not isinstance(value, str):
        return ""
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{name}: at most {MAX_TEXT} characters")
    return value


def _next_path(text: str | None) -> str:
    """Where to go after login: a path on this site only (never ``//host`` or a URL)."""
    if not text or not text.startswith("/") or text.startswith("//") or "\\" in text or len(text) > MAX_TEXT:
        return "/"
    return text


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def create_app(settings: Settings, *, engine: Engine | None = None, broker_counts: bool = True,
               beside_pipeline: bool = False) -> Starlette:
    """The web service over ``engine`` (default: the configured database); ``broker_counts`` false
    leaves queue depths unasked (tests without a broker); ``beside_pipeline``: it runs in the pipeline's
    process (``p3s run --web``), whose pilots it may tell to stop a payload even on the embedded broker."""
    from p3s import db

    if engine is None:
        engine = db.make_engine(settings.database_url)
    web = Web(settings, engine, broker_counts, beside_pipeline)

    def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 400:
            web.refuse("parameter")
        return web.error(request, exc.status_code, str(exc.detail))

    def not_found(request: Request, exc: Exception) -> Response:
        return web.error(request, 404, str(exc))

    def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("web: database error on %s: %s", request.url.path, exc)
        return web.error(request, 503, "the database does not answer; try again shortly")

    app = Starlette(
        routes=web.routes(),
        # SameSite=Lax, not Strict: a shifter arriving by a link from elsewhere keeps the session (a Strict
        # cookie would not be sent, and the page's fresh CSRF token would replace the operator's session).
        # Forms are guarded by their CSRF token, not by the cookie's SameSite.
        middleware=[Middleware(SessionMiddleware, secret_key=auth.secret_key(settings), session_cookie="p3s_session",
                               max_age=SESSION_MAX_AGE_S, same_site="lax", https_only=False)],
        exception_handlers={HTTPException: http_error, NotFound: not_found, OperationalError: unavailable},
    )
    app.state.web = web
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, ending normally on SIGTERM or Ctrl-C.

    uvicorn raises the signal again once it has shut down, so ``p3s web``
    would end as killed by it (status 143) however cleanly it stopped;
    p3s's parts end with status 0 after a clean stop.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # beside the pipeline (p3s run --web): the main thread's handlers stop it
            return
        before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)


class WebServer:
    """The service under uvicorn, run in a thread beside the pipeline (``p3s run --web``, ``p3s demo --web``).

    Setting ``should_stop`` (as :class:`p3s.app.Group` does for every part) makes it finish its
    requests and return.
    """

    def __init__(self, settings: Settings, bind: str | None = None, engine: Engine | None = None,
                 beside_pipeline: bool = False) -> None:
        from p3s.config import split_bind

        self.host, self.port = split_bind(bind or settings.web.bind, "--bind" if bind else "web.bind")
        app = create_app(settings, engine=engine, beside_pipeline=beside_pipeline)
        config = uvicorn.Config(app, **_uvicorn_options(self.host, self.port))
        self.server = _Server(config)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def should_stop(self) -> bool:
        return bool(self.server.should_exit)

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.server.should_exit = value

    def run(self) -> None:
        log.info("web: serving on %s", self.url)
        try:
            self.server.run()
        except SystemExit:
            # uvicorn logs why (the port taken, say) and exits: the caller must hear of it, not exit.
            raise P3SError(f"web: cannot serve on {self.host}:{self.port} (see the error above)") from None


def serve(settings: Settings, bind: str | None = None) -> int:
    """Run the service with uvicorn until SIGTERM or Ctrl-C (uvicorn's own handlers, in the main thread).

    With ``web.workers`` above one, uvicorn's supervisor runs that many worker
    processes on one listening socket, each its own application made by
    :func:`worker_app` from the same settings (the file in ``$P3S_CONFIG`` and
    the ``P3S_*`` variables), and starts a worker again if one dies.
    """
    from p3s import db
    from p3s.config import split_bind

    host, port = split_bind(bind or settings.web.bind, "--bind" if bind else "web.bind")  # before the database
    db.check_schema(settings.database_url)
    if settings.web.workers == 1:
        server = WebServer(settings, bind)
        _quiet_collector()
        server.run()
        return 0
    # What the workers read their settings from: the same file and variables as this process.
    os.environ["P3S_CONFIG"] = settings.source_file
    os.environ["P3S_LOG_LEVEL"] = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    log.info("web: serving on http://%s:%d/ with %d worker processes", host, port, settings.web.workers)
    try:
        uvicorn.run(f"{__name__}:worker_app", factory=True, workers=settings.web.workers, **_uvicorn_options(host, port))
    except SystemExit:
        raise P3SError(f"web: cannot serve on {host}:{port} (see the error above)") from None
    return 0


def worker_app() -> Starlette:
    """One worker process's application (``web.workers`` > 1): the settings read again, as ``p3s web`` read them."""
    from p3s.cli import log_to_stderr
    from p3s.config import load_settings

    log_to_stderr(os.environ.get("P3S_LOG_LEVEL") or "INFO")
    app = create_app(load_settings())
    _quiet_collector()
    return app


# Allocations between two collections of the youngest generation (CPython's default: 700).
YOUNG_COLLECTION_EVERY = 50_000


def _quiet_collector() -> None:
    """Keep Python's cycle collector from stalling a burst of requests: a process serving only the web.

    Everything the application holds once it is built (modules, the ORM's
    mappings, the compiled templates) is moved out of the collector's sight
    (``gc.freeze``), and the youngest generation is collected after 50 000
    allocations instead of 700.  With CPython's defaults, fifty clients asking
    at once made the collector walk the heap repeatedly, and every request in
    flight waited for it: bench/web.py saw the 95th percentile of pages that
    touch no database (``/healthz``, ``/openapi.json``) at 159 and 240 ms against a
    median of 35 and 28 ms, and at 43 and 28 ms with this (bench/RESULTS.md, section 10).
    Reference counting frees almost everything a request makes; only cycles
    wait for the rarer collections.  Not done beside the pipeline
    (``p3s run --web``), whose parts share the process.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, 100, 1000)


def _uvicorn_options(host: str, port: int) -> dict[str, Any]:
    return {"host": host, "port": port, "log_level": "warning", "access_log": False, "proxy_headers": False,
            "timeout_graceful_shutdown": 5}
