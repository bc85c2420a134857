"""The Celery app, configured from :class:`service.settings.Settings`.

One task at a time per worker process (solo pool, prefetch 1) so one worker owns one GPU;
acks late + reject on worker lost so a message is not lost with a dying worker. The job
row in the database, not a Celery result backend, records what happened.

Run a worker: ``celery -A robustact.worker.celery_app worker -P solo`` (or ``robustact worker``).
"""

from __future__ import annotations

from celery import Celery

from robustact.service.settings import Settings

QUEUE = "robustact"
TRAIN_TASK = "robustact.train"
EVALUATE_TASK = "robustact.evaluate"
SHARD_TASK = "robustact.evaluate_shard"
MERGE_TASK = "robustact.merge_shards"
TASK_FOR_KIND = {"train": TRAIN_TASK, "evaluate": EVALUATE_TASK, "shard": SHARD_TASK}


def broker_transport_options(broker_url: str) -> dict:
    if broker_url.startswith("sqla+sqlite"):
        # The API and the worker share the SQLite file: wait for locks instead of failing.
        return {"connect_args": {"timeout": 30}}
    if broker_url.startswith(("redis://", "rediss://")):
        # Training can run for hours; redelivery is harmless (the job row is claimed once)
        # but pointless before then.
        return {"visibility_timeout": 24 * 3600}
    return {}


def queue_depth(celery: Celery, timeout_s: float = 5.0) -> int:
    """Messages waiting in the job queue (delivered but unacknowledged ones not counted)."""
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout_s)
        return conn.default_channel.queue_declare(queue=QUEUE, durable=True, auto_delete=False).message_count


def make_celery(settings: Settings, include_tasks: bool = False) -> Celery:
    app = Celery("robustact", broker=settings.broker_url, include=["robustact.worker.tasks"] if include_tasks else [])
    app.conf.update(
        broker_transport_options=broker_transport_options(settings.broker_url),
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUE,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        task_serializer="json",
        accept_content=["json"],
    )
    return app


app = make_celery(Settings(), include_tasks=True)
