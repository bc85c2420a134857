"""Service settings: one pydantic-settings class, every field a ``ROBUSTACT_*`` env var.

The embedded defaults keep everything under ``data_dir`` (SQLite file, ``file://`` store,
server-less broker), so ``robustact serve`` runs with no servers at all; production points
the three URLs at Postgres, S3/MinIO and Redis.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROBUSTACT_", extra="ignore")

    # Where the SQLite file, the file store, the embedded broker, caches and temp files live.
    data_dir: Path = Path("var")
    # SQLAlchemy URL; default sqlite:///{data_dir}/robustact.db.
    database_url: str = ""
    # Object store for checkpoints, reports and logs: file://PATH or s3://bucket/prefix.
    store_url: str = ""
    # Endpoint of an S3-compatible server (MinIO, moto); empty means AWS.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Celery broker; default is kombu's server-less SQLAlchemy transport on a SQLite file.
    broker_url: str = ""
    # Largest accepted classify upload (whole request), in MiB.
    max_upload_mb: float = 64.0
    # Torch device for workers and classify: "auto" (CUDA when present), "cpu", "cuda:1", ...
    device: str = "auto"
    # Intra-op torch threads (0: torch's default, one per core). The API serves requests in
    # parallel, so one thread per request is the right grain there; OpenMP threads that wait
    # for each other on a CPU shared with other busy processes can make a forward pass 100x
    # slower. Workers train one job at a time and use every core by default.
    api_torch_threads: int = 1
    worker_torch_threads: int = 0
    # Trained models kept in memory by the API process for classify.
    model_cache_size: int = 4
    # A running job whose heartbeat is older than this is declared lost (seconds).
    heartbeat_timeout_s: float = 90.0
    # How often a running task refreshes its heartbeat (seconds).
    heartbeat_interval_s: float = 10.0
    # A lost job is requeued until it has been attempted this many times, then failed.
    max_attempts: int = 3
    # Model downloads redirect to a presigned URL (S3 only) instead of streaming.
    presign_downloads: bool = False
    # Synthesize and register a small dataset on first start of `robustact serve`.
    seed_dataset: bool = True

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        data = self.data_dir.resolve()
        self.data_dir = data
        if not self.database_url:
            self.database_url = f"sqlite:///{data / 'robustact.db'}"
        if not self.store_url:
            self.store_url = f"file://{data / 'artifacts'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{data / 'broker.db'}"
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def cache_dir(self) -> Path:
        """Local caches: decoded datasets, downloaded checkpoints, worker scratch space."""
        return self.data_dir / "cache"

    def as_env(self) -> dict[str, str]:
        """These settings as ``ROBUSTACT_*`` variables, for a worker subprocess."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            env[f"ROBUSTACT_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env
