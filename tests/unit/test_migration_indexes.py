"""Migration 0005 (the web pages' indexes) on SQLite: the models say what it makes, and it goes back cleanly.

The same checks run on PostgreSQL in tests/integration/test_migration_indexes.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from p3s import db

TABLES = ("files", "workflows", "jobs", "pilots", "templates")
# Made only on PostgreSQL, and only where pg_trgm can be had: not in the models.
TRIGRAM_INDEX = "ix_files_name_trgm"


def indexes(url: str) -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """Each table's indexes as (name, columns)."""
    engine = create_engine(db.normalise_url(url), poolclass=NullPool)
    try:
        found = inspect(engine)
        return {t: {(i["name"], tuple(i["column_names"])) for i in found.get_indexes(t)} for t in TABLES}
    finally:
        engine.dispose()


def model_differences(url: str) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match p3s/db.py's models."""
    engine = create_engine(db.normalise_url(url), poolclass=NullPool)

    def declared(obj: Any, name: str | None, kind: str, reflected: bool, other: Any) -> bool:
        return not (kind == "index" and name == TRIGRAM_INDEX)

    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_object": declared})
            return list(compare_metadata(context, db.Base.metadata))
    finally:
        engine.dispose()


def check_round_trip(url: str) -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """Upgrade to 0004, then to the head, down to 0004 and up again; returns the head's indexes."""
    db.upgrade(url, "0004")
    before = indexes(url)
    db.upgrade(url)
    assert model_differences(url) == []
    after = indexes(url)
    command.downgrade(db._alembic_config(url), "0004")
    assert indexes(url) == before
    db.upgrade(url)
    assert indexes(url) == after
    return after


def test_0005_matches_the_models_and_downgrades_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p3s.db'}"
    head = check_round_trip(url)
    # The newest-first listings have an index ending in the id for each filter.
    assert ("ix_jobs_state_newest", ("state", "id")) in head["jobs"]
    assert ("ix_jobs_pilot_newest", ("pilot_id", "id")) in head["jobs"]
    assert ("ix_workflows_template_state_newest", ("template", "state", "id")) in head["workflows"]
    assert ("ix_files_received_decision", ("received_at", "decision")) in head["files"]
    # The single-column indexes they cover are gone; a trigram index is PostgreSQL's.
    names = {name for table in head.values() for name, _ in table}
    assert not names & {"ix_jobs_pilot_id", "ix_files_decision", "ix_workflows_state", TRIGRAM_INDEX}
