"""Shared pytest fixtures.

Integration servers (see tests/servers.py) are session-scoped and start lazily: only when
a test asks for the fixture. Set ROBUSTACT_TEST_POSTGRES_URL / ROBUSTACT_TEST_REDIS_URL /
ROBUSTACT_TEST_S3_ENDPOINT to use existing servers instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

# One module object for tests/servers.py, importable as `tests.servers` (tests/ is a
# package) and as plain `servers`, whatever pytest's import mode.
try:
    from tests import servers
except ImportError:  # tests/ not importable as a package (e.g. --import-mode=importlib)
    _TESTS_DIR = str(Path(__file__).resolve().parent)
    if _TESTS_DIR not in sys.path:
        sys.path.insert(0, _TESTS_DIR)
    import servers  # type: ignore[no-redef]
sys.modules.setdefault("servers", servers)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLAlchemy URL ``postgresql+psycopg://postgres@127.0.0.1:PORT/robustact`` of a
    throw-away PostgreSQL server (empty database ``robustact``, trust auth)."""
    url, stop, _ = servers.start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield url
    finally:
        stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:PORT/0`` of a throw-away redis-server (no persistence)."""
    url, stop, _ = servers.start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL ``http://127.0.0.1:PORT`` of an S3-compatible server (moto).

    While it runs, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION default
    to dummy values (if unset) so that boto3 clients built by the code under test sign
    requests; they are restored afterwards.
    """
    url, stop, _ = servers.start_s3()
    mp = pytest.MonkeyPatch()
    if not os.environ.get(servers.ENV_S3_ENDPOINT):
        for key, value in (("AWS_ACCESS_KEY_ID", servers.MOTO_ACCESS_KEY),
                           ("AWS_SECRET_ACCESS_KEY", servers.MOTO_SECRET_KEY),
                           ("AWS_DEFAULT_REGION", servers.S3_REGION)):
            if not os.environ.get(key):
                mp.setenv(key, value)
    try:
        yield url
    finally:
        mp.undo()
        stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> Callable[..., str]:
    """Factory: ``s3_bucket(prefix="test") -> name`` creates a fresh, uniquely named bucket
    on ``s3_endpoint`` and returns its name."""

    def make(prefix: str = "test") -> str:
        return servers.create_bucket(s3_endpoint, prefix=prefix)

    return make
