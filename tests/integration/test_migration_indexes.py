"""Migration 0005 (the web pages' indexes) on PostgreSQL: what the models say, the trigram index
for searching a part of a file's name, and a clean way back."""

from __future__ import annotations

import psycopg
import pytest

from tests.unit.test_migration_indexes import TRIGRAM_INDEX, check_round_trip

pytestmark = pytest.mark.postgres


def index_definitions(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'files'").fetchall()
    return dict(rows)


def test_0005_matches_the_models_and_downgrades_on_postgresql(database_url: str) -> None:
    head = check_round_trip(database_url)
    assert ("ix_jobs_state_newest", ("state", "id")) in head["jobs"]
    defs = index_definitions(database_url)
    assert "USING gin" in defs[TRIGRAM_INDEX] and "gin_trgm_ops" in defs[TRIGRAM_INDEX]
