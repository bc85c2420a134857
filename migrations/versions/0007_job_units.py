"""the units of a sharded job: a queue its shards take work from

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_units",
        sa.Column("parent_id", sa.String(32), sa.ForeignKey("jobs.id", name="fk_job_units_parent_id_jobs"),
                  primary_key=True),
        sa.Column("unit", sa.Integer, primary_key=True),
        sa.Column("shard_id", sa.String(32)),
        sa.Column("spec", sa.JSON),
        sa.Column("done", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_table("job_units")
