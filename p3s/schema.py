"""What the migration scripts say about the schema, read from their text without Alembic or SQLAlchemy.

A read-only command only needs the name of the newest revision to tell
whether the database is current; importing Alembic's ScriptDirectory (and
with it every script and SQLAlchemy) would cost more than the command.
"""

from __future__ import annotations

import re
from pathlib import Path

from p3s.errors import ConfigError, DatabaseUnavailable

VERSIONS = Path(__file__).parent / "migrations" / "versions"
HINT = "run p3s db upgrade"

_REVISION_RE = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*(None|[\"'][^\"']*[\"'])", re.MULTILINE)


def script_head() -> str:
    """The newest revision among the migration scripts.

    A linear history: the head is the one revision that no other script
    names as its ``down_revision``.
    """
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in VERSIONS.glob("*.py"):
        found = dict(m.groups() for m in _REVISION_RE.finditer(path.read_text()))
        if "revision" not in found:
            continue
        revisions.add(found["revision"].strip("\"'"))
        down = found.get("down_revision", "None")
        if down != "None":
            revised.add(down.strip("\"'"))
    heads = revisions - revised
    if len(heads) != 1:
        raise ConfigError(f"the migration scripts have {len(heads)} heads: {sorted(heads)}")
    return heads.pop()


def require_current(where: str, current: str | None) -> None:
    """Raise DatabaseUnavailable unless the database ``where`` (a masked URL) is at the scripts' head."""
    if current is None:
        raise DatabaseUnavailable(f"the database at {where} has no p3s schema: {HINT}")
    head = script_head()
    if current != head:
        raise DatabaseUnavailable(f"the database at {where} is at schema revision {current}, this p3s needs {head}: {HINT}")


def missing_file(where: str) -> DatabaseUnavailable:
    """The error for an SQLite file that is not there: read-only commands never create it."""
    return DatabaseUnavailable(f"the database at {where} does not exist yet: {HINT}")
