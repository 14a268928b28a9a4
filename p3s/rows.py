"""The rows of the listings (``p3s files``, ``workflows``, ``jobs``, ``dag list`` and their ``--json``),
built from the columns a query selects.

One builder per listing, used by both readers: :mod:`p3s.dispatcher.admin`
(SQLAlchemy, any database) and :mod:`p3s.listings` (the standard library's
sqlite3, on the embedded default).  Each reader selects the columns named
here, under these names, and hands over rows that can be indexed by name
(SQLAlchemy's ``RowMapping``, ``sqlite3.Row``).  Reading columns rather than
ORM objects is also what keeps a web page of a hundred rows cheap.

This module imports nothing beyond the standard library: the embedded
default's listings must not pay for SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Row = dict[str, Any]

#: files: the listing's columns, all of table ``files``.
FILE_COLUMNS = ("id", "name", "path", "stream", "source", "decision", "by_hand", "forced", "seen_at", "reason")
#: workflows: these of table ``workflows``, and the file's ``path``.
WORKFLOW_COLUMNS = ("id", "template", "template_id", "state", "seen_at", "created_at", "deadline", "ended_at")
#: jobs: these of table ``jobs``, the file's ``path`` and the workflow's ``seen_at``.
JOB_COLUMNS = ("id", "workflow_id", "template", "node", "state", "exit_code", "log", "reason", "pilot_id",
               "priority", "queue", "deadline", "queued_at", "started_at", "ended_at")
#: templates: these of table ``templates``, and ``nodes``, the number of its stages.
TEMPLATE_COLUMNS = ("id", "name", "version", "trigger", "budget_s", "deleted_at")


def file_row(r: Mapping[str, Any], workflows: int) -> Row:
    return {
        "id": r["id"],
        "name": r["name"],
        "path": r["path"],
        "stream": r["stream"],
        "source": r["source"],
        "decision": r["decision"],
        "state": r["decision"],
        "by_hand": bool(r["by_hand"]),
        "forced": bool(r["forced"]),
        "workflows": workflows,
        "seen_at": r["seen_at"],
        "reason": r["reason"],
    }


def workflow_row(r: Mapping[str, Any]) -> Row:
    return {
        "id": r["id"],
        "template": r["template"],
        "template_id": r["template_id"],
        "file": r["path"],
        "state": r["state"],
        "seen_at": r["seen_at"],
        "created_at": r["created_at"],
        "deadline": r["deadline"],
        "ended_at": r["ended_at"],
        "latency_s": (r["ended_at"] - r["seen_at"]) if r["ended_at"] else None,
    }


def job_row(r: Mapping[str, Any]) -> Row:
    return {
        "id": r["id"],
        "workflow_id": r["workflow_id"],
        "template": r["template"],
        "node": r["node"],
        "state": r["state"],
        "file": r["path"],
        "exit_code": r["exit_code"],
        "log": r["log"],
        "reason": r["reason"],
        "pilot_id": r["pilot_id"],
        "priority": r["priority"],
        "queue": r["queue"],
        "deadline": r["deadline"],
        "queued_at": r["queued_at"],
        "started_at": r["started_at"],
        "ended_at": r["ended_at"],
        "latency_s": (r["started_at"] - r["seen_at"]) if r["started_at"] else None,
    }


def template_rows(rows: Iterable[Mapping[str, Any]], include_deleted: bool = False) -> list[Row]:
    """``rows`` ordered by name and version; without ``include_deleted``, the newest version of each
    template that is not deleted (workflows are made from the newest version only; older ones are history)."""
    rows = list(rows)
    latest = {r["name"]: r["version"] for r in rows}
    out = []
    for r in rows:
        superseded = r["version"] != latest[r["name"]]
        if (superseded or r["deleted_at"] is not None) and not include_deleted:
            continue
        out.append(
            {
                "id": r["id"],
                "name": r["name"],
                "version": r["version"],
                "state": "deleted" if r["deleted_at"] is not None else ("superseded" if superseded else "active"),
                "trigger": r["trigger"],
                "budget_s": r["budget_s"],
                "nodes": int(r["nodes"] or 0),
            }
        )
    return out
