"""indexes for the web monitor's pages on a long history

Revision ID: 0005
Revises: 0004

The web pages list the newest rows first under a filter (files by decision,
workflows by state and template, jobs by state, template and pilot) and count
recent rows by time (files received in the last minute to day, by decision; workflows that ended in the last hour).  On a million jobs each of
these must read a few index pages, not a table, so:

* filters that list newest first get ``(filter..., id)`` indexes: PostgreSQL
  then walks the index backwards and stops at the page's limit, whatever the
  filter's share of the rows.  Each replaces the single-column index on the
  same leading column, which it covers.
* counts by time received and decision get a ``(received_at, decision)``
  index, so they are answered from the index alone.
* workflows get an index on ``ended_at`` (the on-time share and latency of
  the last hour).  Jobs' recent figures go by ``created_at``, indexed already.
* a search for a part of a file's name (``LIKE '%12%'``) can only use a
  trigram index, made on PostgreSQL when the ``pg_trgm`` extension is
  installed or can be (it is a trusted extension: the owner of the database
  may create it).  Without it the migration goes on and says so: the search
  still works, by reading the table, as it does on SQLite.

On PostgreSQL the indexes are built by CREATE INDEX in the migration's
transaction, which holds writes to the tables meanwhile: on a million jobs
(bench/web.py) that took 37 s on a busy two-core machine, so stop the
dispatchers for the upgrade of a large history.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

# (index name, table, columns): the same on every database, and declared in p3s/db.py.
INDEXES = [
    ("ix_files_received_decision", "files", ["received_at", "decision"]),
    ("ix_files_decision_newest", "files", ["decision", "id"]),
    ("ix_workflows_state_newest", "workflows", ["state", "id"]),
    ("ix_workflows_template_state_newest", "workflows", ["template", "state", "id"]),
    ("ix_workflows_ended_at", "workflows", ["ended_at"]),
    ("ix_jobs_state_newest", "jobs", ["state", "id"]),
    ("ix_jobs_template_newest", "jobs", ["template", "id"]),
    ("ix_jobs_pilot_newest", "jobs", ["pilot_id", "id"]),
]

# Single-column indexes of revision 0001 that an index above covers (same leading column).
REPLACED = [
    ("ix_files_received_at", "files", ["received_at"]),
    ("ix_files_decision", "files", ["decision"]),
    ("ix_workflows_state", "workflows", ["state"]),
    ("ix_workflows_template", "workflows", ["template"]),
    ("ix_jobs_pilot_id", "jobs", ["pilot_id"]),
]

TRIGRAM_INDEX = "ix_files_name_trgm"


def _trigrams(bind: sa.engine.Connection) -> bool:
    """True if pg_trgm is installed, or could be installed now; a refusal leaves the transaction usable."""
    if bind.scalar(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")):
        return True
    if not bind.scalar(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")):
        log.warning("pg_trgm is not available on this server: searching files by a part of the name reads the table")
        return False
    try:
        with bind.begin_nested():
            bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
    except sa.exc.DBAPIError as exc:
        log.warning(
            "cannot create the pg_trgm extension (%s): searching files by a part of the name reads the table "
            "(a superuser's CREATE EXTENSION pg_trgm before this upgrade gives the index)",
            str(exc.orig).strip().splitlines()[0],
        )
        return False
    return True


def upgrade() -> None:
    bind = op.get_bind()
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    for name, table, _columns in REPLACED:
        op.drop_index(name, table_name=table)
    if bind.dialect.name == "postgresql" and _trigrams(bind):
        op.create_index(
            TRIGRAM_INDEX, "files", ["name"], postgresql_using="gin", postgresql_ops={"name": "gin_trgm_ops"}
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Made only where pg_trgm could be had.  The extension stays: other schemas may use it.
        op.execute(f"DROP INDEX IF EXISTS {TRIGRAM_INDEX}")
    for name, table, columns in REPLACED:
        op.create_index(name, table, columns)
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
