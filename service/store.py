"""Object store for artefacts (checkpoints, reports, logs), chosen by URL.

* ``file:///abs/path`` (or a bare path) → :class:`FileStore`, a directory tree.
* ``s3://bucket/prefix`` → :class:`S3Store`, with ``endpoint_url`` for MinIO / moto.

Keys are relative, ``/``-separated (``models/<id>/model.safetensors``). Writes are atomic
per object: the file store writes a temp file and renames it; an S3 PUT only becomes
visible once complete. A directory (a checkpoint) is uploaded file by file and only then
registered in the database by the caller, so a half-uploaded checkpoint is never a model.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

# An evaluation's per-clip records are stored beside its report document.
CLIPS_FILE = "clips.npz"


def clips_key(report_key: str) -> str:
    """The store key of the per-clip records of the report stored at ``report_key``."""
    return report_key.rsplit("/", 1)[0] + "/" + CLIPS_FILE if "/" in report_key else CLIPS_FILE

CHUNK = 1 << 20


class StoreError(RuntimeError):
    """The store is unreachable or misconfigured."""


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the S3 server cannot be reached" (not "the request is wrong")."""
    try:
        from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError, \
            ReadTimeoutError, ResponseStreamingError
    except ImportError:  # boto3 not installed: only the file store
        return ()
    # ResponseStreamingError: the connection broke while a response body was being read.
    return (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError,
            ResponseStreamingError)


StoreUnavailable = _unavailable_errors()


class ObjectNotFound(KeyError):
    """No object under this key."""


def _clean_key(key: str) -> str:
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"invalid store key {key!r}")
    return "/".join(parts)


class FileStore:
    """A directory tree; ``file://`` URLs."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def put_file(self, key: str, source: str | Path) -> None:
        _copy_atomic(open(source, "rb"), self._path(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        _copy_atomic(io.BytesIO(data), self._path(key))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.read_bytes()

    def download(self, key: str, target: str | Path) -> None:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        _copy_atomic(path.open("rb"), Path(target))

    def stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return _iter_file(path.open("rb"), chunk_size)

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if _clean_key(prefix) else self.root
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".tmp"))

    def has_prefix(self, prefix: str) -> bool:
        """True if some object's key lies under ``prefix/`` (without listing them all)."""
        base = self._path(prefix)
        return base.is_dir() and any(p.is_file() and not p.name.endswith(".tmp") for p in base.rglob("*"))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def presign(self, key: str, expires: int = 3600) -> str | None:
        """Local files have no URL that a remote client could use."""
        return None

    def local_path(self, prefix: str) -> Path:
        return self._path(prefix)

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"{self.root} is not writable")

    # -- directories -----------------------------------------------------------------
    def put_dir(self, prefix: str, directory: str | Path) -> list[str]:
        return _put_dir(self, prefix, directory)

    def download_dir(self, prefix: str, directory: str | Path) -> list[str]:
        return _download_dir(self, prefix, directory)


class S3Store:
    """``s3://bucket/prefix`` on AWS or any S3-compatible server (``endpoint_url``)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = _clean_key(prefix)
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or "us-east-1",
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                          signature_version="s3v4"))

    def _key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, error) -> bool:
        code = str(error.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def put_file(self, key: str, source: str | Path) -> None:
        self.client.upload_file(str(source), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _get(self, key: str):
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if self._missing(e):
                raise ObjectNotFound(key) from None
            raise

    def get_bytes(self, key: str) -> bytes:
        return self._get(key)["Body"].read()

    def download(self, key: str, target: str | Path) -> None:
        _copy_atomic(self._get(key)["Body"], Path(target))

    def stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        return _iter_file(self._get(key)["Body"], chunk_size)

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as e:
            if self._missing(e):
                raise ObjectNotFound(key) from None
            raise

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if _clean_key(prefix) else self.prefix
        if full:
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def has_prefix(self, prefix: str) -> bool:
        """True if some object's key lies under ``prefix/`` (one request, however many there are)."""
        found = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(prefix) + "/", MaxKeys=1)
        return bool(found.get("KeyCount") or found.get("Contents"))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def presign(self, key: str, expires: int = 3600) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires)

    def ping(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as e:
            raise StoreError(f"{self.url}: {e}") from None

    def put_dir(self, prefix: str, directory: str | Path) -> list[str]:
        return _put_dir(self, prefix, directory)

    def download_dir(self, prefix: str, directory: str | Path) -> list[str]:
        return _download_dir(self, prefix, directory)


Store = FileStore | S3Store


def open_store(url: str, endpoint_url: str | None = None, region: str | None = None) -> Store:
    """The store for ``url``: ``file://…``, a plain path, or ``s3://bucket/prefix``."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if len(parsed.netloc) < 3:
            raise StoreError(f"{url}: an s3:// URL needs a bucket name of at least 3 characters")
        return S3Store(parsed.netloc, parsed.path.lstrip("/"), endpoint_url=endpoint_url, region=region)
    if parsed.scheme == "file":
        return FileStore(parsed.netloc + parsed.path if parsed.netloc not in ("", "localhost") else parsed.path)
    if parsed.scheme == "":
        return FileStore(url)
    raise StoreError(f"{url}: unsupported store scheme {parsed.scheme!r} (use file:// or s3://)")


def materialize_dir(store: Store, prefix: str, target: str | Path) -> Path:
    """A local copy of the directory ``prefix/`` at ``target``, downloaded once: the files
    go to a sibling temp directory that is renamed into place when complete."""
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        if not _download_dir(store, prefix, tmp):
            raise ObjectNotFound(prefix)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent download that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _iter_file(handle: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    try:
        while chunk := handle.read(chunk_size):
            yield chunk
    finally:
        handle.close()


def _copy_atomic(handle: BinaryIO, target: Path) -> None:
    """Copy ``handle`` (closed afterwards) to ``target`` through a temp file in the same
    directory and a rename: readers see the old file or the whole new one."""
    with handle:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(handle, out, CHUNK)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _put_dir(store: Store, prefix: str, directory: str | Path) -> list[str]:
    """Upload every file under ``directory`` to ``prefix/…``; returns the keys written."""
    directory = Path(directory)
    keys = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        key = f"{_clean_key(prefix)}/{path.relative_to(directory).as_posix()}"
        store.put_file(key, path)
        keys.append(key)
    return keys


def _download_dir(store: Store, prefix: str, directory: str | Path) -> list[str]:
    """Download every object under ``prefix/`` into ``directory`` (relative layout kept)."""
    directory = Path(directory)
    base = _clean_key(prefix)
    keys = store.list(base)
    for key in keys:
        rel = key[len(base) + 1:] if base else key
        store.download(key, directory / rel)
    return keys
