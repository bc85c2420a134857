"""API keys, ownership and shares: the api_keys and shares tables, owner_id on datasets,
job_groups, jobs, models and reports

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

Rows that exist before this revision keep ``owner_id`` NULL: only admin keys see them.
SQLite: the columns and their foreign keys are added in place, as in 0002.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

OWNED = ("datasets", "job_groups", "jobs", "models", "reports")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("max_active_sweeps", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "shares",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("object_id", sa.String(32), nullable=False),
        sa.Column("grantee_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_shares_object_id", "shares", ["object_id"])
    op.create_index("ix_shares_grantee_id", "shares", ["grantee_id"])
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("owner_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=True),
                             inline_references=True)
            batch.create_index(f"ix_{table}_owner_id", ["owner_id"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("PRAGMA foreign_keys=OFF")  # see 0002: batch mode recreates the tables
    for table in reversed(OWNED):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_owner_id")
            batch.drop_column("owner_id")
    op.drop_index("ix_shares_grantee_id", "shares")
    op.drop_index("ix_shares_object_id", "shares")
    op.drop_table("shares")
    op.drop_table("api_keys")
