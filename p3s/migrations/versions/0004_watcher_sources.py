"""what each watcher says of its sources

Revision ID: 0004
Revises: 0003

``watcher_sources`` keeps the newest report of each source of each watcher
host (active or standby, healthy or not), so ``p3s status`` shows what the
watcher says instead of what the configuration on the operator's host
expects.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "watcher_sources",
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("watcher_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("stream", sa.String(length=128), nullable=False),
        sa.Column("fallback_for", sa.String(length=128), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("healthy", sa.Boolean(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=False),
        sa.Column("reported_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("host", "name"),
    )


def downgrade() -> None:
    op.drop_table("watcher_sources")
