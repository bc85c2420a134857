"""The object store on both backends: file:// and s3:// (moto's server on loopback)."""

from __future__ import annotations

import httpx
import pytest

from robustact.service.store import FileStore, ObjectNotFound, S3Store, StoreError, materialize_dir, open_store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")("store")
    return open_store(f"s3://{bucket}/some/prefix", endpoint_url=endpoint)


def test_open_store_by_url(tmp_path):
    assert isinstance(open_store(f"file://{tmp_path}"), FileStore)
    assert isinstance(open_store(str(tmp_path)), FileStore)
    assert isinstance(open_store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9"), S3Store)
    with pytest.raises(StoreError, match="unsupported"):
        open_store("ftp://host/x")
    with pytest.raises(StoreError, match="bucket"):
        open_store("s3://ab/x")


def test_put_get_stream_delete(store, tmp_path):
    store.ping()
    store.put_bytes("a/b/one.json", b'{"x": 1}')
    source = tmp_path / "big.bin"
    source.write_bytes(bytes(range(256)) * 9000)  # > 2 chunks
    store.put_file("a/two.bin", source)
    assert store.get_bytes("a/b/one.json") == b'{"x": 1}'
    assert b"".join(store.stream("a/two.bin")) == source.read_bytes()
    assert store.size("a/two.bin") == source.stat().st_size
    assert store.exists("a/b/one.json") and not store.exists("a/none")
    assert store.list("a") == ["a/b/one.json", "a/two.bin"]
    store.download("a/two.bin", tmp_path / "copy" / "two.bin")
    assert (tmp_path / "copy" / "two.bin").read_bytes() == source.read_bytes()
    store.delete("a/two.bin")
    assert not store.exists("a/two.bin")
    store.delete_prefix("a")
    assert store.list("a") == []
    with pytest.raises(ObjectNotFound):
        store.get_bytes("a/b/one.json")
    with pytest.raises(ObjectNotFound):
        store.stream("missing")


def test_keys_cannot_escape(store):
    with pytest.raises(ValueError):
        store.put_bytes("../outside", b"x")


def test_directories_round_trip(store, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"w" * 100)
    (src / "sub" / "config.json").write_text("{}")
    keys = store.put_dir("models/m1", src)
    assert keys == ["models/m1/model.safetensors", "models/m1/sub/config.json"]
    target = materialize_dir(store, "models/m1", tmp_path / "local" / "m1")
    assert (target / "model.safetensors").read_bytes() == b"w" * 100
    assert (target / "sub" / "config.json").read_text() == "{}"
    # Downloaded once: a second call does not touch the store.
    store.delete_prefix("models/m1")
    assert materialize_dir(store, "models/m1", target) == target
    with pytest.raises(ObjectNotFound):
        materialize_dir(store, "models/none", tmp_path / "local" / "none")
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["m1"]  # no temp dir left


def test_file_writes_are_atomic(tmp_path, monkeypatch):
    store = FileStore(tmp_path / "s")
    store.put_bytes("k", b"old")

    class Boom(Exception):
        pass

    def failing_copy(src, dst, length=0):
        dst.write(b"partial")
        raise Boom

    monkeypatch.setattr("robustact.service.store.shutil.copyfileobj", failing_copy)
    src = tmp_path / "src"
    src.write_bytes(b"new")
    with pytest.raises(Boom):
        store.put_file("k", src)
    assert store.get_bytes("k") == b"old"
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["k"]  # the temp file is gone


def test_has_prefix(store):
    store.put_bytes("skeleton/v1/v1_000000000000_keypoints.json", b"{}")
    assert store.has_prefix("skeleton/v1") and store.has_prefix("skeleton")
    assert not store.has_prefix("skeleton/v2") and not store.has_prefix("skeleton/v")  # whole segments only
    store.delete_prefix("skeleton/v1")
    assert not store.has_prefix("skeleton/v1")


def test_presign(store):
    store.put_bytes("p/file.txt", b"hello")
    url = store.presign("p/file.txt", expires=60)
    if isinstance(store, FileStore):
        assert url is None
    else:
        assert httpx.get(url).content == b"hello"


def test_s3_unreachable_bucket_fails_ping(s3_endpoint):
    with pytest.raises(StoreError):
        open_store("s3://no-such-bucket-xyz/p", endpoint_url=s3_endpoint).ping()
