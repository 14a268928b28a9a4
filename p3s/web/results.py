"""The Results pages: DQM results per template, a run's look back, a metric's history, two runs compared.

Data comes from :mod:`p3s.results.query`, so ``/api/results`` is
``p3s results --json`` and ``/api/alarms`` is ``p3s results --alarms --json``.
The plots and files a result lists are served from ``/results/files/{id}``
only through :func:`p3s.results.query.file_on_disk`, which judges the path
again (inside the job's output directory, a regular file, no symlink out).
What a payload wrote is never served as an active document: a type from a
short list by the file's suffix, ``nosniff``, and a sandbox policy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from p3s.db import ResultRecord
from p3s.errors import NotFound
from p3s.results import query
from p3s.web import results_svg
from p3s.web.app import BadRequest, Params, Web

NAME_MAX = 128  # template and metric names
HISTORY_POINTS = 500
# By suffix; anything else is a download.  SVG is an image in an <img>, and the sandbox below keeps it
# inert when opened by itself.
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8", ".log": "text/plain; charset=utf-8",
               ".csv": "text/plain; charset=utf-8", ".json": "text/plain; charset=utf-8"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg"}
FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'; "
                "img-src 'self' data:; style-src 'unsafe-inline'", "Cache-Control": "private, max-age=60"}


def templates_with_results(session: Session) -> list[dict[str, Any]]:
    """Each template that has results: how many, its newest run, when it last recorded one, its raised alarms."""
    rows = session.execute(
        select(ResultRecord.template, func.count(), func.max(ResultRecord.run), func.max(ResultRecord.recorded_at))
        .group_by(ResultRecord.template).order_by(ResultRecord.template)
    ).all()
    alarms: dict[str, int] = {}
    for alarm in query.list_alarms(session):
        alarms[alarm["template"]] = alarms.get(alarm["template"], 0) + 1
    return [{"template": t, "results": n, "newest_run": run, "recorded_at": at, "alarms": alarms.get(t, 0)}
            for t, n, run, at in rows]


def is_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


class ResultsPages:
    """The handlers, over the web service's state (its settings, engine, templates and login)."""

    def __init__(self, web: Web) -> None:
        self.web = web

    # -- parameters ---------------------------------------------------------------------

    def _name(self, request: Request, key: str) -> str:
        value = request.path_params[key]
        if not value or len(value) > NAME_MAX or "\x00" in value:
            raise BadRequest(f"{key}: 1 to {NAME_MAX} characters")
        return value

    def _run(self, request: Request, key: str) -> int | None:
        return Params(request).integer(key, None, 0)

    # -- data (each the JSON of its /api twin) --------------------------------------------

    def listing(self, request: Request) -> list[dict[str, Any]]:
        """``p3s results --json`` with its --template and --run (and --limit) filters."""
        p = Params(request)
        return self.web.read(query.list_results, template=p.text("template"), run=p.integer("run", None, 0),
                             subrun=p.integer("subrun", None, 0), limit=p.limit())

    def alarms(self, request: Request) -> list[dict[str, Any]]:
        """``p3s results --alarms --json`` (``all=1``: cleared ones too)."""
        p = Params(request)
        return self.web.read(query.list_alarms, template=p.text("template"), raised_only=not p.flag("all"))

    def index(self, request: Request) -> dict[str, Any]:
        return {"templates": self.web.read(templates_with_results), "alarms": self.web.read(query.list_alarms)}

    def template(self, request: Request) -> dict[str, Any]:
        name, run = self._name(request, "template"), self._run(request, "run")

        def collect(s: Session) -> dict[str, Any]:
            runs = query.runs(s, name)
            if not runs and not s.scalar(select(ResultRecord.id).where(ResultRecord.template == name).limit(1)):
                raise NotFound(f"no results of template {name!r}")
            return {"template": name, "run": run, "runs": runs, "newest": query.newest_by_category(s, name, run),
                    "metrics": query.metric_names(s, name), "alarms": query.list_alarms(s, template=name),
                    "results": query.list_results(s, template=name, run=run, limit=50)}

        return self.web.read(collect)

    def history(self, request: Request) -> list[dict[str, Any]]:
        name, metric = self._name(request, "template"), self._name(request, "name")
        points = self.web.read(query.metric_history, name, metric, HISTORY_POINTS)
        if not points:
            raise NotFound(f"no values of metric {metric!r} in template {name!r}")
        return points

    def compare(self, request: Request) -> dict[str, Any]:
        name = self._name(request, "template")
        a, b = self._run(request, "a"), self._run(request, "b")
        if a is None or b is None:
            raise BadRequest("a and b: the two runs to compare, as whole numbers")

        def side(s: Session, run: int) -> dict[str, Any]:
            results = query.list_results(s, template=name, run=run, limit=50)
            return {"run": run, "results": len(results), "newest": query.newest_by_category(s, name, run),
                    # Each metric's value in the run's newest result that has it.
                    "metrics": {m["name"]: {**m, "result_id": r["id"], "subrun": r["subrun"]}
                                for r in reversed(results) for m in r["metrics"]}}

        def collect(s: Session) -> dict[str, Any]:
            sides = {"a": side(s, a), "b": side(s, b)}
            if not sides["a"]["results"] and not sides["b"]["results"]:
                raise NotFound(f"no results of template {name!r} in run {a} or run {b}")
            return {"template": name, **sides, "runs": query.runs(s, name)}

        return self.web.read(collect)

    # -- pages --------------------------------------------------------------------------

    def index_page(self, request: Request) -> Response:
        return self.web.render(request, "results.html", data=self.index(request))

    def template_page(self, request: Request) -> Response:
        data = self.template(request)
        name = data["template"]
        histories = {m: results_svg.metric_history(m, self.web.read(query.metric_history, name, m, HISTORY_POINTS))
                     for m in data["metrics"]}
        run_numbers = sorted({r["run"] for r in data["runs"]}, reverse=True)
        return self.web.render(request, "results_template.html", data=data, histories=histories,
                               run_numbers=run_numbers, is_image=is_image, now=time.time())

    def history_svg(self, request: Request) -> Response:
        metric = self._name(request, "name")
        return Response(results_svg.metric_history(metric, self.history(request)), media_type="image/svg+xml",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    def compare_page(self, request: Request) -> Response:
        data = self.compare(request)
        names = sorted(set(data["a"]["metrics"]) | set(data["b"]["metrics"]))
        categories = sorted({f["category"] for side in (data["a"], data["b"]) for f in side["newest"]})
        by_category = {key: {f["category"]: f for f in data[key]["newest"]} for key in ("a", "b")}
        run_numbers = sorted({r["run"] for r in data["runs"]}, reverse=True)
        return self.web.render(request, "results_compare.html", data=data, names=names, categories=categories,
                               by_category=by_category, run_numbers=run_numbers, is_image=is_image)

    def file(self, request: Request) -> Response:
        file_id = request.path_params["id"]
        # An id past BIGINT is no file's: the database is not asked (PostgreSQL would refuse the number).
        path = self.web.read(query.file_on_disk, file_id) if file_id < 2**63 else None
        if path is None:
            self.web.refuse("result_file")
            raise NotFound(f"result file {file_id}: not on disk inside its job's output directory")
        media = MEDIA_TYPES.get(path.suffix.lower())
        headers = dict(FILE_HEADERS)
        if media is None:
            media = "application/octet-stream"
            headers["Content-Disposition"] = "attachment"
        return FileResponse(path, media_type=media, headers=headers)

    # -- routes -------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        web = self.web
        return [
            Route("/results", web.viewer(self.index_page)),
            Route("/results/files/{id:int}", web.viewer(self.file, share=False)),
            Route("/results/{template}", web.viewer(self.template_page)),
            Route("/results/{template}/compare", web.viewer(self.compare_page)),
            Route("/results/{template}/metrics/{name}.svg", web.viewer(self.history_svg)),
            Route("/api/results", web.api_of(self.listing)),
            Route("/api/alarms", web.api_of(self.alarms)),
            Route("/api/results/{template}", web.api_of(self.template)),
            Route("/api/results/{template}/compare", web.api_of(self.compare)),
            Route("/api/results/{template}/metrics/{name}", web.api_of(self.history)),
        ]


def results_routes(web: Web) -> list[Route]:
    """The Results pages' routes, for :meth:`p3s.web.app.Web.routes`."""
    return ResultsPages(web).routes()
