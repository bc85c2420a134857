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
    # Largest body of any other request (JSON: jobs, sweeps, comparisons with inline reports),
    # in MiB: a JSON body is parsed whole in memory before its fields are checked.
    max_body_mb: float = 4.0
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
    # How long a worker keeps retrying a database or object-store write (progress, checkpoint,
    # result) through an outage before it gives the job up (seconds).
    outage_tolerance_s: float = 300.0
    # A queued job whose message was not handed to the broker (the API died between commit and
    # send, or the broker was down) is sent again by the reaper after this long (seconds); so
    # are queued jobs whose messages the broker lost (it holds fewer than there are jobs).
    outbox_grace_s: float = 60.0
    # A prepare job hands its shards this many samples at a time (one unit of its queue):
    # a shard whose worker died decodes at most these again.
    prepare_unit_samples: int = 16
    # Decoding processes a worker runs for a prepare unit (1: in the worker process; one
    # worker per core is the usual deployment).
    prepare_workers: int = 1
    # DataLoader processes that read (and from a jpeg cache decode) clips while the model
    # runs, in training and evaluation jobs (0: in the worker process).
    loader_workers: int = 0
    # /readyz answers 503 unless this many workers were seen alive within the heartbeat
    # timeout (0: an API deployed without workers of its own can be ready alone).
    ready_min_workers: int = 1
    # Model downloads redirect to a presigned URL (S3 only) instead of streaming.
    presign_downloads: bool = False
    # --- access (issue 8)
    # Where datasets may be registered from: comma-separated directories and s3://bucket/prefix
    # roots. Default: DATA_DIR/datasets and STORE_URL/datasets (where the seed dataset goes).
    dataset_roots: str = ""
    # Quotas of a key that has none of its own: queued + running jobs outside sweeps, and
    # sweeps with a queued or running job.
    max_active_jobs: int = 16
    max_active_sweeps: int = 4
    # Retry-After (seconds) of a 429 (quota) and of a 503 (classify admission).
    quota_retry_after_s: int = 30
    busy_retry_after_s: int = 1
    # Classify admission: decodes + forward passes at once (0: one per CPU core), and how many
    # more requests may wait for a slot; beyond that a 503 at once.
    classify_concurrency: int = 0
    classify_queue: int = 16
    # Synthesize and register a small dataset on first start of `robustact serve`.
    seed_dataset: bool = True
    # --- classify uploads (issue 8): decoded in child processes, within these bounds.
    # Frames a skeleton may declare or hold (NTU's longest clip has about 300).
    max_skeleton_frames: int = 10000
    # A video is refused from its header, or when decoding passes a limit (headers can lie).
    max_video_frames: int = 10000
    max_video_seconds: float = 600.0
    max_video_width: int = 4096
    max_video_height: int = 4096
    # Wall-clock time one upload may take to decode; a late decoder is killed (seconds).
    decode_timeout_s: float = 30.0
    # Address space a decoder may use above what it holds after importing torch and PyAV (MiB).
    decode_memory_mb: int = 1024
    # Decoder processes (0: one per CPU core); each decodes one upload at a time.
    decode_workers: int = 0

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
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

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

    def dataset_root_list(self) -> list[str]:
        """The configured dataset roots: absolute directories (resolved, symlinks followed)
        and ``s3://bucket/prefix`` URLs without a trailing slash."""
        raw = [r.strip() for r in self.dataset_roots.split(",") if r.strip()]
        if not raw:
            raw = [str(self.data_dir / "datasets")]
            if self.store_url.startswith("s3://"):
                raw.append(self.store_url.rstrip("/") + "/datasets")
        roots = []
        for root in raw:
            if root.startswith("s3://"):
                roots.append(root.rstrip("/"))
            else:
                roots.append(str(Path(root.removeprefix("file://")).expanduser().resolve()))
        return roots

    @property
    def classify_slots(self) -> int:
        import os

        return self.classify_concurrency if self.classify_concurrency > 0 else max(1, os.cpu_count() or 1)
