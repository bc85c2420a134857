"""sharded evaluations: a shard is a job of kind "shard" under its evaluation job

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(32), sa.ForeignKey("jobs.id", name="fk_jobs_parent_id_jobs")))
        batch.add_column(sa.Column("shard_index", sa.Integer))
        batch.add_column(sa.Column("shard_count", sa.Integer))
        batch.create_index("ix_jobs_parent_id", ["parent_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_parent_id")
        batch.drop_column("shard_count")
        batch.drop_column("shard_index")
        batch.drop_column("parent_id")
