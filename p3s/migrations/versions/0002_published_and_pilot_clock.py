"""published tasks, the pilots' own clock, broken pilots

Revision ID: 0002
Revises: 0001

``jobs.published_at`` records when the broker confirmed a job's task, so a
task committed but never confirmed can be told apart and published again.
``pilots.last_sent_at`` keeps the pilot's clock only to order its reports
(``last_seen`` is now the dispatcher's clock); ``pilots.problem`` says why a
pilot is ``broken``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("published_at", sa.Float(), nullable=True))
    # Jobs queued before this revision had their tasks published the old way.
    op.execute("UPDATE jobs SET published_at = queued_at WHERE queued_at IS NOT NULL")
    with op.batch_alter_table("pilots", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_sent_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("problem", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("pilots", schema=None) as batch_op:
        batch_op.drop_column("problem")
        batch_op.drop_column("last_sent_at")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("published_at")
