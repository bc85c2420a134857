"""job groups (sweeps): the job_groups table and jobs.group_id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

SQLite: the nullable column and its foreign key are added in place (``ALTER TABLE jobs ADD
COLUMN group_id … REFERENCES job_groups (id)``, batch mode with ``inline_references``), so
existing rows and the reports pointing at them are untouched; a separate constraint would
make batch mode recreate ``jobs``, whose old copy cannot be dropped while foreign keys are
enforced and reports reference it. The downgrade must recreate it (SQLite cannot drop a
column with a foreign key) and turns enforcement off for that.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_groups",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("grid", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("group_id", sa.String(32), sa.ForeignKey("job_groups.id"), nullable=True),
                         inline_references=True)
        batch.create_index("ix_jobs_group_id", ["group_id"])


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # Batch mode recreates ``jobs`` here; dropping the old table with enforced foreign
        # keys would check (and fail on) the reports that point at its rows. The pragma
        # takes effect when no transaction is open yet (a downgrade that starts here).
        op.execute("PRAGMA foreign_keys=OFF")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_group_id")
        batch.drop_column("group_id")  # and with it its (unnamed, inline) foreign key
    op.drop_table("job_groups")
