"""GET /metrics: Prometheus text, open without a key; HTTP requests counted by route
template; job counts, durations, waits and workers read from the database rows; the queue
depth from the broker; classify latency by outcome; a backend that is dead or hangs is
reported down (``robustact_backend_up`` 0) within the read timeout, never a failed or
stalled scrape."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, update

from robustact.models.data import ntu
from robustact.service.app import create_app
from robustact.service.db import Job, Worker, utcnow
from robustact.service.metrics import READ_TIMEOUT_S
from robustact.service.settings import Settings
from tests.service.conftest import TEST_SETTINGS, authorize
from tests.service.test_bad_input import SAMPLE, _tiny_model
from robustact.worker.celery_app import TRAIN_TASK

# The API's reaper leaves the rows these tests insert alone: no heartbeat goes stale, no
# queued job is old enough to be sent again.
QUIET_REAPER = dict(heartbeat_timeout_s=600.0, outbox_grace_s=3600.0)
JOB_ROUTE = "/v1/jobs/{job_id}"
CLASSIFY_ROUTE = "/v1/models/{model_id}/classify"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    settings = Settings(**{**TEST_SETTINGS, **QUIET_REAPER, "data_dir": tmp_path_factory.mktemp("metrics")})
    with TestClient(create_app(settings)) as client:
        client.settings = settings
        authorize(client, settings)
        yield client


def scrape(client) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: {(sample name, labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def sample(samples: dict, name: str, default: float | None = None, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    if default is None:
        assert key in samples, f"no sample {name}{labels}"
    return samples.get(key, default)


def anonymous(api) -> httpx.Client:
    return httpx.Client(transport=api._transport, base_url="http://testserver")


def replace_rows(api, model, rows: list) -> None:
    with api.app.state.sessions() as session:
        session.execute(delete(model))
        session.add_all(rows)
        session.commit()


# --------------------------------------------------------------------------- HTTP


def test_metrics_is_open_and_counts_requests_by_route_template(api):
    with anonymous(api) as no_key:
        r = no_key.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        before = scrape(api)
        ids = [uuid.uuid4().hex for _ in range(3)]
        for job_id in ids:
            assert api.get(f"/v1/jobs/{job_id}").status_code == 404
        assert no_key.get(f"/v1/jobs/{ids[0]}").status_code == 401
    assert api.get(f"/no/such/path/{ids[1]}").status_code == 404
    after = scrape(api)

    def delta(status: str, handler: str = JOB_ROUTE) -> float:
        labels = dict(handler=handler, method="GET", status=status)
        return sample(after, "http_requests_total", **labels) - sample(before, "http_requests_total", 0, **labels)

    assert delta("404") == 3 and delta("401") == 1  # the key check (middleware) is counted too
    assert delta("404", handler="none") == 1  # unmatched paths share one series
    assert sample(after, "http_request_duration_seconds_count", handler=JOB_ROUTE, method="GET") >= 4
    handlers = {dict(labels).get("handler") for name, labels in after if name.startswith("http_")}
    assert "/metrics" not in handlers and not any(job_id in str(handlers) for job_id in ids)


# --------------------------------------------------------------------------- database


def test_jobs_by_status_unsent_durations_and_waits_come_from_the_rows(api):
    now = utcnow()

    def ago(seconds: float) -> dt.datetime:
        return now - dt.timedelta(seconds=seconds)

    def job(kind: str, status: str, run_s: float | None = None, wait_s: float = 2.0, **values) -> Job:
        if run_s is not None:  # started run_s + 10 s ago, finished 10 s ago
            values.update(started_at=ago(run_s + 10), finished_at=ago(10), queued_at=ago(run_s + 10 + wait_s))
        values.setdefault("sent_at", now)
        values.setdefault("queued_at", now)
        return Job(kind=kind, status=status, params={}, **values)

    replace_rows(api, Job, [
        # queued: unsent, sent, and one requeued after a lost worker (its last start precedes
        # its queueing: no wait counted yet)
        job("train", "queued", sent_at=None),
        job("train", "queued", started_at=ago(300), queued_at=ago(10)),
        job("evaluate", "queued", sent_at=None),
        job("train", "running", started_at=ago(5), queued_at=ago(65), heartbeat_at=now),
        job("train", "succeeded", run_s=30),
        job("train", "succeeded", run_s=3600),
        job("evaluate", "failed", run_s=5, wait_s=1),
        job("evaluate", "cancelled", run_s=10, wait_s=1),
        job("evaluate", "cancelled", sent_at=None, finished_at=now),  # cancelled while queued: never ran
    ])
    samples = scrape(api)

    expected = {("train", "queued"): 2, ("train", "running"): 1, ("train", "succeeded"): 2,
                ("evaluate", "queued"): 1, ("evaluate", "failed"): 1, ("evaluate", "cancelled"): 2}
    for kind in ("train", "evaluate"):
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            assert sample(samples, "robustact_jobs", kind=kind, status=status) == expected.get((kind, status), 0), \
                (kind, status)
    assert sample(samples, "robustact_jobs_unsent") == 2  # queued and unsent; the cancelled one is not queued

    name = "robustact_job_duration_seconds"
    assert sample(samples, f"{name}_count", kind="train", status="succeeded") == 2
    assert sample(samples, f"{name}_sum", kind="train", status="succeeded") == pytest.approx(3630)
    buckets = {le: sample(samples, f"{name}_bucket", kind="train", status="succeeded", le=le)
               for le in ("10.0", "30.0", "1800.0", "3600.0", "+Inf")}
    assert buckets == {"10.0": 0, "30.0": 1, "1800.0": 1, "3600.0": 2, "+Inf": 2}
    assert sample(samples, f"{name}_count", kind="evaluate", status="failed") == 1
    assert sample(samples, f"{name}_sum", kind="evaluate", status="failed") == pytest.approx(5)
    assert sample(samples, f"{name}_count", kind="evaluate", status="cancelled") == 1
    assert sample(samples, f"{name}_count", kind="train", status="failed") == 0
    finished = sum(v for (n, labels), v in samples.items() if n == f"{name}_count")
    assert finished == 4  # every finished job that ran, and only those

    name = "robustact_job_queued_seconds"
    assert sample(samples, f"{name}_count", kind="train") == 3  # running (60 s) and the two succeeded (2 s)
    assert sample(samples, f"{name}_sum", kind="train") == pytest.approx(64)
    assert sample(samples, f"{name}_bucket", kind="train", le="1.0") == 0
    assert sample(samples, f"{name}_bucket", kind="train", le="5.0") == 2
    assert sample(samples, f"{name}_count", kind="evaluate") == 2
    assert sample(samples, f"{name}_sum", kind="evaluate") == pytest.approx(2)


def test_workers_alive_and_last_seen_come_from_their_heartbeats(api):
    timeout = api.settings.heartbeat_timeout_s
    now = utcnow()
    fresh = Worker(name="celery@fresh", hostname="fresh", pid=1, seen_at=now)
    replace_rows(api, Worker, [fresh])
    samples = scrape(api)
    assert sample(samples, "robustact_workers_alive") == 1
    assert 0 <= sample(samples, "robustact_worker_last_seen_seconds", worker="celery@fresh") < 5

    with api.app.state.sessions() as session:
        session.add(Worker(name="celery@gone", hostname="gone", pid=2, seen_at=now - dt.timedelta(seconds=timeout + 60)))
        session.commit()
    samples = scrape(api)
    assert sample(samples, "robustact_workers_alive") == 1
    assert sample(samples, "robustact_worker_last_seen_seconds", worker="celery@gone") == pytest.approx(timeout + 60,
                                                                                                        abs=5)
    with api.app.state.sessions() as session:
        session.execute(update(Worker).values(seen_at=now - dt.timedelta(seconds=timeout + 1)))
        session.commit()
    samples = scrape(api)
    assert sample(samples, "robustact_workers_alive") == 0
    assert sample(samples, "robustact_worker_last_seen_seconds", worker="celery@fresh") > timeout


# --------------------------------------------------------------------------- broker


def test_queue_depth_counts_the_brokers_messages(api):
    before = scrape(api)
    assert sample(before, "robustact_backend_up", backend="database") == 1
    assert sample(before, "robustact_backend_up", backend="broker") == 1
    for _ in range(2):  # no worker consumes them
        api.app.state.celery.send_task(TRAIN_TASK, args=[uuid.uuid4().hex])
    after = scrape(api)
    assert sample(after, "robustact_queue_messages") == sample(before, "robustact_queue_messages") + 2


# --------------------------------------------------------------------------- classify


def test_classify_latency_by_outcome(api, synthetic_root):
    def count(samples, outcome: str) -> float:
        return sample(samples, "robustact_classify_seconds_count", outcome=outcome)

    r = api.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic", "location": str(synthetic_root)})
    assert r.status_code == 201, r.text
    model_id = _tiny_model(api.settings, r.json())
    files = {"video": ("a.avi", (synthetic_root / ntu.RGB_DIR / f"{SAMPLE}{ntu.VIDEO_SUFFIX}").read_bytes(),
                       "video/x-msvideo"),
             "skeleton": ("a.skeleton", (synthetic_root / ntu.SKELETON_DIR / f"{SAMPLE}{ntu.SKELETON_SUFFIX}")
                          .read_bytes(), "text/plain")}
    before = scrape(api)
    assert {count(before, o) for o in ("ok", "client_error", "busy", "error")} == {0}  # every series from the start

    assert api.post(f"/v1/models/{model_id}/classify", files=files).status_code == 200
    assert api.post(f"/v1/models/{uuid.uuid4().hex}/classify", files=files).status_code == 404
    admission = api.app.state.admission
    taken = [admission.try_enter() for _ in range(admission.capacity)]
    try:
        assert all(taken)
        full = scrape(api)
        assert api.post(f"/v1/models/{model_id}/classify", files=files).status_code == 503
    finally:
        for _ in taken:
            admission.leave()
    after = scrape(api)

    assert sample(full, "robustact_classify_inflight") == admission.capacity
    assert sample(after, "robustact_classify_inflight") == 0
    assert sample(after, "robustact_classify_rejected_total") == sample(before, "robustact_classify_rejected_total") + 1
    assert (count(after, "ok"), count(after, "client_error"), count(after, "busy"), count(after, "error")) == (1, 1, 1, 0)
    for name in ("robustact_classify_decode_seconds", "robustact_classify_inference_seconds"):
        assert sample(after, f"{name}_count") == 1  # the answered request only
        assert sample(after, f"{name}_sum") > 0
    assert sample(after, "robustact_classify_seconds_sum", outcome="ok") >= sample(
        after, "robustact_classify_decode_seconds_sum") + sample(after, "robustact_classify_inference_seconds_sum")
    assert sample(after, "http_requests_total", handler=CLASSIFY_ROUTE, method="POST", status="503") == 1


# --------------------------------------------------------------------------- outages


def timed_scrape(client) -> tuple[dict, float]:
    t0 = time.monotonic()
    samples = scrape(client)
    return samples, time.monotonic() - t0


def test_a_hanging_database_is_reported_down_without_stalling_the_scrape(api):
    release = threading.Event()

    def hanging_session():
        release.wait(60)
        raise RuntimeError("the database hung")

    reads = lambda: [t for t in threading.enumerate() if t.name == "metrics-database"]  # noqa: E731
    sessions = api.app.state.sessions
    api.app.state.sessions = hanging_session
    try:
        for _ in range(2):
            samples, elapsed = timed_scrape(api)
            assert elapsed < READ_TIMEOUT_S + 2
            assert sample(samples, "robustact_backend_up", backend="database") == 0
            assert sample(samples, "robustact_backend_up", backend="broker") == 1
            assert not any(name.startswith(("robustact_jobs", "robustact_workers")) for name, _ in samples)
            assert "robustact_queue_messages" in {name for name, _ in samples}
            assert len(reads()) == 1  # the second scrape waited for the hung read, started no other
    finally:
        api.app.state.sessions = sessions
        release.set()
    deadline = time.monotonic() + 10
    while reads() and time.monotonic() < deadline:
        time.sleep(0.05)
    samples = scrape(api)
    assert sample(samples, "robustact_backend_up", backend="database") == 1
    assert ("robustact_workers_alive", frozenset()) in samples


def test_a_dead_broker_is_reported_down_and_metrics_still_answer(tmp_path):
    settings = Settings(**{**TEST_SETTINGS, **QUIET_REAPER, "data_dir": tmp_path,
                           "broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            samples, elapsed = timed_scrape(client)
            assert elapsed < READ_TIMEOUT_S + 2
            assert sample(samples, "robustact_backend_up", backend="broker") == 0
            assert sample(samples, "robustact_backend_up", backend="database") == 1
            assert "robustact_queue_messages" not in {name for name, _ in samples}
            assert sample(samples, "robustact_jobs", kind="train", status="queued") == 0
