"""DQM results: what finished jobs' manifests said, and alarms

Revision ID: 0006
Revises: 0005

``results`` holds one row per finished job that left a results manifest,
tied to its file's run and subrun, with its age and whether it came within
its template's budget; ``result_metrics`` and ``result_files`` its numbers
and the plots and files it lists (paths, sizes and checksums: the files stay
where the payload wrote them).  No foreign key ties a result to its job,
workflow or file: results are kept by their own retention, and the newest of
each category outlives the purge of its job.  ``alarms`` keeps, per template
and metric, whether the newest judged value was out of its range.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "results",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("workflow_id", sa.BigInteger(), nullable=False),
        sa.Column("template", sa.String(length=128), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("file_name", sa.String(length=512), nullable=False),
        sa.Column("stream", sa.String(length=128), nullable=False),
        sa.Column("run", sa.BigInteger(), nullable=True),
        sa.Column("subrun", sa.BigInteger(), nullable=True),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.Column("recorded_at", sa.Float(), nullable=False),
        sa.Column("age_s", sa.Float(), nullable=False),
        sa.Column("budget_s", sa.Float(), nullable=False),
        sa.Column("on_time", sa.Boolean(), nullable=False),
        sa.Column("outdir", sa.Text(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("warnings", sa.Text(), nullable=False),
        sa.UniqueConstraint("job_id"),
    )
    op.create_index("ix_results_template_run", "results", ["template", "run", "subrun"])
    op.create_index("ix_results_workflow_id", "results", ["workflow_id"])
    op.create_index("ix_results_recorded_at", "results", ["recorded_at"])
    op.create_table(
        "result_metrics",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("result_id", _ID, sa.ForeignKey("results.id", ondelete="CASCADE"), nullable=False),
        sa.Column("template", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("unit", sa.String(length=32), nullable=False),
        sa.Column("lo", sa.Float(), nullable=True),
        sa.Column("hi", sa.Float(), nullable=True),
        sa.Column("in_range", sa.Boolean(), nullable=True),
    )
    op.create_index("ix_result_metrics_result_id", "result_metrics", ["result_id"])
    op.create_index("ix_result_metrics_history", "result_metrics", ["template", "name", "result_id"])
    op.create_table(
        "result_files",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("result_id", _ID, sa.ForeignKey("results.id", ondelete="CASCADE"), nullable=False),
        sa.Column("template", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("category", sa.String(length=128), nullable=False),
        sa.Column("caption", sa.String(length=512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
    )
    op.create_index("ix_result_files_result_id", "result_files", ["result_id"])
    op.create_index("ix_result_files_category", "result_files", ["template", "category", "result_id"])
    op.create_table(
        "alarms",
        sa.Column("template", sa.String(length=128), nullable=False),
        sa.Column("metric", sa.String(length=128), nullable=False),
        sa.Column("raised", sa.Boolean(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("lo", sa.Float(), nullable=True),
        sa.Column("hi", sa.Float(), nullable=True),
        sa.Column("result_id", sa.BigInteger(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.Column("raised_at", sa.Float(), nullable=True),
        sa.Column("cleared_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("template", "metric"),
    )
    op.create_index("ix_alarms_raised", "alarms", ["raised"])


def downgrade() -> None:
    op.drop_table("alarms")
    op.drop_table("result_files")
    op.drop_table("result_metrics")
    op.drop_table("results")
