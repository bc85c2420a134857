"""API keys, per-key isolation, dataset roots, quotas, body limits and admission control
(issue 8), against the live API: on SQLite + file store + embedded broker, and on Postgres +
S3 (moto) + Redis for the isolation and quota tests."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from robustact.service.app import create_app
from robustact.service.db import Report, make_engine, make_sessionmaker
from robustact.service.settings import Settings
from robustact.service.store import open_store
from tests.service.conftest import TEST_SETTINGS, authorize, dataset_location, new_key
from tests.service.test_bad_input import _tiny_model
from tests.service.test_uploads import rss_mb

pytestmark = pytest.mark.integration


def _report(settings: Settings, model_id: str, dataset_id: str, owner_id: str) -> str:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        row = Report(name="r", model_id=model_id, dataset_id=dataset_id, artifact_key=f"reports/{owner_id}.json",
                     owner_id=owner_id)
        session.add(row)
        session.commit()
        report_id = row.id
    engine.dispose()
    open_store(settings.store_url, settings.s3_endpoint_url).put_bytes(
        f"reports/{owner_id}.json", json.dumps({"schema": "robustact.report/v2"}).encode())
    return report_id


# --------------------------------------------------------------------------- every route


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path_factory.mktemp("security")})
    with TestClient(create_app(settings)) as client:
        client.settings = settings
        client.admin_id = authorize(client, settings)
        yield client


def _operations(app) -> list[tuple[str, str]]:
    ops = []
    for path, methods in app.openapi()["paths"].items():
        for method in methods:
            ops.append((method.upper(), path))
    return ops


def test_every_v1_route_needs_a_valid_key(api, tmp_path):
    """Generated from the OpenAPI document, so a route added later cannot forget it."""
    ops = [(m, p) for m, p in _operations(api.app) if p.startswith("/v1")]
    assert len(ops) >= 30
    revoked_id, revoked = new_key(api.settings, "gone", admin=True)
    assert api.delete(f"/v1/keys/{revoked_id}").status_code == 204
    headers_cases = {"none": {}, "wrong": {"Authorization": "Bearer ra_" + "x" * 43},
                     "not bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
                     "revoked": {"Authorization": f"Bearer {revoked}"}}
    for method, path in ops:
        url = path.replace("{", "").replace("}", "")  # /v1/jobs/job_id: any id
        for case, headers in headers_cases.items():
            # a raw client without the fixture's admin header
            r = httpx.Client(transport=api._transport, base_url="http://testserver").request(
                method, url, headers=headers, json={} if method in ("POST", "PATCH", "PUT") else None)
            assert r.status_code == 401, (case, method, path, r.text)
            assert "key" in r.json()["detail"] and r.headers["www-authenticate"].startswith("Bearer")
    # Health stays open; the docs too.
    assert httpx.Client(transport=api._transport, base_url="http://testserver").get("/healthz").status_code == 200
    ready = api.get("/readyz")  # open; not ready: no worker runs beside this API
    assert ready.status_code == 503 and ready.json()["checks"]["database"] == "ok"
    assert ready.json()["checks"]["workers"].startswith("error: NotEnoughWorkers: 0 alive")


def test_every_v1_route_documents_401_and_503_as_json(api):
    """Any /v1 route may answer them (the key is looked up in the database first), and as
    JSON ``{"detail"}`` also where its own answer is an HTML page."""
    paths = api.app.openapi()["paths"]
    for method, path in _operations(api.app):
        if path.startswith("/v1"):
            responses = paths[path][method.lower()]["responses"]
            for status in ("401", "503"):
                content = responses[status]["content"]
                assert list(content) == ["application/json"], (method, path, status)
                assert content["application/json"]["schema"]["required"] == ["detail"]


def test_keys_are_shown_once_and_admin_routes_need_admin(api):
    r = api.post("/v1/keys", json={"name": "bob", "max_active_jobs": 3})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["key"].startswith("ra_") and created["max_active_jobs"] == 3 and not created["admin"]
    listed = api.get("/v1/keys").json()
    assert created["id"] in [k["id"] for k in listed["items"]]
    assert created["key"] not in json.dumps(listed)  # the secret never comes back
    bob = {"Authorization": f"Bearer {created['key']}"}
    assert api.get("/v1/keys/me", headers=bob).json()["name"] == "bob"
    for method, path, body in (("POST", "/v1/keys", {"name": "eve"}), ("GET", "/v1/keys", None),
                               ("PATCH", f"/v1/keys/{created['id']}", {"max_active_jobs": 100}),
                               ("DELETE", f"/v1/keys/{api.admin_id}", None),
                               ("POST", "/v1/datasets", {"name": "x", "format": "synthetic", "location": "/tmp"})):
        r = api.request(method, path, headers=bob, json=body)
        assert r.status_code == 403, (method, path, r.text)
    # Quotas are the admin's to change; null returns to the service default.
    r = api.patch(f"/v1/keys/{created['id']}", json={"max_active_jobs": None, "max_active_sweeps": 2})
    assert r.json()["max_active_jobs"] == api.settings.max_active_jobs and r.json()["max_active_sweeps"] == 2
    # The last active admin key cannot be revoked over the API (the CLI can make a new one).
    admins = [k for k in api.get("/v1/keys", params={"revoked": False}).json()["items"] if k["admin"]]
    for key in admins[:-1]:
        if key["id"] != api.admin_id:
            assert api.delete(f"/v1/keys/{key['id']}").status_code == 204
    if len([k for k in api.get("/v1/keys", params={"revoked": False}).json()["items"] if k["admin"]]) == 1:
        r = api.delete(f"/v1/keys/{api.admin_id}")
        assert r.status_code == 409 and "last active admin" in r.json()["detail"]
    assert api.delete(f"/v1/keys/{created['id']}").status_code == 204
    assert api.get("/v1/keys/me", headers=bob).status_code == 401


# --------------------------------------------------------------------------- dataset roots


def test_dataset_locations_are_confined_to_the_roots(tmp_path, synthetic_root):
    root = tmp_path / "roots" / "allowed"
    root.mkdir(parents=True)
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "data", "dataset_roots": str(root)})
    os.symlink(synthetic_root, root / "inside")  # a real dataset inside the root, by symlink...
    escape = root / "escape"
    os.symlink(synthetic_root, escape)
    settings_inside = settings.model_copy(update={"dataset_roots": f"{root},{synthetic_root.parent}"})
    with TestClient(create_app(settings)) as client:
        authorize(client, settings)

        def register(location):
            return client.post("/v1/datasets", json={"name": "d", "format": "synthetic", "location": location})

        # ...whose target lies outside the roots: refused like any other outside location.
        answers = [register(str(p)) for p in (escape, "/etc", "/no/such/dir", f"{root}/../../../etc",
                                               f"file://{root}/../x", "s3://some-bucket/data", "relative/path")]
        for r in answers:
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["loc"] == ["body", "location"]
        texts = [r.json()["detail"][0]["msg"] for r in answers[1:3]]
        # an existing and a missing directory outside get the same answer (up to the path itself)
        assert texts[0].replace("/etc", "P") == texts[1].replace("/no/such/dir", "P")
        assert "no such" not in texts[1]
        assert client.get("/v1/datasets").json()["total"] == 0
    with TestClient(create_app(settings_inside)) as client:
        authorize(client, settings_inside)
        r = client.post("/v1/datasets", json={"name": "d", "format": "synthetic", "location": str(escape)})
        assert r.status_code == 201, r.text
        assert r.json()["location"] == str(synthetic_root)  # resolved


# --------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_objects_of_one_key_are_invisible_to_another(backend, live_service, synthetic_root):
    svc = live_service(backend, workers=0)
    admin = svc.client
    alice, alice_id = svc.key_client("alice")
    bob, bob_id = svc.key_client("bob")
    location = dataset_location(svc, backend, synthetic_root)
    r = admin.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic", "location": location})
    assert r.status_code == 201, r.text
    dataset = r.json()
    # Not shared yet: nobody but the admin sees it.
    assert alice.get("/v1/datasets").json()["items"] == []
    assert alice.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert alice.get("/v1/datasets/tiny3").status_code == 404
    r = alice.post("/v1/jobs", json={"kind": "train", "dataset_id": "tiny3"})
    assert r.status_code == 404, r.text
    assert admin.post(f"/v1/datasets/{dataset['id']}/shares", json={"key_id": alice_id}).status_code == 201
    seen = alice.get("/v1/datasets").json()["items"]
    assert [d["id"] for d in seen] == [dataset["id"]] and seen[0]["shared"] and seen[0]["location"] is None
    assert alice.delete(f"/v1/datasets/{dataset['id']}").status_code == 403  # read-only
    assert bob.get(f"/v1/datasets/{dataset['id']}").status_code == 404

    # Alice's job, sweep, model and report.
    job = alice.post("/v1/jobs", json={"kind": "train", "dataset_id": "tiny3", "epochs": 1})
    assert job.status_code == 202, job.text
    job = job.json()
    sweep = alice.post("/v1/sweeps", json={"kind": "train", "base": {"dataset_id": "tiny3"}, "grid": {"seed": [0, 1]}})
    assert sweep.status_code == 202, sweep.text
    sweep = sweep.json()
    model_id = _tiny_model(svc.settings, dataset, alice_id, "alice-model")
    report_id = _report(svc.settings, model_id, dataset["id"], alice_id)
    own = {"jobs": job["id"], "sweeps": sweep["id"], "models": model_id, "reports": report_id}
    assert alice.get(f"/v1/models/{model_id}").json()["owner_id"] == alice_id

    missing = bob.get("/v1/jobs/0123456789abcdef0123456789abcdef")
    for kind, ident in own.items():
        listed = bob.get(f"/v1/{kind}").json()
        assert listed["items"] == [] and listed.get("total", 0) == 0, (kind, listed)
        r = bob.get(f"/v1/{kind}/{ident}")
        assert r.status_code == 404 and r.json()["detail"] == missing.json()["detail"].replace(
            "0123456789abcdef0123456789abcdef", ident).replace("job", kind[:-1]), (kind, r.text)
        assert ident in json.dumps(alice.get(f"/v1/{kind}").json())
        assert admin.get(f"/v1/{kind}/{ident}").status_code == 200 or kind == "reports"
    assert admin.get(f"/v1/reports/{report_id}/meta").status_code == 200
    for method, path in (("POST", f"/v1/jobs/{job['id']}/cancel"), ("POST", f"/v1/jobs/{job['id']}/retry"),
                         ("GET", f"/v1/jobs/{job['id']}/log"), ("POST", f"/v1/sweeps/{sweep['id']}/cancel"),
                         ("GET", f"/v1/sweeps/{sweep['id']}/report"), ("DELETE", f"/v1/models/{model_id}"),
                         ("GET", f"/v1/models/{model_id}/files/config.json"), ("DELETE", f"/v1/reports/{report_id}"),
                         ("GET", f"/v1/reports/{report_id}/meta"), ("GET", f"/v1/reports/{report_id}/clips"),
                         ("GET", f"/v1/reports/compare?ids={report_id}"), ("GET", f"/v1/reports/view?ids={report_id}")):
        r = bob.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
    r = bob.post("/v1/jobs", json={"kind": "evaluate", "model_id": model_id, "dataset_id": "tiny3"})
    assert r.status_code == 404, r.text
    assert bob.get("/v1/jobs", params={"model_id": model_id}).json()["total"] == 0

    # Shared read-only: Bob may read and evaluate the model (given the data), not delete it.
    assert alice.post(f"/v1/models/{model_id}/shares", json={"key_id": bob_id}).status_code == 201
    assert admin.post(f"/v1/datasets/{dataset['id']}/shares", json={"all": True}).status_code == 201
    seen = bob.get("/v1/models").json()["items"]
    assert [m["id"] for m in seen] == [model_id] and seen[0]["shared"] and seen[0]["report_ids"] == []
    assert bob.get(f"/v1/models/{model_id}/files/config.json").status_code == 200
    assert bob.delete(f"/v1/models/{model_id}").status_code == 403
    assert bob.post(f"/v1/models/{model_id}/shares", json={"all": True}).status_code == 403
    r = bob.post("/v1/jobs", json={"kind": "evaluate", "model_id": model_id, "attacks": ["fgsm"]})
    assert r.status_code == 202, r.text
    assert r.json()["id"] not in json.dumps(alice.get("/v1/jobs").json())  # Bob's job is Bob's
    assert alice.delete(f"/v1/models/{model_id}/shares/{bob_id}").status_code == 204
    assert bob.get(f"/v1/models/{model_id}").status_code == 404

    # Owners delete their own.
    assert alice.delete(f"/v1/reports/{report_id}").status_code == 204
    assert admin.get(f"/v1/reports/{report_id}/meta").status_code == 404
    assert alice.delete(f"/v1/models/{model_id}").status_code == 409  # Bob's evaluation is queued
    assert bob.post(f"/v1/jobs/{r.json()['id']}/cancel").status_code == 202
    assert alice.delete(f"/v1/models/{model_id}").status_code == 204
    assert alice.get(f"/v1/models/{model_id}").status_code == 404
    assert open_store(svc.settings.store_url, svc.settings.s3_endpoint_url).list(f"models/{model_id}") == []


# --------------------------------------------------------------------------- quotas


@pytest.mark.parametrize("backend", ["embedded", "servers"])
def test_quotas_answer_429_and_create_nothing(backend, live_service, synthetic_root):
    svc = live_service(backend, workers=0)
    admin = svc.client
    location = dataset_location(svc, backend, synthetic_root)
    dataset = admin.post("/v1/datasets", json={"name": "tiny3", "format": "synthetic", "location": location}).json()
    admin.post(f"/v1/datasets/{dataset['id']}/shares", json={"all": True})
    carol, carol_id = svc.key_client("carol", max_active_jobs=3, max_active_sweeps=1)
    body = {"kind": "train", "dataset_id": "tiny3"}

    # Concurrent submissions cannot overrun the quota.
    results: list[int] = []

    def submit():
        results.append(carol.post("/v1/jobs", json=body).status_code)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [202, 202, 202, 429, 429, 429], results
    r = carol.post("/v1/jobs", json=body)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert "quota is 3" in r.json()["detail"]
    assert carol.get("/v1/jobs").json()["total"] == 3
    # A cancelled job frees its slot.
    first = carol.get("/v1/jobs").json()["items"][0]["id"]
    assert carol.post(f"/v1/jobs/{first}/cancel").status_code == 202
    assert carol.post("/v1/jobs", json=body).status_code == 202
    assert carol.post(f"/v1/jobs/{first}/retry").status_code == 429  # a retry is a new active job

    sweep = {"kind": "train", "base": {"dataset_id": "tiny3"}, "grid": {"seed": [0, 1]}}
    assert carol.post("/v1/sweeps", json=sweep).status_code == 202
    r = carol.post("/v1/sweeps", json=sweep)
    assert r.status_code == 429 and "retry-after" in r.headers
    assert carol.get("/v1/sweeps").json()["total"] == 1
    assert carol.get("/v1/jobs").json()["total"] == 4 + 2

    # An admin raises the quota.
    assert admin.patch(f"/v1/keys/{carol_id}", json={"max_active_jobs": 10}).status_code == 200
    assert carol.post("/v1/jobs", json=body).status_code == 202


# --------------------------------------------------------------------------- bodies and admission


def test_chunked_upload_over_the_limit_is_413_and_the_api_stays_small(live_service):
    svc = live_service("embedded", workers=0)
    chunk = b"\0" * (1 << 20)
    sent = {"bytes": 0}

    def body():  # no Content-Length: chunked transfer encoding; one multipart file part of 100 MB
        yield (b'--x\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n'
               b"Content-Type: video/mp4\r\n\r\n")
        for _ in range(100):
            sent["bytes"] += len(chunk)
            yield chunk

    alive = {"ok": True, "stop": False}

    def probe():
        while not alive["stop"]:
            try:
                alive["ok"] &= httpx.get(f"{svc.url}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                alive["ok"] = False
            time.sleep(0.1)

    prober = threading.Thread(target=probe)
    prober.start()
    before = rss_mb()
    t0 = time.monotonic()
    try:
        r = svc.client.post("/v1/models/nope/classify", content=body(),
                            headers={"Content-Type": "multipart/form-data; boundary=x"})
        status, detail = r.status_code, r.json()["detail"]
    finally:
        alive["stop"] = True
        prober.join()
    elapsed = time.monotonic() - t0
    assert status == 413 and "64 MiB" in detail, detail
    assert elapsed < 30 and alive["ok"]
    assert rss_mb() - before < 150, (before, rss_mb())  # the body was never held in memory
    assert svc.client.get("/v1/keys/me").status_code == 200


def test_classify_beyond_the_queue_is_503_at_once(api):
    admission = api.app.state.admission
    taken = 0
    while admission.try_enter():
        taken += 1
    try:
        assert taken == admission.capacity
        t0 = time.monotonic()
        r = api.post("/v1/models/any/classify", files={"skeleton": ("a.npy", b"x" * 1000)})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "retry" in r.json()["detail"] and time.monotonic() - t0 < 2
    finally:
        for _ in range(taken):
            admission.leave()
    r = api.post("/v1/models/any/classify", files={"skeleton": ("a.npy", b"x" * 1000)})
    assert r.status_code == 404  # admitted again: the unknown model is the problem now


def test_json_bodies_have_a_smaller_limit(api):
    big = {"kind": "train", "dataset_id": "x", "name": "n" * (5 << 20)}
    r = api.post("/v1/jobs", json=big)
    assert r.status_code == 413 and "4 MiB request body" in r.json()["detail"]

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1 << 16):
            yield data[i:i + (1 << 16)]

    r = api.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert api.get("/v1/jobs").json()["total"] == 0
