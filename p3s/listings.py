"""The embedded default's read-only listings, read through the standard library's sqlite3.

``p3s jobs``, ``p3s files``, ``p3s workflows`` and ``p3s dag list`` are what
an operator types most, and on a laptop they read one SQLite file.  Importing
SQLAlchemy's ORM alone takes longer than such a listing may (0.3 s), so on
the embedded default these four read the file directly: the same rows, keys
and order as ``p3s.dispatcher.admin``'s listings, which serve every other
database and every filter this module does not know
(``tests/unit/test_listings.py`` compares the two on one database).

Nothing here writes: the file is opened only if it exists, and a schema that
is missing or not current is the same error ``p3s.db.check_schema`` gives.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p3s import schema

PREFIX = "sqlite:///"

Row = dict[str, Any]


def sqlite_file(url: str) -> Path | None:
    """The file of a plain ``sqlite:///PATH`` URL; None for any other database or URL with options."""
    if not url.startswith(PREFIX) or "?" in url or url == PREFIX or url.endswith(":memory:"):
        return None
    return Path(url[len(PREFIX) :])


def read(url: str, listing: str, **filters: Any) -> list[Row] | None:
    """``admin.list_<listing>(session, **filters)`` read with sqlite3, or None where this module cannot.

    None means "use the general path": a database that is not a plain SQLite
    file, a listing not here, or a filter this module does not know.
    """
    path = sqlite_file(url)
    reader = _READERS.get(listing)
    if path is None or reader is None:
        return None
    known, function = reader
    if any(value is not None and name not in known for name, value in filters.items()):
        return None
    if not path.is_file():
        raise schema.missing_file(url)
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        connection.row_factory = sqlite3.Row
        schema.require_current(url, _revision(connection))
        return function(connection, **{k: v for k, v in filters.items() if k in known})
    finally:
        connection.close()


def _revision(connection: sqlite3.Connection) -> str | None:
    try:
        found = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return found[0] if found else None


def _files(connection: sqlite3.Connection, limit: int = 100) -> list[Row]:
    rows = connection.execute(
        "SELECT id, name, path, stream, source, decision, by_hand, forced, seen_at, reason"
        " FROM files ORDER BY id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    counts: dict[int, int] = {}
    ids = [r["id"] for r in rows]
    for start in range(0, len(ids), 500):  # SQLite's bound on parameters
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        counts.update(
            connection.execute(
                f"SELECT file_id, count(*) FROM workflows WHERE file_id IN ({marks}) GROUP BY file_id", chunk
            ).fetchall()
        )
    return [
        {
            "id": r["id"],
            "name": r["name"],
            "path": r["path"],
            "stream": r["stream"],
            "source": r["source"],
            "decision": r["decision"],
            "state": r["decision"],
            "by_hand": bool(r["by_hand"]),
            "forced": bool(r["forced"]),
            "workflows": counts.get(r["id"], 0),
            "seen_at": r["seen_at"],
            "reason": r["reason"],
        }
        for r in rows
    ]


def _workflows(connection: sqlite3.Connection, limit: int = 100, state: str | None = None) -> list[Row]:
    where, params = _where(("w.state", state))
    rows = connection.execute(
        "SELECT w.id, w.template, w.template_id, f.path, w.state, w.seen_at, w.created_at, w.deadline, w.ended_at"
        f" FROM workflows w JOIN files f ON w.file_id = f.id{where} ORDER BY w.id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [
        {
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
        for r in rows
    ]


def _jobs(
    connection: sqlite3.Connection, limit: int = 100, state: str | None = None, workflow_id: int | None = None
) -> list[Row]:
    where, params = _where(("j.state", state), ("j.workflow_id", workflow_id))
    rows = connection.execute(
        "SELECT j.id, j.workflow_id, j.template, j.node, j.state, f.path, j.exit_code, j.log, j.reason,"
        " j.pilot_id, j.priority, j.queue, j.deadline, j.queued_at, j.started_at, j.ended_at, w.seen_at"
        " FROM jobs j JOIN workflows w ON j.workflow_id = w.id JOIN files f ON w.file_id = f.id"
        f"{where} ORDER BY j.id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [
        {
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
        for r in rows
    ]


def _templates(connection: sqlite3.Connection, include_deleted: bool = False) -> list[Row]:
    rows = connection.execute(
        "SELECT id, name, version, trigger, budget_s, deleted_at,"
        " coalesce(json_array_length(spec, '$.nodes'), 0) AS nodes FROM templates ORDER BY name, version"
    ).fetchall()
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
                "state": "deleted" if r["deleted_at"] else ("superseded" if superseded else "active"),
                "trigger": r["trigger"],
                "budget_s": r["budget_s"],
                "nodes": r["nodes"],
            }
        )
    return out


def _where(*conditions: tuple[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """`` WHERE a = ? AND ...`` for the conditions whose value is given."""
    given = [(column, value) for column, value in conditions if value is not None]
    if not given:
        return "", ()
    return " WHERE " + " AND ".join(f"{column} = ?" for column, _ in given), tuple(v for _, v in given)


# listing -> (the filters it knows, the reader)
_READERS: dict[str, tuple[frozenset[str], Callable[..., list[Row]]]] = {
    "files": (frozenset({"limit"}), _files),
    "workflows": (frozenset({"limit", "state"}), _workflows),
    "jobs": (frozenset({"limit", "state", "workflow_id"}), _jobs),
    "templates": (frozenset({"include_deleted"}), _templates),
}
