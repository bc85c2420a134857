"""Backend outages answer 503 with a JSON body, never 500 (issue 9): a database that went
away under a running API (Postgres), seen by the key check and by the routes."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.integration


def test_database_gone_is_503_not_500(live_service, synthetic_root):
    svc = live_service("servers", workers=0)
    assert svc.client.get("/v1/jobs").status_code == 200
    url = sa.engine.make_url(svc.settings.database_url)
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # the outage: the database disappears, its connections are cut
        conn.exec_driver_sql(f'DROP DATABASE "{url.database}" WITH (FORCE)')
    admin.dispose()
    for method, path, body in (("GET", "/v1/jobs", None), ("GET", "/v1/datasets", None),
                               ("POST", "/v1/jobs", {"kind": "train", "dataset_id": "x"}),
                               ("GET", "/v1/models/abc", None)):
        t0 = time.monotonic()
        r = svc.client.request(method, path, json=body)
        assert r.status_code == 503, (method, path, r.status_code, r.text)
        assert "database" in r.json()["detail"] and int(r.headers["retry-after"]) > 0
        assert time.monotonic() - t0 < 15
    t0 = time.monotonic()
    ready = svc.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")
    assert time.monotonic() - t0 < 15
    assert svc.client.get("/healthz").status_code == 200
