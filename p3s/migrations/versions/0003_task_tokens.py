"""task tokens and the broker account of each pilot

Revision ID: 0003
Revises: 0002

``jobs.token_hash`` is the sha256 of the secret a job's task carries: a report
about the job is believed only with that secret.  ``pilots.user`` is the broker
account (RabbitMQ's validated user_id) a pilot registered with; its later
reports must come from the same account.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("token_hash", sa.String(length=64), nullable=True))
    with op.batch_alter_table("pilots", schema=None) as batch_op:
        batch_op.add_column(sa.Column("user", sa.String(length=128), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("pilots", schema=None) as batch_op:
        batch_op.drop_column("user")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("token_hash")
