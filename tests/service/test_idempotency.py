"""``Idempotency-Key`` on job, sweep and dataset creation (issue 9): a retried POST returns
the first answer's resource and creates nothing, also when the retries race; the same key
with another body is a 409; keys are per API key. On SQLite and on Postgres."""

from __future__ import annotations

import threading

import pytest

from tests.service.conftest import dataset_location

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_retried_posts_create_once(backend, live_service, synthetic_root):
    svc = live_service(backend, workers=0)
    c = svc.client
    dataset = {"name": "tiny3", "format": "synthetic", "location": dataset_location(svc, backend, synthetic_root)}
    first = c.post("/v1/datasets", json=dataset, headers={"Idempotency-Key": "d-1"})
    again = c.post("/v1/datasets", json=dataset, headers={"Idempotency-Key": "d-1"})
    assert first.status_code == again.status_code == 201, again.text  # not "already exists"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert c.post("/v1/datasets", json=dataset).status_code == 409  # without a key: a second request

    body = {"kind": "train", "dataset_id": "tiny3", "epochs": 1}
    one = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "job-1"})
    two = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "job-1"})
    assert one.status_code == two.status_code == 202 and one.json()["id"] == two.json()["id"]
    assert c.get("/v1/jobs").json()["total"] == 1
    r = c.post("/v1/jobs", json={**body, "epochs": 2}, headers={"Idempotency-Key": "job-1"})
    assert r.status_code == 409 and "different request" in r.json()["detail"]
    r = c.post("/v1/sweeps", json={"kind": "train", "base": {"dataset_id": "tiny3"}, "grid": {"seed": [0, 1]}},
               headers={"Idempotency-Key": "job-1"})
    assert r.status_code == 409  # another route
    assert c.get("/v1/jobs").json()["total"] == 1

    # Racing retries: one job, every answer names it.
    answers: list = []

    def post():
        answers.append(c.post("/v1/jobs", json={**body, "seed": 7}, headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=post) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert c.get("/v1/jobs").json()["total"] == 2

    sweep = {"kind": "train", "base": {"dataset_id": "tiny3"}, "grid": {"seed": [0, 1]}}
    s1 = c.post("/v1/sweeps", json=sweep, headers={"Idempotency-Key": "s-1"})
    s2 = c.post("/v1/sweeps", json=sweep, headers={"Idempotency-Key": "s-1"})
    assert s1.status_code == s2.status_code == 202 and s1.json()["id"] == s2.json()["id"]
    assert c.get("/v1/sweeps").json()["total"] == 1 and c.get("/v1/jobs").json()["total"] == 4

    # Keys belong to the API key: another key's "job-1" is its own request.
    assert c.post(f"/v1/datasets/{first.json()['id']}/shares", json={"all": True}).status_code == 201
    other, _ = svc.key_client("other")
    mine = other.post("/v1/jobs", json=body, headers={"Idempotency-Key": "job-1"})
    assert mine.status_code == 202 and mine.json()["id"] != one.json()["id"]

    for bad in ("has space", "x" * 201):
        r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": bad})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"], r.text
