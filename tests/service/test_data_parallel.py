"""A train job with ``devices`` > 1 trains with DistributedDataParallel on the worker that
takes it (gloo processes on a CPU worker), on Postgres + Redis + S3."""

from __future__ import annotations

import pytest

from tests.service.conftest import dataset_location

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_train_job_on_two_devices(live_service, synthetic_root):
    svc = live_service("servers", workers=1)
    r = svc.client.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic",
                                              "location": dataset_location(svc, "servers", synthetic_root)})
    dataset = r.json()["id"]
    r = svc.client.post("/v1/jobs", json={"kind": "train", "dataset_id": dataset, "defence": "none", "epochs": 2,
                                          "batch_size": 5, "devices": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "batch_size"
    r = svc.client.post("/v1/jobs", json={"kind": "train", "dataset_id": dataset, "defence": "at-rs",
                                          "attack": {"steps": 2}, "epochs": 2, "batch_size": 6, "devices": 2})
    assert r.status_code == 202, r.text
    done = svc.wait_job(r.json()["id"], timeout=240)
    assert done["status"] == "succeeded", (done, svc.worker_logs())
    model = svc.client.get(f"/v1/models/{done['outputs']['model_id']}").json()
    assert model["config"]["data_parallel"]["world_size"] == 2
    assert [h["epoch"] for h in model["config"]["history"]] == [1, 2]
