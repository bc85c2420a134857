"""Fixtures of the service tests: settings for the two backends, a live API (uvicorn in a
thread) with real Celery worker subprocesses, and small synthetic data.

Backends:
* ``embedded`` — SQLite + ``file://`` store + kombu's SQLAlchemy transport on SQLite;
* ``servers``  — Postgres + Redis + S3 (moto), started on loopback by ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import sqlalchemy as sa

from robustact.service.runner import start_worker, stop_worker
from robustact.service.settings import Settings

# One torch thread per process: the API, the workers and the test runner share two cores,
# where OpenMP threads waiting on each other can make a step 50x slower.
# Datasets are registered from pytest's temp directories, so those are the dataset roots.
# One decoder child per API (each costs ~0.75 s of CPU to start and ~240 MiB).
TEST_SETTINGS = dict(heartbeat_interval_s=0.5, heartbeat_timeout_s=20.0, seed_dataset=False, device="cpu",
                     api_torch_threads=1, worker_torch_threads=1, dataset_roots=tempfile.gettempdir(),
                     decode_workers=1)


def new_key(settings: Settings, name: str = "test-admin", admin: bool = True, **quotas: Any) -> tuple[str, str]:
    """A key made directly in the service's database (as ``robustact keys create`` does):
    (key id, key)."""
    from robustact.service.auth import create_key
    from robustact.service.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            row, key = create_key(session, name, admin=admin, **quotas)
            return row.id, key
    finally:
        engine.dispose()


def authorize(client, settings: Settings, name: str = "test-admin", admin: bool = True) -> str:
    """Give ``client`` (httpx or TestClient, after the app started) a new key's header;
    returns the key id."""
    key_id, key = new_key(settings, name, admin)
    client.headers["Authorization"] = f"Bearer {key}"
    return key_id


@contextlib.contextmanager
def api_with_dataset(settings: Settings, name: str, format: str, location: str):
    """An in-process API (no worker: jobs stay queued) with an admin key and the dataset
    ``name`` registered; yields the client with ``.settings`` and ``.dataset`` (the JSON)."""
    from fastapi.testclient import TestClient

    from robustact.service.app import create_app

    with TestClient(create_app(settings)) as client:
        authorize(client, settings)
        client.settings = settings
        r = client.post("/v1/datasets", json={"name": name, "format": format, "location": location})
        assert r.status_code == 201, r.text
        client.dataset = r.json()
        yield client


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """The in-process API sets torch's thread count; give the next test module its own."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fresh_postgres_database(base_url: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return base_url.rsplit("/", 1)[0] + f"/{name}"


def make_settings(backend: str, data_dir: Path, request: pytest.FixtureRequest, **overrides: Any) -> Settings:
    values: dict[str, Any] = {**TEST_SETTINGS, "data_dir": data_dir, **overrides}
    if backend == "servers":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")("artifacts")
        servers = dict(broker_url=request.getfixturevalue("redis_url"), store_url=f"s3://{bucket}/robustact",
                       s3_endpoint_url=endpoint)
        if "database_url" not in overrides:
            servers["database_url"] = fresh_postgres_database(request.getfixturevalue("postgres_url"))
        values.update({k: v for k, v in servers.items() if k not in overrides})
        if "dataset_roots" not in overrides:  # and datasets uploaded next to the artefacts
            values["dataset_roots"] = f"{values['dataset_roots']},s3://{bucket}/robustact/datasets"
    return Settings(**values)


def dataset_location(svc: "LiveService", backend: str, root: Path) -> str:
    """Where to register the dataset at ``root``: the directory itself, or on the servers
    backend a copy uploaded under STORE_URL/datasets (a default dataset root) so that the
    workers read it from S3."""
    if backend != "servers":
        return str(root)
    from robustact.service.store import open_store

    location = f"{svc.settings.store_url}/datasets/{root.name}"
    open_store(location, endpoint_url=svc.settings.s3_endpoint_url).put_dir("", root)
    return location


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveService:
    """The API on a loopback port plus the worker subprocesses started for it."""

    settings: Settings
    url: str
    client: httpx.Client  # authenticated with an admin key (``admin_id``)
    admin_id: str = ""
    app: Any = None  # the FastAPI application, in this process
    workers: list = field(default_factory=list)
    clients: list = field(default_factory=list)

    def key_client(self, name: str, admin: bool = False, **quotas: Any) -> tuple[httpx.Client, str]:
        """A client with a new key of its own: (client, key id)."""
        key_id, key = new_key(self.settings, name, admin, **quotas)
        client = httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {key}"})
        self.clients.append(client)
        return client, key_id

    def start_worker(self, **overrides: Any):
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        log_file = self.settings.data_dir / f"worker-{len(self.workers)}.log"
        process = start_worker(settings, hostname=f"test-{len(self.workers)}-{uuid.uuid4().hex[:6]}@%h",
                               log_file=log_file)
        self.workers.append(process)
        return process

    def wait_workers(self, count: int, timeout: float = 90) -> dict:
        """Wait until ``/readyz`` reports ``count`` workers alive (their heartbeat is in the
        ``workers`` table); returns its body."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.client.get("/readyz").json()
            if body["checks"]["workers"].startswith(f"ok ({count} alive"):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} worker(s) not alive after {timeout}s: {body}\n{self.worker_logs()}")
            time.sleep(0.2)

    def worker_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-6000:] for p in sorted(self.settings.data_dir.glob("worker-*.log")))

    def wait_job(self, job_id: str, until: Callable[[dict], bool] | None = None, timeout: float = 180) -> dict:
        """Poll a job until ``until(job)`` (default: it finished)."""
        until = until or (lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        deadline = time.monotonic() + timeout
        while True:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}\n"
                                     f"{self.worker_logs()}")
            time.sleep(0.2)


@pytest.fixture
def live_service(tmp_path, request) -> Iterator[Callable[..., LiveService]]:
    """Factory ``live_service(backend, workers=1, **settings)``: the API in a thread of this
    process (uvicorn) and real Celery worker subprocesses; all stopped afterwards."""
    import uvicorn

    from robustact.service.app import create_app

    started: list[tuple[LiveService, uvicorn.Server, threading.Thread]] = []

    def make(backend: str = "embedded", workers: int = 1, **overrides: Any) -> LiveService:
        settings = make_settings(backend, tmp_path / f"data-{backend}", request, **overrides)
        port = free_port()
        app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="on"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        service = LiveService(settings, f"http://127.0.0.1:{port}",
                              httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60))
        service.admin_id = authorize(service.client, settings)
        service.app = app
        started.append((service, server, thread))
        for _ in range(workers):
            service.start_worker()
        if workers:
            service.wait_workers(workers)
        return service

    yield make
    for service, server, thread in started:
        for process in service.workers:
            stop_worker(process, timeout=15)
        for client in service.clients:
            client.close()
        service.client.close()
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny synthetic dataset: 3 classes x 4 subjects (X-Sub: 3 train, 1 test) x 2 cameras."""
    from robustact.models.data.synth import synthesize

    root = tmp_path_factory.mktemp("synthetic") / "tiny3"
    synthesize(root, num_classes=3, subjects=(1, 2, 3, 4), cameras=(1, 2), replications=(1,), frames=16,
               video_size=(32, 32), seed=1)
    return root
