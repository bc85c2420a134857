"""Tables (API keys, datasets, job groups, jobs, workers, models, reports, shares), engine and sessions. SQLite and Postgres share
this one code path; the schema itself is created by the Alembic migrations in
``migrations/`` (``migrate()``), never by ``create_all``.

The ``jobs`` row is the system of record of a job: status, progress, timings, error,
attempts, heartbeat and the cancel request all live there (not in a Celery result backend).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, TypeDecorator, UniqueConstraint, create_engine, event, false, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

CONNECT_TIMEOUT_S = 5
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend (SQLite would drop the timezone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class ApiKey(Base):
    """A caller of the API. Only the SHA-256 of the key is stored (keys are 256 random bits,
    so a fast hash is enough); ``prefix`` is its first characters, for people to tell keys
    apart. Every other row's ``owner_id`` is the key that created it. Keys are revoked, never
    deleted, so ownership stays on record."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Quotas; None means the service's default (settings).
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_active_sweeps: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Written by every job or sweep submission of the key before it counts its active work:
    # the row lock serialises one key's submissions, so a quota cannot be overrun by a race.
    submitted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


def _owner() -> Mapped[str | None]:
    return mapped_column(ForeignKey("api_keys.id"), index=True)


class Share(Base):
    """Read-only access to a dataset or a model for another key (``grantee_id``), or for
    every key (``grantee_id`` NULL)."""

    __tablename__ = "shares"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(10))  # dataset | model
    object_id: Mapped[str] = mapped_column(String(32), index=True)
    grantee_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IdempotencyKey(Base):
    """What a POST sent with ``Idempotency-Key`` created (``resource``: e.g. ``jobs/<id>``),
    written in the transaction that created it; the same key and request again answers with
    that resource instead of creating another (``service.idempotency``)."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner_id", "key", name="uq_idempotency_keys_owner_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    key: Mapped[str] = mapped_column(String(200))
    route: Mapped[str] = mapped_column(String(100))
    request_hash: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    format: Mapped[str] = mapped_column(String(20))
    location: Mapped[str] = mapped_column(Text)
    protocol: Mapped[str] = mapped_column(String(10))
    # {"class_names": [...], "num_samples": n, "splits": {"xsub": {"train": n, "test": n}, ...}}
    info: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    owner_id: Mapped[str | None] = _owner()  # the API key that created it (NULL: before keys existed)


class JobGroup(Base):
    """A sweep: the jobs one request launched over a grid (``/v1/sweeps``)."""

    __tablename__ = "job_groups"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(10))  # train | evaluate
    # {"preset": name or null, "base": {...}, "grid": {field: [values]}, "combinations": [{field: value}, ...]}
    grid: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    owner_id: Mapped[str | None] = _owner()  # the API key that created it (NULL: before keys existed)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(10), index=True)  # train | evaluate
    status: Mapped[str] = mapped_column(String(10), index=True, default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), index=True)  # evaluated model
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    owner_id: Mapped[str | None] = _owner()  # the API key that created it (NULL: before keys existed)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    group_id: Mapped[str | None] = mapped_column(ForeignKey("job_groups.id"), index=True)  # its sweep, if any
    # The outbox: when the job's message was last handed to the broker (NULL: not yet, or the
    # send failed). A queued job unsent for a grace period is sent again by the reaper.
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # ``attempts`` only grows (it is the ownership token of a run); a retry by a user sets
    # ``attempt_base`` to it, so the lost-worker budget counts ``attempts - attempt_base``.
    attempt_base: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When it last entered ``queued`` (created, retried, or requeued after a lost worker):
    # the start of the wait that ``queued_seconds`` measures.
    queued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=utcnow)
    # Sharded evaluations (issue 10): the evaluation job has ``shard_count`` = N > 1 and is
    # never sent itself; its N jobs of kind ``shard`` (``parent_id``, ``shard_index``) are, and
    # the last to succeed sends the merge. NULL for every other job.
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", name="fk_jobs_parent_id_jobs"), index=True)
    shard_index: Mapped[int | None] = mapped_column(Integer)
    shard_count: Mapped[int | None] = mapped_column(Integer)


class JobUnit(Base):
    """One unit of a sharded job's work (``spec``: what to do, e.g. an attack group on a
    batch of clips): the queue its shards take work from. ``shard_id`` is the shard that
    took it (NULL: nobody yet); a shard keeps its units across attempts, so a shard whose
    worker died resumes the unit it held. ``done`` once its result is in the store. Unit
    -1 is the plan's own record (``spec``: where the first stage's result is)."""

    __tablename__ = "job_units"

    parent_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", name="fk_job_units_parent_id_jobs"),
                                           primary_key=True)
    unit: Mapped[int] = mapped_column(Integer, primary_key=True)
    shard_id: Mapped[str | None] = mapped_column(String(32))
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    done: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Worker(Base):
    """A worker process seen alive: it refreshes ``seen_at`` every heartbeat interval and
    deletes its row when it stops. ``/readyz`` and ``/metrics`` read this table."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery's node name
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    job_id: Mapped[str | None] = mapped_column(String(32))  # the job it runs, if any


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    # The training job that made it (no foreign key: jobs already point at models).
    job_id: Mapped[str | None] = mapped_column(String(32), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    # The checkpoint's config.json (model config, preset, class names, normalisation, ...).
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    artifact_prefix: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    owner_id: Mapped[str | None] = _owner()  # the API key that created it (NULL: before keys existed)


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    artifact_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    owner_id: Mapped[str | None] = _owner()  # the API key that created it (NULL: before keys existed)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and enforced foreign keys so
    the API and the worker process can share one file."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # A connect timeout, so that a Postgres that does not answer fails a request (503) instead
    # of hanging it.
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str):
    """An Alembic config for the migrations of this package, targeting ``url``."""
    from alembic.config import Config

    from robustact import migrations

    cfg = Config()
    # __path__, not __file__: an editable install may expose the folder as a namespace package.
    cfg.set_main_option("script_location", next(iter(migrations.__path__)))
    cfg.attributes["database_url"] = url
    return cfg


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block: one
    process at a time on this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Key of the Postgres advisory lock held while migrating (any constant no other code uses).
MIGRATION_LOCK_KEY = 0x726F627573746163  # "robustac"


@contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """Held while Alembic runs (``migrations/env.py``), so that N processes starting together
    (an API and its workers) migrate one at a time: the first upgrades, the others then find
    the schema at head. Postgres: a session advisory lock on a connection of its own;
    SQLite: an exclusive ``flock`` on ``<database file>.migrate.lock``; other backends: none."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if not path or path == ":memory:":
            yield
            return
        with file_lock(Path(path + ".migrate.lock")):
            yield
        return
    if not url.startswith("postgresql"):
        yield
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` with Alembic (creates it from empty)."""
    from alembic import command

    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that is always closed (a FastAPI dependency shape)."""
    with factory() as session:
        yield session
