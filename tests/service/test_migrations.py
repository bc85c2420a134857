"""Alembic upgrade from an empty database, on SQLite and on a real Postgres: the schema
it creates is exactly the one the code declares."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from robustact.service.db import Base, alembic_config, make_engine, migrate


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'empty.db'}"
    import sqlalchemy as sa

    base = request.getfixturevalue("postgres_url")
    name = f"migr_{tmp_path.name[-8:].replace('-', '_').lower()}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return base.rsplit("/", 1)[0] + f"/{name}"


def test_upgrade_from_empty(empty_database):
    migrate(empty_database)
    migrate(empty_database)  # idempotent: a second start changes nothing
    engine = make_engine(empty_database)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"datasets", "jobs", "models", "reports", "alembic_version"} <= tables
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        assert diff == []
        assert version == "0007"
    finally:
        engine.dispose()


def test_downgrade_to_empty_and_back(empty_database):
    migrate(empty_database)
    command.downgrade(alembic_config(empty_database), "base")
    engine = make_engine(empty_database)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    migrate(empty_database)


def test_concurrent_starts_migrate_once(empty_database, tmp_path):
    """Several processes starting together (an API and its workers) on an empty database:
    the migration lock lets one upgrade while the others wait, then find the schema at head.
    Without it they race to create the same tables."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = f"from service.db import migrate; migrate({empty_database!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(4)]
    outputs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(outputs)
    engine = make_engine(empty_database)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == ["0007"]
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
