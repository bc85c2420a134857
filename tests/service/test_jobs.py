"""Job lifecycle with real worker processes: cancel a queued and a running job, a failing
job does not take the worker down and can be retried, and a worker killed mid-training
leaves a job that is requeued and resumes from its last epoch checkpoint."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import time

import pytest

from robustact.models.data import ntu
from robustact.service.db import Job, make_engine, make_sessionmaker, migrate, utcnow
from robustact.service.reaper import reap_stale_jobs
from tests.service.conftest import dataset_location

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG_TRAINING = {"kind": "train", "defence": "none", "preset": "tiny", "epochs": 1000, "batch_size": 6}


def _dataset(svc, root, name="tiny3", backend="embedded") -> str:
    location = dataset_location(svc, backend, root)
    r = svc.client.post("/v1/datasets", json={"name": name, "format": "synthetic", "location": location})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _submit(svc, **body) -> dict:
    r = svc.client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def _training_step(job: dict) -> bool:
    return job["status"] == "running" and (job["progress"] or {}).get("phase") in ("train", "epoch")


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_cancel_a_queued_and_a_running_job(backend, live_service, synthetic_root):
    svc = live_service(backend)
    dataset = _dataset(svc, synthetic_root, backend=backend)
    running = _submit(svc, dataset_id=dataset, **LONG_TRAINING)
    svc.wait_job(running["id"], until=_training_step, timeout=120)
    queued = _submit(svc, dataset_id=dataset, **LONG_TRAINING)  # waits behind the running one

    r = svc.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    r = svc.client.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] and r.json()["status"] == "running"
    cancelled = svc.wait_job(running["id"], timeout=60)
    assert cancelled["status"] == "cancelled" and cancelled["outputs"]["model_id"] is None
    assert cancelled["timings"]["finished_at"] is not None

    # The worker is still there, skips the cancelled message and runs the next job.
    quick = _submit(svc, kind="train", dataset_id=dataset, defence="none", epochs=1, batch_size=6)
    assert svc.wait_job(quick["id"])["status"] == "succeeded"
    skipped = svc.client.get(f"/v1/jobs/{queued['id']}").json()
    assert skipped["status"] == "cancelled" and skipped["attempts"] == 0
    assert svc.client.post(f"/v1/jobs/{quick['id']}/cancel").status_code == 409
    assert svc.client.get("/v1/models").json()["items"][0]["job_id"] == quick["id"]  # only the finished one
    assert len(svc.client.get("/v1/models").json()["items"]) == 1


def test_failing_job_leaves_the_worker_alive_and_can_be_retried(live_service, synthetic_root, tmp_path):
    svc = live_service("embedded")
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    dataset = _dataset(svc, root, "copy")
    video = root / ntu.RGB_DIR / f"S001C001P001R001A001{ntu.VIDEO_SUFFIX}"
    good = video.read_bytes()
    video.write_bytes(b"this is not a video")

    job = _submit(svc, kind="train", dataset_id=dataset, defence="none", epochs=1, batch_size=6)
    failed = svc.wait_job(job["id"])
    assert failed["status"] == "failed" and failed["attempts"] == 1 and failed["attempts_left"] == 2
    assert "VideoDecodeError" in failed["error"] and video.name in failed["error"]
    assert failed["outputs"]["model_id"] is None and svc.client.get("/v1/models").json()["items"] == []
    assert "VideoDecodeError" in svc.client.get(f"/v1/jobs/{job['id']}/log").text
    assert svc.workers[0].poll() is None

    video.write_bytes(good)
    r = svc.client.post(f"/v1/jobs/{job['id']}/retry")
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert r.json()["attempts_left"] == 3  # a retry gives the full budget again
    retried = svc.wait_job(job["id"])
    assert retried["status"] == "succeeded" and retried["attempts"] == 2 and retried["error"] is None
    assert retried["attempts_left"] == 2
    log = svc.client.get(f"/v1/jobs/{job['id']}/log").text
    assert log.index("----- attempt 1 -----") < log.index("VideoDecodeError") < log.index("----- attempt 2 -----")
    assert svc.client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409


def test_a_cancelled_job_retried_on_the_servers_resumes_from_the_store(live_service, synthetic_root):
    """Postgres + Redis + S3: cancel a training job after its second epoch, retry it: the
    retry resumes from the epoch checkpoint in the object store and finishes every epoch."""
    svc = live_service("servers")
    dataset = _dataset(svc, synthetic_root, backend="servers")
    job = _submit(svc, kind="train", dataset_id=dataset, defence="at-rs", attack={"steps": 2}, epochs=8, batch_size=6)
    svc.wait_job(job["id"], timeout=120,
                 until=lambda j: j["status"] == "running" and (j["progress"] or {}).get("epoch", 0) >= 2)
    svc.client.post(f"/v1/jobs/{job['id']}/cancel")
    cancelled = svc.wait_job(job["id"], timeout=60)
    assert cancelled["status"] == "cancelled"
    r = svc.client.post(f"/v1/jobs/{job['id']}/retry")
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["attempts_left"] == 3
    done = svc.wait_job(job["id"], timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 2, (done, svc.worker_logs())
    log = svc.client.get(f"/v1/jobs/{job['id']}/log").text
    assert "resuming after epoch" in log.split("----- attempt 2 -----")[1]
    model = svc.client.get(f"/v1/models/{done['outputs']['model_id']}").json()
    assert [h["epoch"] for h in model["config"]["history"]] == list(range(1, 9))


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_killed_worker_job_is_requeued_and_resumes(backend, live_service, synthetic_root, tmp_path):
    svc = live_service(backend, workers=0, heartbeat_timeout_s=3.0)
    dataset = _dataset(svc, synthetic_root, backend=backend)
    first = svc.start_worker()
    svc.wait_workers(1)
    job = _submit(svc, kind="train", dataset_id=dataset, defence="at-rs", attack={"steps": 3}, epochs=12,
                  batch_size=2)
    svc.wait_job(job["id"], timeout=120,
                 until=lambda j: j["status"] == "running" and (j["progress"] or {}).get("epoch", 0) >= 2)
    os.kill(first.pid, signal.SIGKILL)  # no warm shutdown, no ack: the job row says "running"
    first.wait()
    assert svc.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    # No worker left: /readyz says so once its heartbeat is older than the timeout...
    deadline = time.monotonic() + 15
    while (ready := svc.client.get("/readyz")).status_code == 200:
        assert time.monotonic() < deadline, ready.json()
        time.sleep(0.2)
    assert ready.status_code == 503 and ready.json()["checks"]["workers"].startswith("error: NotEnoughWorkers: 0 alive")
    # ... and the API's reaper requeues the job, with no worker alive to do it.
    requeued = svc.wait_job(job["id"], until=lambda j: j["status"] == "queued", timeout=15)
    assert requeued["attempts"] == 1 and requeued["attempts_left"] == 2

    if backend == "servers":  # a worker on "another machine": no local leftover to resume from
        svc.start_worker(data_dir=tmp_path / "other-host")
    else:
        svc.start_worker()
    done = svc.wait_job(job["id"], timeout=180)
    assert done["status"] == "succeeded", (done, svc.worker_logs())
    assert done["attempts"] == 2
    assert done["timings"]["queued_seconds"] < done["timings"]["running_seconds"] + 60
    assert done["timings"]["started_at"] > requeued["timings"]["queued_at"]
    log = svc.client.get(f"/v1/jobs/{job['id']}/log").text
    first_attempt = log[log.index("----- attempt 1 -----"):log.index("----- attempt 2 -----")]
    assert '"epoch": 2' in first_attempt  # the killed attempt's log was kept (uploaded while it ran)
    assert "resuming after epoch" in log
    if backend == "servers":
        assert "from the store" in log.split("----- attempt 2 -----")[1]
    model = svc.client.get(f"/v1/models/{done['outputs']['model_id']}").json()
    assert [h["epoch"] for h in model["config"]["history"]] == list(range(1, 13))


def test_reaper_requeues_then_fails_lost_jobs(tmp_path):
    url = f"sqlite:///{tmp_path / 'reap.db'}"
    migrate(url)
    sessions = make_sessionmaker(make_engine(url))
    old = utcnow() - dt.timedelta(minutes=5)
    with sessions() as session:
        session.add_all([
            Job(id="lost1", kind="train", status="running", params={}, attempts=1, heartbeat_at=old),
            Job(id="lost3", kind="train", status="running", params={}, attempts=3, heartbeat_at=old),
            # retried by a user after 3 attempts: its budget counts from there
            Job(id="retried", kind="train", status="running", params={}, attempts=5, attempt_base=3, heartbeat_at=old),
            Job(id="lostc", kind="train", status="running", params={}, attempts=1, heartbeat_at=old,
                cancel_requested=True),
            Job(id="alive", kind="train", status="running", params={}, attempts=1, heartbeat_at=utcnow()),
        ])
        session.commit()
    requeued = []
    changed = reap_stale_jobs(sessions, timeout_s=60, max_attempts=3, requeue=lambda job: requeued.append(job.id))
    assert sorted(changed) == [("lost1", "queued"), ("lost3", "failed"), ("lostc", "cancelled"), ("retried", "queued")]
    assert sorted(requeued) == ["lost1", "retried"]
    with sessions() as session:
        assert session.get(Job, "lost3").error.startswith("worker lost")
        assert session.get(Job, "alive").status == "running"
    assert reap_stale_jobs(sessions, 60, 3, requeued.append) == []


def test_the_api_requeues_a_lost_job_when_no_worker_is_alive(live_service):
    """The reaper runs in the API process too: a job whose worker vanished is requeued within
    the heartbeat timeout even when no worker is left to notice."""
    svc = live_service("embedded", workers=0, heartbeat_timeout_s=2.0)
    with make_sessionmaker(make_engine(svc.settings.database_url))() as session:
        session.add(Job(id="lostjob", kind="train", status="running", params={}, attempts=1,
                        heartbeat_at=utcnow() - dt.timedelta(minutes=1), owner_id=svc.admin_id))
        session.commit()
    job = svc.wait_job("lostjob", until=lambda j: j["status"] != "running", timeout=15)
    assert job["status"] == "queued" and job["attempts"] == 1
