"""Process entry points behind ``robustact serve`` and ``robustact worker``.

``serve`` is the embedded, no-servers setup of ``make run``: it migrates the database,
creates an admin API key if there is no key at all (written to ``DATA_DIR/admin.key``, mode
0600), makes a small synthetic dataset available to every key (first start only), starts
one real Celery worker subprocess on the configured broker (by default kombu's SQLAlchemy
transport on a SQLite file under ``data_dir``) under a supervisor that restarts it when it
dies, runs the API with uvicorn, and stops the worker on exit. The worker dies with
``serve`` even when ``serve`` is killed (``worker.launch``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import select

from robustact.service.db import Dataset, make_engine, make_sessionmaker, migrate
from robustact.service.settings import Settings

log = logging.getLogger("robustact.runner")

SEED_DATASET = "synthetic-small"
# Small enough to synthesize in seconds and train the tiny preset for an epoch in about a
# minute on 2 CPU cores: 5 classes x 4 subjects (3 train, 1 test under X-Sub) x 3 cameras.
SEED_SPEC = dict(num_classes=5, subjects=(1, 2, 3, 4), cameras=(1, 2, 3), replications=(1,), frames=32,
                 video_size=(64, 48), seed=0)
WORKER_STOP_TIMEOUT_S = 20


def _settings(data_dir: str | Path | None) -> Settings:
    settings = Settings(data_dir=Path(data_dir)) if data_dir is not None else Settings()
    # Child processes (the worker) and anything reading Settings() later see the same values.
    os.environ.update(settings.as_env())
    return settings


class StartupError(RuntimeError):
    """A backend ``serve`` or ``worker`` needs is missing; the message says which and how to fix it."""


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_backends(settings: Settings, broker: bool = True) -> None:
    """Reach the database, the object store and (``broker``) the broker once, with short
    timeouts; raise :class:`StartupError` naming the first that fails, instead of letting a
    traceback from deep inside a driver end the process."""
    from sqlalchemy import text

    from robustact.service.store import open_store

    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        raise StartupError(f"cannot reach the database {_redacted(settings.database_url)} ({_first_line(e)}); "
                           "start it and create the database, or set ROBUSTACT_DATABASE_URL") from None
    finally:
        engine.dispose()
    try:
        open_store(settings.store_url, settings.s3_endpoint_url, settings.s3_region).ping()
    except Exception as e:
        where = f" at {settings.s3_endpoint_url}" if settings.s3_endpoint_url else ""
        raise StartupError(f"cannot use the object store {settings.store_url}{where} ({_first_line(e)}); create "
                           "the bucket and give these credentials access (AWS_* variables), or set "
                           "ROBUSTACT_STORE_URL / ROBUSTACT_S3_ENDPOINT_URL") from None
    if broker:
        from robustact.worker.celery_app import make_celery

        try:
            with make_celery(settings).connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
        except Exception as e:
            raise StartupError(f"cannot reach the broker {_redacted(settings.broker_url)} ({_first_line(e)}); "
                               "start it, or set ROBUSTACT_BROKER_URL") from None


def ensure_admin_key(settings: Settings) -> Path | None:
    """Create the first admin key when the database has no key at all; it goes to
    ``DATA_DIR/admin.key`` (mode 0600). Returns that path when a key was made."""
    from robustact.service.auth import ensure_admin_key as ensure

    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            path = ensure(session, settings.data_dir)
    finally:
        engine.dispose()
    if path is not None:
        log.warning("created an admin API key and wrote it to %s (readable by you only). Use it as "
                    "'Authorization: Bearer KEY', e.g. curl -H \"Authorization: Bearer $(cat %s)\" ...; "
                    "make more keys with `robustact keys create`", path, path)
    return path


def ensure_seed_dataset(settings: Settings) -> str | None:
    """Synthesize ``synthetic-small`` under ``data_dir/datasets`` and register it (owned by
    the first admin key, shared read-only with every key), unless a dataset of that name
    exists. With an s3:// store the files are uploaded there too, so workers on other hosts
    can read them. Returns the dataset id (None if it existed)."""
    from robustact.models.data.synth import synthesize
    from robustact.service.api.datasets import register_dataset
    from robustact.service.auth import active_admins
    from robustact.service.db import Share
    from robustact.service.schemas import DatasetCreate
    from robustact.service.store import FileStore, open_store

    engine = make_engine(settings.database_url)
    try:
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            existing = session.scalar(select(Dataset.id).where(Dataset.name == SEED_DATASET))
            if existing:
                if session.scalar(select(Share.id).where(Share.object_id == existing, Share.grantee_id.is_(None))) \
                        is None:  # registered before keys existed: give every key access, as now
                    session.add(Share(kind="dataset", object_id=existing, grantee_id=None))
                    session.commit()
                return None
            root = settings.data_dir / "datasets" / SEED_DATASET
            if not (root / "classes.txt").is_file():
                log.info("synthesizing %s into %s", SEED_DATASET, root)
                synthesize(root, **SEED_SPEC)
            location = str(root)
            store = open_store(settings.store_url, settings.s3_endpoint_url, settings.s3_region)
            if not isinstance(store, FileStore):
                store.put_dir(f"datasets/{SEED_DATASET}", root)
                location = f"{store.url}/datasets/{SEED_DATASET}"
            admins = active_admins(session)
            row = register_dataset(session, DatasetCreate(name=SEED_DATASET, format="synthetic", location=location,
                                                          protocol="xsub"), settings,
                                   owner_id=admins[0].id if admins else None)
            session.add(Share(kind="dataset", object_id=row.id, grantee_id=None))
            session.commit()
            log.info("registered dataset %s (%s) at %s", SEED_DATASET, row.id, location)
            return row.id
    finally:
        engine.dispose()


def worker_command(hostname: str | None = None, loglevel: str = "INFO") -> list[str]:
    """The command line of one worker: solo pool, one task at a time."""
    from robustact.worker.celery_app import QUEUE

    return [sys.executable, "-m", "robustact.worker.launch", "-A", "robustact.worker.celery_app", "worker", "--pool", "solo",
            "--concurrency", "1", "--queues", QUEUE, "--loglevel", loglevel,
            "--hostname", hostname or f"robustact-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]


def start_worker(settings: Settings, hostname: str | None = None, loglevel: str = "INFO",
                 log_file: str | Path | None = None) -> subprocess.Popen:
    """Start a Celery worker subprocess with ``settings`` in its environment."""
    project_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **settings.as_env(), "ROBUSTACT_PARENT_PID": str(os.getpid())}  # dies with us
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab") if log_file else None
    try:
        return subprocess.Popen(worker_command(hostname, loglevel), env=env, cwd=project_root,
                                stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def stop_worker(process: subprocess.Popen, timeout: float = WORKER_STOP_TIMEOUT_S) -> None:
    """Warm shutdown (SIGTERM: finish or abandon the current step), then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class WorkerSupervisor:
    """Keeps the embedded worker of ``serve`` running: a worker that dies (a crash, the OOM
    killer, ``kill -9``) is started again after a backoff (1 s, doubling up to
    ``MAX_BACKOFF_S``; back to 1 s once a worker has lived ``STABLE_S``). Every worker is
    started from the supervisor's own thread, which lives as long as ``serve``, so
    ``PR_SET_PDEATHSIG`` (``worker.launch``) ties it to this process."""

    MAX_BACKOFF_S = 30.0
    STABLE_S = 60.0
    POLL_S = 0.5

    def __init__(self, settings: Settings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> "WorkerSupervisor":
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            self.process = start_worker(self.settings)
            while self.process.poll() is None and not self._stop.wait(self.POLL_S):
                pass
            if self._stop.is_set():
                break
            lived = time.monotonic() - started
            backoff = 1.0 if lived >= self.STABLE_S else backoff
            log.error("the embedded worker (pid %d) exited with %s after %.0f s; starting a new one in %.0f s",
                      self.process.pid, self.process.returncode, lived, backoff)
            if self._stop.wait(backoff):
                break
            backoff = min(self.MAX_BACKOFF_S, backoff * 2)
            self.restarts += 1
        if self.process is not None:
            stop_worker(self.process)

    def stop(self) -> None:
        """Stop the worker (warm shutdown, then SIGKILL) and the supervision."""
        self._stop.set()
        self._thread.join(WORKER_STOP_TIMEOUT_S + 10)


def serve(host: str = "127.0.0.1", port: int = 8000, data_dir: str | Path | None = None,
          with_worker: bool = True) -> None:
    """Run the API (and, with ``with_worker``, one embedded Celery worker) until interrupted.

    ``data_dir`` holds the SQLite file, the file store, the embedded broker and caches
    (default: ``ROBUSTACT_DATA_DIR`` or ``./var``); the URL settings override its parts.
    """
    import uvicorn

    from robustact.service.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    check_backends(settings)
    migrate(settings.database_url)
    ensure_admin_key(settings)
    if settings.seed_dataset:
        ensure_seed_dataset(settings)
    supervisor = WorkerSupervisor(settings).start() if with_worker else None
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    finally:
        if supervisor is not None:
            supervisor.stop()


def run_worker(data_dir: str | Path | None = None, loglevel: str = "INFO", hostname: str | None = None) -> None:
    """Run one Celery worker in this process (``robustact worker``) until interrupted:
    solo pool, prefetch 1, acks late, CUDA when present. Settings from ``ROBUSTACT_*``."""
    settings = _settings(data_dir)
    check_backends(settings)
    migrate(settings.database_url)
    from robustact.worker.celery_app import app, broker_transport_options

    app.conf.update(broker_url=settings.broker_url,
                    broker_transport_options=broker_transport_options(settings.broker_url))
    app.worker_main(argv=worker_command(hostname, loglevel)[5:])
