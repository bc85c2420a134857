"""Celery tasks: a job id in, rows and artefacts out. Glue around ``models.train`` and
``models.evaluate``; no science here.

Life of a job (the ``jobs`` row is the system of record):

1. ``claim``: one atomic UPDATE moves the row from ``queued`` to ``running`` and bumps
   ``attempts``; a duplicate delivery (acks-late redelivery, a requeue) finds nothing to
   claim and returns. The attempt number is the run's ownership token: every later write
   is conditional on it, so a run that was declared lost cannot overwrite its successor.
2. While it runs, a heartbeat thread refreshes ``heartbeat_at``; progress callbacks write
   ``progress`` (throttled) and the cancel flag is polled for ``should_stop``.
3. Training uploads every epoch's ``last/`` checkpoint to the store (new prefix, then a
   pointer object), so a retried job resumes from its last finished epoch. The final
   checkpoint is uploaded completely before the ``models`` row is inserted, in the same
   transaction that marks the job succeeded.
4. ``reap_stale_jobs`` (at worker start and periodically, in every worker and in every API
   process, ``service.reaper``) finds ``running`` rows whose heartbeat is too old - their
   worker died - and requeues them, or fails them after ``max_attempts``. No job stays
   "running" forever, even when no worker is alive to notice.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import logging
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from celery import signals
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import Dataset, Job, Model, Report, file_lock, make_engine, make_sessionmaker, new_id, utcnow
from service.settings import Settings
from service.store import CLIPS_FILE, ObjectNotFound, Store, clips_key, materialize_dir, open_store
from worker.celery_app import EVALUATE_TASK, TASK_FOR_KIND, TRAIN_TASK, app

log = logging.getLogger("robustact.worker")

PROGRESS_EVERY_S = 1.0
CANCEL_POLL_S = 1.0


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    store: Store


@functools.cache
def context() -> Context:
    settings = Settings()
    return Context(settings=settings, sessions=make_sessionmaker(make_engine(settings.database_url)),
                   store=open_store(settings.store_url, settings.s3_endpoint_url, settings.s3_region))


def device_name(settings: Settings) -> str | None:
    return None if settings.device in ("", "auto") else settings.device


class LostOwnership(RuntimeError):
    """The job row no longer belongs to this run (it was reaped or cancelled away)."""


# ---------------------------------------------------------------------------------------
# Job rows


def claim(sessions: sessionmaker[Session], job_id: str, worker: str) -> int | None:
    """Move a queued job to running; returns this run's attempt number, or None."""
    now = utcnow()
    with sessions() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
            .values(status="running", attempts=Job.attempts + 1, started_at=now, heartbeat_at=now,
                    worker=worker, error=None)
        )
        session.commit()
        if result.rowcount != 1:
            return None
        return session.scalar(select(Job.attempts).where(Job.id == job_id))


def _owned(job_id: str, attempt: int):
    return (Job.id == job_id, Job.status == "running", Job.attempts == attempt)


def finish(sessions: sessionmaker[Session], job_id: str, attempt: int, status: str, error: str | None = None) -> bool:
    with sessions() as session:
        result = session.execute(update(Job).where(*_owned(job_id, attempt)).values(
            status=status, error=error, finished_at=utcnow(), heartbeat_at=utcnow()))
        session.commit()
        return result.rowcount == 1


class JobRun:
    """Progress, cancellation, heartbeat and the log of one attempt at one job."""

    def __init__(self, ctx: Context, job_id: str, attempt: int, log_path: Path):
        self.ctx, self.job_id, self.attempt = ctx, job_id, attempt
        self.cancel_seen = False
        self.lost = False
        self._last_progress_write = 0.0
        self._last_cancel_poll = 0.0
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._handler = logging.FileHandler(log_path)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> "JobRun":
        log.addHandler(self._handler)
        log.setLevel(logging.INFO)
        self._heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._heartbeat.join(timeout=5)
        log.removeHandler(self._handler)
        self._handler.close()

    def _write(self, **values: Any) -> None:
        with self.ctx.sessions() as session:
            result = session.execute(update(Job).where(*_owned(self.job_id, self.attempt)).values(**values))
            session.commit()
        if result.rowcount != 1:
            self.lost = True

    def _beat(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_interval_s):
            try:
                self._write(heartbeat_at=utcnow())
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.exception("heartbeat of job %s failed", self.job_id)

    def progress(self, info: dict[str, Any]) -> None:
        now = time.monotonic()
        epoch_end = info.get("phase") == "epoch"
        if epoch_end:
            log.info("progress %s", json.dumps(info, default=str))
        if epoch_end or now - self._last_progress_write >= PROGRESS_EVERY_S:
            self._last_progress_write = now
            self._write(progress=_jsonable(info), heartbeat_at=utcnow())

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self.cancel_seen and now - self._last_cancel_poll >= CANCEL_POLL_S:
            self._last_cancel_poll = now
            with self.ctx.sessions() as session:
                self.cancel_seen = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self.cancel_seen or self.lost


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(info, default=str))


def run_job(job_id: str, body: Callable[[Context, Job, JobRun, Session], None]) -> None:
    ctx = context()
    attempt = claim(ctx.sessions, job_id, socket.gethostname())
    if attempt is None:
        log.info("job %s: nothing to claim (finished, cancelled or running elsewhere)", job_id)
        return
    work = ctx.settings.cache_dir / "jobs" / job_id
    run = JobRun(ctx, job_id, attempt, work / "job.log")
    with run:
        log.info("job %s: attempt %d on %s", job_id, attempt, socket.gethostname())
        try:
            with ctx.sessions() as session:
                job = session.get(Job, job_id)
                body(ctx, job, run, session)
        except Exception as e:
            from models.evaluate import EvaluationCancelled
            from models.train import TrainingCancelled

            if run.cancel_seen or isinstance(e, (TrainingCancelled, EvaluationCancelled)):
                log.info("job %s: cancelled (%s)", job_id, e)
                finish(ctx.sessions, job_id, attempt, "cancelled")
            else:
                log.exception("job %s failed", job_id)
                finish(ctx.sessions, job_id, attempt, "failed", f"{type(e).__name__}: {e}")
    _upload_log(ctx, job_id, run.log_path)
    # The store holds what a retry needs (the last epoch checkpoint); local scratch goes.
    shutil.rmtree(work, ignore_errors=True)


def _upload_log(ctx: Context, job_id: str, path: Path) -> None:
    try:
        if path.is_file():
            ctx.store.put_file(f"jobs/{job_id}/job.log", path)
    except Exception:
        log.exception("job %s: could not upload its log", job_id)


# ---------------------------------------------------------------------------------------
# Data and checkpoints on local disk


def dataset_root(ctx: Context, dataset: Dataset) -> Path:
    """A local directory with the dataset's NTU layout (downloaded once from s3://)."""
    if not dataset.location.startswith("s3://"):
        return Path(dataset.location)
    target = ctx.settings.cache_dir / "datasets" / dataset.id / "source"
    source = open_store(dataset.location, ctx.settings.s3_endpoint_url, ctx.settings.s3_region)
    with file_lock(target.with_name("source.lock")):
        return materialize_dir(source, "", target)


def prepared_cache(ctx: Context, dataset: Dataset, model_cfg, run: "JobRun") -> Path:
    """The decoded cache of ``dataset`` at the model's input geometry, prepared once per
    host (``prepare`` itself writes a temp directory and renames it into place)."""
    from models.data.cache import META_FILE, prepare

    geometry = f"{model_cfg.rgb_frames}f{model_cfg.rgb_size}px{model_cfg.skel_frames}s"
    cache = ctx.settings.cache_dir / "datasets" / dataset.id / geometry
    with file_lock(cache.with_name(geometry + ".lock")):
        if not (cache / META_FILE).is_file():
            log.info("preparing %s (%s) into %s", dataset.name, dataset.location, cache)
            prepare(dataset_root(ctx, dataset), cache, rgb_frames=model_cfg.rgb_frames,
                    rgb_size=model_cfg.rgb_size, skel_frames=model_cfg.skel_frames,
                    progress=lambda done, total: run.progress({"phase": "prepare", "step": done, "steps": total}))
    return cache


def model_dir(ctx: Context, model: Model) -> Path:
    return materialize_dir(ctx.store, model.artifact_prefix, ctx.settings.cache_dir / "models" / model.id)


# ---------------------------------------------------------------------------------------
# Training


def _last_pointer(job_id: str) -> str:
    return f"jobs/{job_id}/last.json"


def upload_last(store: Store, job_id: str, path: Path, epoch: int) -> None:
    """Upload an epoch checkpoint under a fresh prefix, then switch the pointer to it; the
    pointer object is written last, so it only ever names a complete upload."""
    prefix = f"jobs/{job_id}/last-{epoch:04d}"
    store.put_dir(prefix, path)
    previous = _read_pointer(store, job_id)
    store.put_bytes(_last_pointer(job_id), json.dumps({"epoch": epoch, "prefix": prefix}).encode())
    if previous and previous["prefix"] != prefix:
        store.delete_prefix(previous["prefix"])


def _read_pointer(store: Store, job_id: str) -> dict | None:
    try:
        return json.loads(store.get_bytes(_last_pointer(job_id)))
    except ObjectNotFound:
        return None


def restore_last(store: Store, job_id: str, work: Path) -> int:
    """Put the job's last uploaded epoch checkpoint at ``work/last`` (unless a local one is
    at least as new); returns the epoch it resumes from (0 for a fresh start)."""
    from models.train import LAST_DIR

    local = work / LAST_DIR
    local_epoch = 0
    if (local / "state.json").is_file():
        local_epoch = json.loads((local / "state.json").read_text()).get("epoch", 0)
    pointer = _read_pointer(store, job_id)
    if pointer is None or pointer["epoch"] <= local_epoch:
        return local_epoch
    tmp = work / (LAST_DIR + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    store.download_dir(pointer["prefix"], tmp)
    shutil.rmtree(local, ignore_errors=True)
    tmp.rename(local)
    return pointer["epoch"]


def _train_body(ctx: Context, job: Job, run: JobRun, session: Session) -> None:
    from models.config import ModelConfig, TrainConfig
    from models.data.cache import ClipDataset
    from models.train import MODEL_DIR, train

    params = job.params
    dataset = session.get(Dataset, job.dataset_id)
    model_cfg = ModelConfig.from_dict(params["model_config"])
    train_cfg = TrainConfig.from_dict(params["train_config"])
    data = ClipDataset(prepared_cache(ctx, dataset, model_cfg, run), protocol=params["protocol"], split="train")
    if params.get("max_samples"):
        data = data.subset(params["max_samples"], seed=train_cfg.seed)
    work = ctx.settings.cache_dir / "jobs" / job.id
    resumed = restore_last(ctx.store, job.id, work)
    if resumed:
        log.info("job %s: resuming after epoch %d", job.id, resumed)
    summary = train(model_cfg, train_cfg, data, work, preset=params["preset"], progress=run.progress,
                    should_stop=run.should_stop,
                    on_checkpoint=lambda path, epoch: upload_last(ctx.store, job.id, path, epoch),
                    device=device_name(ctx.settings), resume=True)
    log.info("job %s: trained %d epochs", job.id, summary["epochs"])

    local = work / MODEL_DIR
    model = add_model(session, ctx.store, local, name=params.get("name") or f"{train_cfg.defence}-{job.id[:8]}",
                      job_id=job.id, dataset_id=dataset.id, owner_id=job.owner_id)
    _succeed_with(session, job.id, run.attempt, progress={"phase": "done", **summary["history"][-1]}
                  if summary["history"] else None, cleanup=lambda: ctx.store.delete_prefix(model.artifact_prefix))
    pointer = _read_pointer(ctx.store, job.id)  # the epoch checkpoint is not needed any more
    if pointer:
        ctx.store.delete_prefix(pointer["prefix"])
        ctx.store.delete(_last_pointer(job.id))


def add_model(session: Session, store: Store, checkpoint_dir: Path, name: str, job_id: str | None = None,
              dataset_id: str | None = None, owner_id: str | None = None) -> Model:
    """Upload a checkpoint directory completely, then add (not commit) its ``models`` row:
    a model row never points at a partial upload."""
    model_id = new_id()
    prefix = f"models/{model_id}"
    store.put_dir(prefix, checkpoint_dir)
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    model = Model(id=model_id, name=name, job_id=job_id, dataset_id=dataset_id, config=config, artifact_prefix=prefix,
                  owner_id=owner_id)
    session.add(model)
    return model


def _succeed_with(session: Session, job_id: str, attempt: int, progress: dict | None,
                  cleanup: Callable[[], None]) -> None:
    """Commit the new rows together with the job's success, or undo the upload."""
    values: dict[str, Any] = {"status": "succeeded", "finished_at": utcnow(), "heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = _jsonable(progress)
    try:
        result = session.execute(update(Job).where(*_owned(job_id, attempt)).values(**values))
        if result.rowcount != 1:
            raise LostOwnership(f"job {job_id} is no longer owned by attempt {attempt}")
        session.commit()
    except BaseException:
        session.rollback()
        cleanup()
        raise


@app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
def train_job(job_id: str) -> None:
    run_job(job_id, _train_body)


# ---------------------------------------------------------------------------------------
# Evaluation


def _evaluate_body(ctx: Context, job: Job, run: JobRun, session: Session) -> None:
    from models.checkpoint import load_checkpoint, resolve_device
    from models.config import AttackConfig, ModelConfig
    from models.data.cache import ClipDataset
    from models.evaluate import evaluate

    params = job.params
    model_row = session.get(Model, job.model_id)
    dataset = session.get(Dataset, job.dataset_id)
    model, meta = load_checkpoint(model_dir(ctx, model_row), device=resolve_device(device_name(ctx.settings)))
    cache = prepared_cache(ctx, dataset, ModelConfig.from_dict(meta["model"]), run)
    data = ClipDataset(cache, protocol=params["protocol"], split=params["split"])
    if params.get("max_samples"):
        data = data.subset(params["max_samples"], seed=params["seed"])
    suite = [AttackConfig.from_dict(d) for d in params["suite"]]
    report, records = evaluate(model, meta, data, suite, batch_size=params["batch_size"], seed=params["seed"],
                               strategy=params.get("strategy", "full"), diagnostics=params.get("diagnostics", True),
                               progress=run.progress, should_stop=run.should_stop, device=device_name(ctx.settings),
                               dataset_info={"id": dataset.id, "name": dataset.name, "format": dataset.format,
                                             "protocol": params["protocol"], "split": params["split"]},
                               model_info={"name": model_row.name, "id": model_row.id})
    report_id = new_id()
    key = f"reports/{report_id}/report.json"
    records_key = clips_key(key)
    buffer = io.BytesIO()
    records.save(buffer)
    ctx.store.put_bytes(records_key, buffer.getvalue())
    report["per_clip"]["file"] = CLIPS_FILE
    ctx.store.put_bytes(key, json.dumps(report, indent=2).encode())

    def cleanup() -> None:
        ctx.store.delete(key)
        ctx.store.delete(records_key)

    session.add(Report(id=report_id, name=model_row.name, job_id=job.id, model_id=model_row.id,
                       dataset_id=dataset.id, artifact_key=key, owner_id=job.owner_id))
    _succeed_with(session, job.id, run.attempt,
                  progress={"phase": "done", "clean_accuracy": report["clean"]["accuracy"],
                            "worst_case": [w["overall"]["accuracy"] for w in report["worst_case"]],
                            "flags": len(report["diagnostics"]["flags"])},
                  cleanup=cleanup)


@app.task(name=EVALUATE_TASK, acks_late=True, reject_on_worker_lost=True)
def evaluate_job(job_id: str) -> None:
    run_job(job_id, _evaluate_body)


# ---------------------------------------------------------------------------------------
# Lost workers


def reap_stale_jobs(sessions: sessionmaker[Session], timeout_s: float, max_attempts: int,
                    requeue: Callable[[Job], None]) -> list[tuple[str, str]]:
    """Requeue (or fail, after ``max_attempts``) running jobs whose heartbeat is older than
    ``timeout_s``. Returns ``[(job_id, new_status)]``."""
    cutoff = utcnow() - dt.timedelta(seconds=timeout_s)
    changed = []
    with sessions() as session:
        stale = session.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff)).all()
        for job in stale:
            last_heartbeat = job.heartbeat_at
            if job.cancel_requested:
                status, error = "cancelled", None
            elif job.attempts >= max_attempts:
                status, error = "failed", (f"worker lost: no heartbeat for {timeout_s:.0f}s "
                                           f"(attempt {job.attempts} of {max_attempts})")
            else:
                status, error = "queued", None
            values: dict[str, Any] = {"status": status, "error": error, "heartbeat_at": None}
            if status != "queued":
                values["finished_at"] = utcnow()
            result = session.execute(update(Job).where(Job.id == job.id, Job.status == "running",
                                                       Job.attempts == job.attempts).values(**values))
            session.commit()
            if result.rowcount == 1:
                log.warning("job %s: no heartbeat since %s -> %s", job.id, last_heartbeat, status)
                changed.append((job.id, status))
                if status == "queued":
                    try:
                        requeue(job)
                    except Exception:  # a broker hiccup must not end the pass for the other jobs
                        log.exception("job %s: requeued, but its message could not be sent", job.id)
    return changed


def _send(job: Job) -> None:
    app.send_task(TASK_FOR_KIND[job.kind], args=[job.id])


def reap_once() -> list[tuple[str, str]]:
    ctx = context()
    return reap_stale_jobs(ctx.sessions, ctx.settings.heartbeat_timeout_s, ctx.settings.max_attempts, _send)


def _reaper_loop(stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            reap_once()
        except Exception:
            log.exception("reaping stale jobs failed")


_reaper_stop = threading.Event()


@signals.worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    settings = context().settings
    if settings.worker_torch_threads > 0:
        import torch

        torch.set_num_threads(settings.worker_torch_threads)
    try:
        reap_once()
    except Exception:
        log.exception("reaping stale jobs at start failed")
    every = max(1.0, settings.heartbeat_timeout_s / 3)
    threading.Thread(target=_reaper_loop, args=(_reaper_stop, every), name="reaper", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    _reaper_stop.set()
