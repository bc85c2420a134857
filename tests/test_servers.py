"""The integration fixtures are real servers on loopback, not mocks."""

from __future__ import annotations

import uuid

import httpx
import pytest

import servers  # tests/servers.py (conftest makes this name importable)

pytestmark = pytest.mark.integration


def test_postgres_roundtrip(postgres_url: str) -> None:
    import sqlalchemy as sa

    assert postgres_url.startswith("postgresql+psycopg://")
    engine = sa.create_engine(postgres_url)
    meta = sa.MetaData()
    table = sa.Table(
        f"servers_probe_{uuid.uuid4().hex[:8]}",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("payload", sa.JSON),
    )
    try:
        meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"name": "a", "payload": {"k": [1, 2]}},
                                          {"name": "b", "payload": None}])
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.name, table.c.payload).order_by(table.c.id)).all()
            assert [tuple(r) for r in rows] == [("a", {"k": [1, 2]}), ("b", None)]
            # really PostgreSQL, really the `robustact` database
            assert conn.execute(sa.text("select current_database()")).scalar() == "robustact"
            assert "PostgreSQL" in conn.execute(sa.text("select version()")).scalar()
    finally:
        meta.drop_all(engine)
        engine.dispose()


def test_redis_set_get(redis_url: str) -> None:
    import redis

    assert redis_url.startswith("redis://")
    client = redis.Redis.from_url(redis_url)
    try:
        key = f"servers-probe-{uuid.uuid4().hex}"
        assert client.set(key, b"value", ex=60)
        assert client.get(key) == b"value"
        assert client.delete(key) == 1
        assert client.info("server")["redis_version"]
    finally:
        client.close()


def test_s3_put_get_and_presigned_url(s3_endpoint: str, s3_bucket) -> None:
    bucket = s3_bucket()
    assert bucket != s3_bucket(), "each call makes a fresh bucket"
    client = servers.s3_client(s3_endpoint)
    body = b"\x00robustact\xff" * 100
    client.put_object(Bucket=bucket, Key="dir/obj.bin", Body=body)
    assert client.get_object(Bucket=bucket, Key="dir/obj.bin")["Body"].read() == body
    listed = client.list_objects_v2(Bucket=bucket, Prefix="dir/")
    assert [o["Key"] for o in listed["Contents"]] == ["dir/obj.bin"]

    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "dir/obj.bin"}, ExpiresIn=300
    )
    assert url.startswith(s3_endpoint) and "X-Amz-Signature=" in url
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    assert r.content == body
    # an HTTP server that knows what is stored: an unknown key is not served
    missing = httpx.get(f"{s3_endpoint}/{bucket}/no-such-key", timeout=10)
    assert missing.status_code in (403, 404)


def test_code_under_test_can_use_default_boto3_credentials(s3_endpoint: str, s3_bucket) -> None:
    """A boto3 client built without explicit credentials (as the service does) works."""
    import boto3

    bucket = s3_bucket("creds")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


def test_stop_is_idempotent_and_releases_port(tmp_path) -> None:
    """A second Redis started and stopped by hand: the port is closed afterwards."""
    import socket

    url, stop, seconds = servers.start_redis(tmp_path)
    if url.startswith("redis://127.0.0.1:") and not servers.os.environ.get(servers.ENV_REDIS_URL):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert servers._redis_ping(port)
        stop()
        stop()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    else:
        stop()
