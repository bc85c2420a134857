"""Data preparation as a service job (issue 10): a prepare job's shards decode groups of
samples on several worker processes into clip files in the object store, the merge
assembles the cache there, and workers then download that cache instead of decoding."""

from __future__ import annotations

import pytest

from tests.service.conftest import dataset_location

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_a_prepare_job_spreads_over_workers_and_workers_download_its_cache(backend, live_service, synthetic_root,
                                                                          tmp_path):
    from robustact.models.config import preset_config
    from robustact.models.data.cache import cache_digest, load_meta, prepare
    from robustact.service.runner import stop_worker
    from robustact.service.store import open_store

    svc = live_service(backend, workers=2, prepare_unit_samples=3)
    r = svc.client.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic",
                                              "location": dataset_location(svc, backend, synthetic_root)})
    assert r.status_code == 201, r.text
    dataset = r.json()["id"]
    r = svc.client.post("/v1/jobs", json={"kind": "prepare", "dataset_id": dataset, "shards": 2})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "prepare" and len(job["shards"]) == 2
    done = svc.wait_job(job["id"], timeout=240)
    assert done["status"] == "succeeded", (done, svc.worker_logs())
    cfg = preset_config("tiny", num_classes=3)
    cache = f"caches/{dataset}/{cfg.rgb_frames}f{cfg.rgb_size}px{cfg.skel_frames}s"
    assert done["outputs"]["cache"] == cache and done["progress"]["samples"] == 24
    shards = svc.client.get("/v1/jobs", params={"parent_id": job["id"]}).json()["items"]
    assert sum(s["progress"]["units_done"] for s in shards) == 8  # 24 samples, 3 per unit
    assert all(s["links"]["prepare"] == f"/v1/jobs/{job['id']}" for s in shards)

    # The cache in the store is, array for array, the cache ``prepare`` writes on one machine.
    store = open_store(svc.settings.store_url, svc.settings.s3_endpoint_url)
    store.download_dir(cache, tmp_path / "stored")
    prepare(synthetic_root, tmp_path / "local", cfg.rgb_frames, cfg.rgb_size, cfg.skel_frames, workers=1)
    assert cache_digest(tmp_path / "stored") == cache_digest(tmp_path / "local")
    assert load_meta(tmp_path / "stored")["num_samples"] == load_meta(tmp_path / "local")["num_samples"]
    assert not store.list(f"jobs/{job['id']}/units")  # the units' results are gone

    # A worker that has never seen the dataset downloads the cache rather than decoding.
    for process in svc.workers:
        stop_worker(process, timeout=15)
    svc.workers.clear()
    svc.start_worker(cache_dir=tmp_path / "fresh-cache")
    svc.wait_workers(1)
    train = svc.client.post("/v1/jobs", json={"kind": "train", "dataset_id": dataset, "defence": "none",
                                              "epochs": 1, "batch_size": 6}).json()
    trained = svc.wait_job(train["id"], timeout=180)
    assert trained["status"] == "succeeded", trained
    log = svc.client.get(f"/v1/jobs/{train['id']}/log").text
    assert "downloading the prepared cache" in log and "preparing" not in log, log[:3000]


def test_prepare_job_input_errors(live_service, synthetic_root):
    svc = live_service("embedded", workers=0, ready_min_workers=0)
    dataset = svc.client.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic",
                                                    "location": str(synthetic_root)}).json()["id"]
    r = svc.client.post("/v1/jobs", json={"kind": "prepare", "dataset_id": dataset, "shards": 30})
    assert r.status_code == 422 and "30 shards for 24 samples" in r.text, r.text
    r = svc.client.post("/v1/jobs", json={"kind": "prepare", "dataset_id": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["detail"], r.text
    r = svc.client.post("/v1/jobs", json={"kind": "prepare", "dataset_id": dataset, "preset": "huge"})
    assert r.status_code == 422 and "preset" in r.text
    assert svc.client.get("/v1/jobs", params={"kind": "prepare"}).json()["total"] == 0  # nothing was written
