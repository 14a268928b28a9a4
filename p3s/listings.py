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

from p3s import rows as build
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
        f"SELECT {', '.join(build.FILE_COLUMNS)} FROM files ORDER BY id DESC LIMIT ?", (limit,)
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
    return [build.file_row(r, counts.get(r["id"], 0)) for r in rows]


def _workflows(connection: sqlite3.Connection, limit: int = 100, state: str | None = None) -> list[Row]:
    where, params = _where(("w.state", state))
    rows = connection.execute(
        f"SELECT {_qualified('w', build.WORKFLOW_COLUMNS)}, f.path"
        f" FROM workflows w JOIN files f ON w.file_id = f.id{where} ORDER BY w.id DESC LIMIT ?",
        (*params, limit),
    )
    return [build.workflow_row(r) for r in rows]


def _jobs(
    connection: sqlite3.Connection, limit: int = 100, state: str | None = None, workflow_id: int | None = None
) -> list[Row]:
    where, params = _where(("j.state", state), ("j.workflow_id", workflow_id))
    rows = connection.execute(
        f"SELECT {_qualified('j', build.JOB_COLUMNS)}, f.path, w.seen_at"
        " FROM jobs j JOIN workflows w ON j.workflow_id = w.id JOIN files f ON w.file_id = f.id"
        f"{where} ORDER BY j.id DESC LIMIT ?",
        (*params, limit),
    )
    return [build.job_row(r) for r in rows]


def _templates(connection: sqlite3.Connection, include_deleted: bool = False) -> list[Row]:
    rows = connection.execute(
        f"SELECT {', '.join(build.TEMPLATE_COLUMNS)},"
        " coalesce(json_array_length(spec, '$.nodes'), 0) AS nodes FROM templates ORDER BY name, version"
    )
    return build.template_rows(rows, include_deleted)


def _qualified(table: str, columns: tuple[str, ...]) -> str:
    return ", ".join(f"{table}.{column}" for column in columns)


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
