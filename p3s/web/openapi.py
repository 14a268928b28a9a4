"""The OpenAPI 3 description of every ``/api/...`` route, written out by hand in one place.

The answers are the CLI's ``--json`` objects; their schemas here name the
keys every row has and leave the rest open, so the description stays true as
the listings grow a key.
"""

from __future__ import annotations

from typing import Any

from p3s import __version__
from p3s.states import Decision, JobState, WorkflowState

MAX_LIMIT = 1000

# OpenAPI 3.0 (which every tool reads): null is said with nullable.
_NUMBER_OR_NULL = {"type": "number", "nullable": True}
_INT_OR_NULL = {"type": "integer", "nullable": True}
_STRING_OR_NULL = {"type": "string", "nullable": True}


def _obj(required: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": sorted(required), "properties": required, "additionalProperties": True}


def _list(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


FILE = _obj({"id": {"type": "integer"}, "name": {"type": "string"}, "path": {"type": "string"},
             "stream": {"type": "string"}, "decision": {"type": "string", "enum": [d.value for d in Decision]},
             "workflows": {"type": "integer"}, "seen_at": {"type": "number"}, "reason": {"type": "string"}})
WORKFLOW = _obj({"id": {"type": "integer"}, "template": {"type": "string"}, "file": {"type": "string"},
                 "state": {"type": "string", "enum": [s.value for s in WorkflowState]},
                 "seen_at": {"type": "number"}, "deadline": {"type": "number"}, "ended_at": _NUMBER_OR_NULL,
                 "latency_s": _NUMBER_OR_NULL})
JOB = _obj({"id": {"type": "integer"}, "workflow_id": {"type": "integer"}, "template": {"type": "string"},
            "node": {"type": "string"}, "state": {"type": "string", "enum": [s.value for s in JobState]},
            "exit_code": _INT_OR_NULL, "reason": {"type": "string"}, "pilot_id": _STRING_OR_NULL,
            "started_at": _NUMBER_OR_NULL, "ended_at": _NUMBER_OR_NULL})
JOB_DETAIL = {**JOB, "required": sorted([*JOB["required"], "argv", "env", "log_tail"]),
              "properties": {**JOB["properties"], "argv": _list({"type": "string"}),
                             "env": _list({"type": "string"}),
                             "log_tail": _obj({"text": {"type": "string"}, "truncated": {"type": "boolean"},
                                               "path": _STRING_OR_NULL, "note": {"type": "string"}})}}
WORKFLOW_DETAIL = {**WORKFLOW, "required": sorted([*WORKFLOW["required"], "jobs"]),
                   "properties": {**WORKFLOW["properties"], "jobs": _list(JOB)}}
PILOT = _obj({"id": {"type": "string"}, "host": {"type": "string"}, "state": {"type": "string"},
              "job_id": _INT_OR_NULL, "jobs_done": {"type": "integer"}, "last_seen": {"type": "number"}})
TEMPLATE = _obj({"id": {"type": "integer"}, "name": {"type": "string"}, "version": {"type": "integer"},
                 "state": {"type": "string", "enum": ["active", "superseded", "deleted"]},
                 "trigger": {"type": "string"}, "budget_s": {"type": "number"}, "nodes": {"type": "integer"}})
PRIORITY = _obj({"template": {"type": "string"}, "node": {"type": "string"}, "priority": {"type": "integer"},
                 "template_priority": {"type": "integer"}, "set_at": _NUMBER_OR_NULL})
STATUS = _obj({"at": {"type": "number"}, "queues": _list({"type": "object"}), "queues_note": {"type": "string"},
               "broker_unreachable": {"type": "boolean"}, "pilots": {"type": "object"}, "files": {"type": "object"},
               "jobs": {"type": "object"}, "latency": _list({"type": "object"}),
               "on_time": _list({"type": "object"})})
OVERVIEW = _obj({"at": {"type": "number"}, "arrivals": {"type": "object"}, "on_time": _list({"type": "object"}),
                 "hops": _list({"type": "object"}), "pilots_check": _list({"type": "object"}),
                 "queues": _list({"type": "object"}), "failures": _list({"type": "object"}),
                 "latency_plot": {"type": "object"}, "status": STATUS})
SAMPLING = _obj({"window_s": {"type": "number"}, "streams": _list({"type": "object"}),
                 "patterns": _list({"type": "object"})})
ERROR = _obj({"error": {"type": "string"}, "status": {"type": "integer"}})
METRIC = _obj({"name": {"type": "string"}, "value": {"type": "number"}, "unit": {"type": "string"},
               "lo": _NUMBER_OR_NULL, "hi": _NUMBER_OR_NULL, "in_range": {"type": "boolean", "nullable": True},
               "alarm": {"type": "boolean"}})
RESULT_FILE = _obj({"id": {"type": "integer"}, "kind": {"type": "string", "enum": ["plot", "file"]},
                    "path": {"type": "string"}, "category": {"type": "string"}, "caption": {"type": "string"},
                    "size": {"type": "integer"}, "sha256": {"type": "string"}})
RESULT = _obj({"id": {"type": "integer"}, "job_id": {"type": "integer"}, "template": {"type": "string"},
               "file": {"type": "string"}, "run": _INT_OR_NULL, "subrun": _INT_OR_NULL, "seen_at": {"type": "number"},
               "recorded_at": {"type": "number"}, "age_s": {"type": "number"}, "budget_s": {"type": "number"},
               "on_time": {"type": "boolean"}, "labels": {"type": "object"}, "warnings": _list({"type": "string"}),
               "metrics": _list(METRIC), "files": _list(RESULT_FILE)})
ALARM = _obj({"template": {"type": "string"}, "metric": {"type": "string"}, "raised": {"type": "boolean"},
              "value": {"type": "number"}, "lo": _NUMBER_OR_NULL, "hi": _NUMBER_OR_NULL,
              "result_id": {"type": "integer"}, "raised_at": _NUMBER_OR_NULL, "cleared_at": _NUMBER_OR_NULL})
RESULTS_OF_TEMPLATE = _obj({"template": {"type": "string"}, "run": _INT_OR_NULL, "runs": _list({"type": "object"}),
                            "newest": _list(RESULT_FILE), "metrics": _list({"type": "string"}),
                            "alarms": _list(ALARM), "results": _list(RESULT)})
HISTORY_POINT = {**METRIC, "required": sorted([*METRIC["required"], "result_id", "run", "subrun"]),
                 "properties": {**METRIC["properties"], "result_id": {"type": "integer"}, "run": _INT_OR_NULL,
                                "subrun": _INT_OR_NULL}}
COMPARE_SIDE = _obj({"run": {"type": "integer"}, "results": {"type": "integer"}, "newest": _list(RESULT_FILE),
                     "metrics": {"type": "object", "additionalProperties": METRIC}})
COMPARE = _obj({"template": {"type": "string"}, "a": COMPARE_SIDE, "b": COMPARE_SIDE,
                "runs": _list({"type": "object"})})


def _param(name: str, schema: dict[str, Any], description: str, where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema, "description": description}


LIMIT = _param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100}, "newest N rows")
TEXT = {"type": "string", "maxLength": 512}
ID = _param("id", {"type": "integer", "minimum": 0}, "the record's id", "path")
NAME = {"type": "string", "minLength": 1, "maxLength": 128}
RESULT_TEMPLATE = _param("template", NAME, "the template whose results", "path")
RUN = {"type": "integer", "minimum": 0}


def _get(summary: str, schema: dict[str, Any], params: list[dict[str, Any]] | None = None,
         not_found: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": summary, "content": {"application/json": {"schema": schema}}},
        "400": {"description": "a parameter that cannot be used", "content": {"application/json": {"schema": ERROR}}},
        "401": {"description": "viewing needs a login (web.anonymous_view is false)",
                "content": {"application/json": {"schema": ERROR}}},
    }
    if not_found:
        responses["404"] = {"description": "no such record", "content": {"application/json": {"schema": ERROR}}}
    return {"get": {"summary": summary, "parameters": params or [], "responses": responses}}


def openapi() -> dict[str, Any]:
    """The description served at ``/openapi.json``."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "p3s web", "version": __version__,
                 "description": "The records of p3s as its command line's --json shows them."},
        "paths": {
            "/api/overview": _get("what the overview page shows; status is p3s status --json", OVERVIEW),
            "/api/status": _get("p3s status --json", STATUS),
            "/api/files": _get("p3s files --json", _list(FILE), [
                LIMIT,
                _param("name", TEXT, "part of the file name"),
                _param("decision", {"type": "string", "enum": [d.value for d in Decision]}, "only this decision"),
                _param("since", {"type": "number"}, "received at or after (seconds since the epoch)"),
                _param("until", {"type": "number"}, "received before (seconds since the epoch)"),
            ]),
            "/api/workflows": _get("p3s workflows --json", _list(WORKFLOW), [
                LIMIT,
                _param("state", {"type": "string", "enum": [s.value for s in WorkflowState]}, "only this state"),
                _param("template", TEXT, "only this template"),
            ]),
            "/api/workflows/{id}": _get("one workflow, with its jobs (p3s jobs --workflow ID --json)",
                                        WORKFLOW_DETAIL, [ID], not_found=True),
            "/api/jobs": _get("p3s jobs --json", _list(JOB), [
                LIMIT,
                _param("state", {"type": "string", "enum": [s.value for s in JobState]}, "only this state"),
                _param("template", TEXT, "only this template"),
                _param("node", TEXT, "only this stage"),
                _param("pilot", TEXT, "only jobs of this pilot"),
                _param("workflow", {"type": "integer", "minimum": 0}, "only jobs of this workflow"),
            ]),
            "/api/jobs/{id}": _get("one job: its p3s jobs --json row with argv, environment names and log tail",
                                   JOB_DETAIL, [ID], not_found=True),
            "/api/pilots": _get("p3s pilots --json", _list(PILOT), [LIMIT]),
            "/api/templates": _get("p3s dag list --json (--all with all=1)", _list(TEMPLATE), [
                _param("all", {"type": "string", "enum": ["0", "1", "true", "false"]},
                       "add superseded versions and deleted templates"),
            ]),
            "/api/priorities": _get("p3s priority list --json", _list(PRIORITY)),
            "/api/results": _get("p3s results --json (--template, --run)", _list(RESULT), [
                LIMIT,
                _param("template", TEXT, "only this template's results"),
                _param("run", RUN, "only the results of this run"),
                _param("subrun", RUN, "only the results of this subrun"),
            ]),
            "/api/alarms": _get("p3s results --alarms --json: the alarms raised now", _list(ALARM), [
                _param("template", TEXT, "only this template's alarms"),
                _param("all", {"type": "string", "enum": ["0", "1", "true", "false"]}, "cleared alarms too"),
            ]),
            "/api/results/{template}": _get(
                "a template's Results page: newest plot or file of each category, runs, metric names, alarms",
                RESULTS_OF_TEMPLATE, [RESULT_TEMPLATE, _param("run", RUN, "look back at this run")], not_found=True),
            "/api/results/{template}/compare": _get("two runs of a template side by side", COMPARE, [
                RESULT_TEMPLATE, _param("a", RUN, "the first run"), _param("b", RUN, "the second run"),
            ], not_found=True),
            "/api/results/{template}/metrics/{name}": _get(
                "a metric's values across the template's results, oldest first, with their ranges",
                _list(HISTORY_POINT), [RESULT_TEMPLATE, _param("name", NAME, "the metric", "path")], not_found=True),
            "/api/sampling": _get("configured sampling fraction per stream and the share accepted in the last hour",
                                  SAMPLING),
        },
    }
