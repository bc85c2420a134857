"""Celery tasks: a job id in, rows and artefacts out. Glue around ``models.train`` and
``models.evaluate``; no science here.

Life of a job (the ``jobs`` row is the system of record):

1. ``claim``: one atomic UPDATE moves the row from ``queued`` to ``running`` and bumps
   ``attempts``; a duplicate delivery (acks-late redelivery, a requeue, the outbox sending
   again) finds nothing to claim and returns. The attempt number is the run's ownership
   token: every later write is conditional on it, so a run that was declared lost cannot
   overwrite its successor.
2. The job's rows are read in short transactions and the session closed: no transaction
   stays open while a job trains or attacks (hours on real data).
3. While it runs, a heartbeat thread refreshes ``heartbeat_at`` and uploads the attempt's
   log; progress callbacks write ``progress`` (throttled) and the cancel flag is polled for
   ``should_stop``. Those writes are best effort: during a database outage training goes on
   and the next write catches up.
4. Training uploads every epoch's ``last/`` checkpoint to the store (new prefix, then a
   pointer object), so a retried job resumes from its last finished epoch. The final
   checkpoint is uploaded completely before the ``models`` row is inserted, in the same
   transaction that marks the job succeeded. Uploads and the final write retry through a
   backend outage of up to ``outage_tolerance_s`` (``service.backends.retrying``).
5. ``service.reaper`` (in every worker and every API process) requeues a ``running`` job
   whose heartbeat is too old - its worker died - and re-sends queued jobs whose message
   may be lost. Each worker also records itself in ``workers`` every heartbeat interval,
   which ``/readyz`` and ``/metrics`` read.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from celery import signals
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from robustact.service.backends import is_outage, retrying
from robustact.service.db import Dataset, Job, Model, Report, Worker, file_lock, make_engine, make_sessionmaker, new_id, utcnow
from robustact.service.reaper import Reaper
from robustact.service.settings import Settings
from robustact.service.store import CLIPS_FILE, ObjectNotFound, Store, clips_key, materialize_dir, open_store
from robustact.worker.celery_app import EVALUATE_TASK, MERGE_TASK, SHARD_TASK, TRAIN_TASK, app

log = logging.getLogger("robustact.worker")

PROGRESS_EVERY_S = 1.0
CANCEL_POLL_S = 1.0
# A running attempt's log is uploaded this often (and at every epoch end), so the log of an
# attempt whose worker was killed is kept up to its last minutes.
LOG_UPLOAD_EVERY_S = 10.0

T = TypeVar("T")


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    store: Store

    def patient(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried through a database or store outage of up to ``outage_tolerance_s``."""
        return retrying(fn, what, self.settings.outage_tolerance_s, log)

    def read(self, table: type[T], key: str | None) -> T | None:
        """A row by primary key, read in a short transaction (the object comes back detached,
        its columns loaded)."""
        if key is None:
            return None

        def get():
            with self.sessions() as session:
                return session.get(table, key)

        return self.patient(f"read {table.__tablename__} {key}", get)


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


def attempt_log_key(job_id: str, attempt: int) -> str:
    return f"jobs/{job_id}/logs/attempt-{attempt:04d}.log"


class JobRun:
    """Progress, cancellation, heartbeat and the log of one attempt at one job."""

    def __init__(self, ctx: Context, job_id: str, attempt: int, log_path: Path):
        self.ctx, self.job_id, self.attempt = ctx, job_id, attempt
        self.cancel_seen = False
        self.lost = False
        self._last_progress_write = 0.0
        self._last_cancel_poll = 0.0
        self._last_log_upload = 0.0
        self._log_uploaded_size = -1
        self._log_lock = threading.Lock()
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

    def _try_write(self, what: str, **values: Any) -> None:
        """A best-effort write: during an outage the job goes on, the next write catches up."""
        try:
            self._write(**values)
        except Exception as e:
            if not is_outage(e):
                raise
            log.warning("job %s: %s not recorded, the database is unavailable (%s)", self.job_id, what,
                        type(e).__name__)

    def _beat(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_interval_s):
            try:
                self._write(heartbeat_at=utcnow())
            except Exception as e:  # a database hiccup must not kill the job; the next beat retries
                log.warning("heartbeat of job %s failed (%s: %s)", self.job_id, type(e).__name__, e)
            if time.monotonic() - self._last_log_upload >= LOG_UPLOAD_EVERY_S:
                self.upload_log()

    def upload_log(self, strict: bool = False) -> bool:
        """Put this attempt's log in the store (if it grew); False if that failed (``strict``:
        raise instead)."""
        with self._log_lock:
            self._last_log_upload = time.monotonic()
            try:
                self._handler.flush()
                size = self.log_path.stat().st_size
                if size != self._log_uploaded_size:
                    self.ctx.store.put_file(attempt_log_key(self.job_id, self.attempt), self.log_path)
                    self._log_uploaded_size = size
                return True
            except Exception as e:
                if strict:
                    raise
                log.warning("job %s: log not uploaded (%s: %s)", self.job_id, type(e).__name__, e)
                return False

    def progress(self, info: dict[str, Any]) -> None:
        now = time.monotonic()
        epoch_end = info.get("phase") == "epoch"
        if epoch_end:
            log.info("progress %s", json.dumps(info, default=str))
        if epoch_end or now - self._last_progress_write >= PROGRESS_EVERY_S:
            self._last_progress_write = now
            self._try_write("progress", progress=_jsonable(info), heartbeat_at=utcnow())
        if epoch_end:
            self.upload_log()

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self.cancel_seen and now - self._last_cancel_poll >= CANCEL_POLL_S:
            self._last_cancel_poll = now
            try:
                with self.ctx.sessions() as session:
                    self.cancel_seen = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
            except Exception as e:
                if not is_outage(e):
                    raise
        return self.cancel_seen or self.lost


def _jsonable(info: Any) -> Any:
    """``info`` as plain JSON that every database accepts: Postgres' JSON type refuses NaN
    and infinities (a diverged loss, an accuracy over no clip), so they become null."""
    return _finite(json.loads(json.dumps(info, default=str)))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# The job this worker process runs now (the worker's heartbeat reports it).
_current_job: str | None = None


def run_job(job_id: str, body: Callable[[Context, Job, JobRun], None],
            claimer: Callable[[sessionmaker[Session], str, str], int | None] = claim) -> None:
    global _current_job
    ctx = context()
    attempt = ctx.patient(f"job {job_id}: claim", lambda: claimer(ctx.sessions, job_id, worker_name()))
    if attempt is None:
        log.info("job %s: nothing to claim (finished, cancelled or running elsewhere)", job_id)
        return
    work = ctx.settings.cache_dir / "jobs" / job_id
    run = JobRun(ctx, job_id, attempt, work / f"attempt-{attempt}.log")
    _current_job = job_id
    try:
        with run:
            log.info("job %s: attempt %d on %s", job_id, attempt, worker_name())
            job = None
            try:
                job = ctx.read(Job, job_id)
                body(ctx, job, run)
            except Exception as e:
                from robustact.models.evaluate import EvaluationCancelled
                from robustact.models.train import TrainingCancelled

                if run.cancel_seen or isinstance(e, (TrainingCancelled, EvaluationCancelled)):
                    log.info("job %s: cancelled (%s)", job_id, e)
                    status, error = "cancelled", None
                else:
                    log.exception("job %s failed", job_id)
                    status, error = "failed", f"{type(e).__name__}: {e}"
                try:
                    ctx.patient(f"job {job_id}: record {status}",
                                lambda: finish(ctx.sessions, job_id, attempt, status, error))
                except Exception:  # still unreachable: the reaper settles the row later
                    log.exception("job %s: could not record that it %s", job_id, status)
            if job is not None and job.parent_id:
                _settle_parent(ctx, job.parent_id)
        ctx.patient(f"job {job_id}: upload its log", lambda: run.upload_log(strict=True))
    except Exception:
        log.exception("job %s: its log could not be uploaded", job_id)
    finally:
        _current_job = None
    # The store holds what a retry needs (the last epoch checkpoint); local scratch goes.
    shutil.rmtree(work, ignore_errors=True)


def _commit_success(ctx: Context, job_id: str, attempt: int, new_rows: Callable[[], list],
                    progress: dict | None, cleanup: Callable[[], None]) -> None:
    """Commit ``new_rows()`` together with the job's success (retried through an outage), or
    undo the uploads they point at."""
    values: dict[str, Any] = {"status": "succeeded", "finished_at": utcnow(), "heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = _jsonable(progress)

    def commit() -> None:
        with ctx.sessions() as session:
            result = session.execute(update(Job).where(*_owned(job_id, attempt)).values(**values))
            if result.rowcount != 1:
                session.rollback()
                status = session.scalar(select(Job.status).where(Job.id == job_id, Job.attempts == attempt))
                if status == "succeeded":  # an earlier try committed and its answer was lost
                    return
                raise LostOwnership(f"job {job_id} is no longer owned by attempt {attempt}")
            session.add_all(new_rows())
            session.commit()

    try:
        ctx.patient(f"job {job_id}: record the result", commit)
    except BaseException:
        try:
            cleanup()
        except Exception:
            log.exception("job %s: could not delete the uploads of a result that was not recorded", job_id)
        raise


# ---------------------------------------------------------------------------------------
# Data and checkpoints on local disk


def dataset_root(ctx: Context, dataset: Dataset) -> Path:
    """A local directory with the dataset's NTU layout (downloaded once from s3://)."""
    if not dataset.location.startswith("s3://"):
        return Path(dataset.location)
    target = ctx.settings.cache_dir / "datasets" / dataset.id / "source"
    source = open_store(dataset.location, ctx.settings.s3_endpoint_url, ctx.settings.s3_region)
    with file_lock(target.with_name("source.lock")):
        return ctx.patient(f"download dataset {dataset.id}", lambda: materialize_dir(source, "", target))


def prepared_cache(ctx: Context, dataset: Dataset, model_cfg, run: "JobRun") -> Path:
    """The decoded cache of ``dataset`` at the model's input geometry, once per host: the
    one a prepare job put in the object store if there is one (downloaded), else decoded
    here (``prepare`` itself writes a temp directory and renames it into place)."""
    from robustact.models.data.cache import META_FILE, prepare
    from robustact.service.shards import cache_location

    geometry = {"rgb_frames": model_cfg.rgb_frames, "rgb_size": model_cfg.rgb_size,
                "skel_frames": model_cfg.skel_frames}
    name = f"{model_cfg.rgb_frames}f{model_cfg.rgb_size}px{model_cfg.skel_frames}s"
    cache = ctx.settings.cache_dir / "datasets" / dataset.id / name
    with file_lock(cache.with_name(name + ".lock")):
        if not (cache / META_FILE).is_file():
            stored = cache_location(dataset.id, geometry)
            if ctx.patient(f"look for a prepared cache of {dataset.id}",
                           lambda: ctx.store.exists(f"{stored}/{META_FILE}")):
                log.info("downloading the prepared cache %s into %s", stored, cache)
                run.progress({"phase": "download cache"})
                shutil.rmtree(cache, ignore_errors=True)
                ctx.patient(f"download the prepared cache {stored}", lambda: materialize_dir(ctx.store, stored, cache))
            else:
                log.info("preparing %s (%s) into %s", dataset.name, dataset.location, cache)
                prepare(dataset_root(ctx, dataset), cache, rgb_frames=model_cfg.rgb_frames,
                        rgb_size=model_cfg.rgb_size, skel_frames=model_cfg.skel_frames,
                        progress=lambda done, total: run.progress({"phase": "prepare", "step": done,
                                                                   "steps": total}))
    return cache


def model_dir(ctx: Context, model: Model) -> Path:
    target = ctx.settings.cache_dir / "models" / model.id
    return ctx.patient(f"download model {model.id}", lambda: materialize_dir(ctx.store, model.artifact_prefix, target))


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
    from robustact.models.train import LAST_DIR

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
    log.info("job %s: restored the epoch %d checkpoint from the store (%s)", job_id, pointer["epoch"],
             pointer["prefix"])
    return pointer["epoch"]


def _train_body(ctx: Context, job: Job, run: JobRun) -> None:
    from robustact.models.config import ModelConfig, TrainConfig
    from robustact.models.data.cache import load_split
    from robustact.models.train import MODEL_DIR, train

    params = job.params
    dataset = ctx.read(Dataset, job.dataset_id)
    model_cfg = ModelConfig.from_dict(params["model_config"])
    train_cfg = TrainConfig.from_dict(params["train_config"])
    data_source = prepared_cache(ctx, dataset, model_cfg, run)
    data = load_split(str(data_source), params["protocol"], "train", params.get("max_samples"), train_cfg.seed)
    work = ctx.settings.cache_dir / "jobs" / job.id
    resumed = ctx.patient(f"job {job.id}: restore its checkpoint", lambda: restore_last(ctx.store, job.id, work))
    if resumed:
        log.info("job %s: resuming after epoch %d", job.id, resumed)

    def on_checkpoint(path: Path, epoch: int) -> None:
        ctx.patient(f"job {job.id}: upload the epoch {epoch} checkpoint",
                    lambda: upload_last(ctx.store, job.id, path, epoch))

    devices = params.get("devices") or 1
    if devices > 1:  # DistributedDataParallel over local processes (GPUs, or gloo on the CPU)
        from robustact.models.distributed import train_data_parallel

        threads = ctx.settings.worker_torch_threads or None
        summary = train_data_parallel(
            model_cfg, train_cfg, functools.partial(load_split, str(data_source), params["protocol"], "train",
                                                    params.get("max_samples"), train_cfg.seed),
            work, nproc=devices, device=ctx.settings.device, preset=params["preset"], progress=run.progress,
            should_stop=run.should_stop, on_checkpoint=on_checkpoint, resume=True,
            threads=max(1, threads // devices) if threads else None)
    else:
        summary = train(model_cfg, train_cfg, data, work, preset=params["preset"], progress=run.progress,
                        should_stop=run.should_stop, on_checkpoint=on_checkpoint,
                        device=device_name(ctx.settings), resume=True, num_workers=ctx.settings.loader_workers)
    log.info("job %s: trained %d epochs", job.id, summary["epochs"])

    name = params.get("name") or f"{train_cfg.defence}-{job.id[:8]}"
    model = ctx.patient(f"job {job.id}: upload the model", lambda: upload_model(
        ctx.store, work / MODEL_DIR, name=name, job_id=job.id, dataset_id=dataset.id, owner_id=job.owner_id))
    _commit_success(ctx, job.id, run.attempt, lambda: [Model(**model)],
                    progress={"phase": "done", **summary["history"][-1]} if summary["history"] else None,
                    cleanup=lambda: ctx.store.delete_prefix(model["artifact_prefix"]))
    try:  # the epoch checkpoint is not needed any more
        pointer = _read_pointer(ctx.store, job.id)
        if pointer:
            ctx.store.delete_prefix(pointer["prefix"])
            ctx.store.delete(_last_pointer(job.id))
    except Exception:
        log.exception("job %s: its last epoch checkpoint was left in the store", job.id)


def upload_model(store: Store, checkpoint_dir: Path, name: str, job_id: str | None = None,
                 dataset_id: str | None = None, owner_id: str | None = None) -> dict[str, Any]:
    """Upload a checkpoint directory completely under a new model id; returns the columns
    of its ``models`` row (a model row never points at a partial upload)."""
    model_id = new_id()
    prefix = f"models/{model_id}"
    store.put_dir(prefix, checkpoint_dir)
    config = _jsonable(json.loads((Path(checkpoint_dir) / "config.json").read_text()))
    return dict(id=model_id, name=name, job_id=job_id, dataset_id=dataset_id, config=config, artifact_prefix=prefix,
                owner_id=owner_id)


def add_model(session: Session, store: Store, checkpoint_dir: Path, name: str, job_id: str | None = None,
              dataset_id: str | None = None, owner_id: str | None = None) -> Model:
    """Upload a checkpoint directory completely, then add (not commit) its ``models`` row."""
    model = Model(**upload_model(store, checkpoint_dir, name, job_id, dataset_id, owner_id))
    session.add(model)
    return model


@app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
def train_job(job_id: str) -> None:
    run_job(job_id, _train_body)


# ---------------------------------------------------------------------------------------
# Evaluation


def _evaluation_inputs(ctx: Context, job: Job, run: JobRun):
    """(model row, dataset row, model, checkpoint meta, the evaluated clips, suite) of an
    evaluation job ``job`` (for a shard: its parent)."""
    from robustact.models.checkpoint import load_checkpoint, resolve_device
    from robustact.models.config import AttackConfig, ModelConfig
    from robustact.models.data.cache import ClipDataset

    params = job.params
    model_row = ctx.read(Model, job.model_id)
    dataset = ctx.read(Dataset, job.dataset_id)
    model, meta = load_checkpoint(model_dir(ctx, model_row), device=resolve_device(device_name(ctx.settings)))
    cache = prepared_cache(ctx, dataset, ModelConfig.from_dict(meta["model"]), run)
    data = ClipDataset(cache, protocol=params["protocol"], split=params["split"], normalisation=meta.get("normalisation"))
    if params.get("max_samples"):
        data = data.subset(params["max_samples"], seed=params["seed"])
    suite = [AttackConfig.from_dict(d) for d in params["suite"]]
    return model_row, dataset, model, meta, data, suite


def _dataset_info(dataset: Dataset, params: dict) -> dict:
    return {"id": dataset.id, "name": dataset.name, "format": dataset.format, "protocol": params["protocol"],
            "split": params["split"]}


def _evaluate_body(ctx: Context, job: Job, run: JobRun) -> None:
    from robustact.models.evaluate import evaluate

    params = job.params
    model_row, dataset, model, meta, data, suite = _evaluation_inputs(ctx, job, run)
    report, records = evaluate(model, meta, data, suite, batch_size=params["batch_size"], seed=params["seed"],
                               strategy=params.get("strategy", "full"), diagnostics=params.get("diagnostics", True),
                               progress=run.progress, should_stop=run.should_stop, device=device_name(ctx.settings),
                               dataset_info=_dataset_info(dataset, params), num_workers=ctx.settings.loader_workers,
                               model_info={"name": model_row.name, "id": model_row.id})
    _store_report(ctx, job, run, model_row, dataset, report, records)


def _store_report(ctx: Context, job: Job, run: JobRun, model_row: Model, dataset: Dataset, report: dict,
                  records) -> None:
    """Upload the report and its per-clip table, then commit the ``reports`` row with the
    job's success."""
    report_id = new_id()
    key = f"reports/{report_id}/report.json"
    records_key = clips_key(key)
    buffer = io.BytesIO()
    records.save(buffer)
    report["per_clip"]["file"] = CLIPS_FILE
    document = json.dumps(report, indent=2).encode()

    def upload() -> None:
        ctx.store.put_bytes(records_key, buffer.getvalue())
        ctx.store.put_bytes(key, document)

    def cleanup() -> None:
        ctx.store.delete(key)
        ctx.store.delete(records_key)

    ctx.patient(f"job {job.id}: upload the report", upload)
    _commit_success(ctx, job.id, run.attempt,
                    lambda: [Report(id=report_id, name=model_row.name, job_id=job.id, model_id=model_row.id,
                                    dataset_id=dataset.id, artifact_key=key, owner_id=job.owner_id)],
                    progress={"phase": "done", "clean_accuracy": report["clean"]["accuracy"],
                              "worst_case": [w["overall"]["accuracy"] for w in report["worst_case"]],
                              "flags": len(report["diagnostics"]["flags"])},
                    cleanup=cleanup)


@app.task(name=EVALUATE_TASK, acks_late=True, reject_on_worker_lost=True)
def evaluate_job(job_id: str) -> None:
    run_job(job_id, _evaluate_body)


# ---------------------------------------------------------------------------------------
# Sharded evaluation (``service.shards``)


def _settle_parent(ctx: Context, parent_id: str) -> None:
    from robustact.service.shards import settle

    def send_merge(pid: str) -> None:
        app.send_task(MERGE_TASK, args=[pid])

    try:
        with ctx.sessions() as session:
            settle(session, parent_id, send_merge, ctx.settings.heartbeat_timeout_s)
    except Exception:  # the housekeeping pass settles it later
        log.exception("evaluation %s: could not be settled after its shard", parent_id)


def _save_npz(arrays: dict) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(data: bytes) -> dict:
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _shard_body(ctx: Context, job: Job, run: JobRun) -> None:
    parent = ctx.read(Job, job.parent_id)
    if parent.kind == "prepare":
        _prepare_shard(ctx, job, parent, run)
    else:
        _evaluate_shard(ctx, job, parent, run)


def _take_units(ctx: Context, job: Job, parent: Job, run: JobRun, total: int, done: list[int],
                work: Callable[[int, dict, str], None]) -> None:
    """Take units of ``parent``'s plan until none is left: ``work(unit, spec, key)`` saves
    the unit's result at ``key`` in the store (skipped when it is there already: a worker
    that died after saving it)."""
    from robustact.service.shards import finish_unit, take_unit, unit_key

    def take():
        with ctx.sessions() as session:
            return take_unit(session, parent.id, job.id)

    def finish(k: int) -> None:
        with ctx.sessions() as session:
            finish_unit(session, parent.id, k, job.id)

    log.info("job %s: %d units in the plan, %d done by this shard before", job.id, total, len(done))
    while (taken := ctx.patient(f"job {job.id}: take a unit", take)) is not None:
        k, spec = taken
        if run.should_stop():
            from robustact.models.evaluate import EvaluationCancelled

            raise EvaluationCancelled(f"stopped before unit {k + 1} of {total}")
        key = unit_key(parent.id, k)
        if ctx.patient(f"job {job.id}: look for unit {k + 1}", lambda: ctx.store.exists(key)):
            log.info("job %s: unit %d was saved before this attempt", job.id, k + 1)
        else:
            run.progress({"phase": parent.kind, "unit": k + 1, "units": total, "units_done": len(done),
                          "step": len(done), "steps": total})
            work(k, spec, key)
        ctx.patient(f"job {job.id}: mark unit {k + 1} done", lambda: finish(k))
        done.append(k)
    log.info("job %s: no unit left; this shard did %d of %d", job.id, len(done), total)
    _commit_success(ctx, job.id, run.attempt, lambda: [],
                    progress={"phase": "done", "units_done": len(done), "units": total, "step": len(done),
                              "steps": total}, cleanup=lambda: None)


def _start_shard(ctx: Context, job: Job, parent: Job) -> tuple[dict | None, list[int]]:
    """Mark the parent running; (its plan if made, the units this shard finished before)."""
    from robustact.service.shards import read_plan, start_parent, units_done_by

    def started() -> tuple[dict | None, list[int]]:
        with ctx.sessions() as session:
            start_parent(session, parent.id)
            return read_plan(session, parent.id), units_done_by(session, parent.id, job.id)

    return ctx.patient(f"job {job.id}: start job {parent.id}", started)


def _record_plan(ctx: Context, job: Job, parent: Job, key: str | None, units: list[dict]) -> dict:
    from robustact.service.shards import make_plan

    def record() -> dict:
        with ctx.sessions() as session:
            return make_plan(session, parent.id, job.id, key, units)

    return ctx.patient(f"job {job.id}: record the plan", record)


def _prepare_shard(ctx: Context, job: Job, parent: Job, run: JobRun) -> None:
    """Decode units of samples into clip files in the store (``{cache}/clips/NAME.npz``)
    and save each unit's skeleton arrays, which the merge assembles the cache from."""
    import numpy as np

    from robustact.models.data.cache import clip_arrays, decode_samples
    from robustact.models.data.layouts import find_samples

    params = parent.params
    geometry = params["geometry"]
    root = dataset_root(ctx, ctx.read(Dataset, parent.dataset_id))
    plan, done = _start_shard(ctx, job, parent)
    log.info("job %s: shard %d of %d of prepare %s (%s)", job.id, job.shard_index + 1, parent.shard_count,
             parent.id, params["cache"])
    if plan is None:
        names = [s.name for s in find_samples(root)]
        per = max(1, ctx.settings.prepare_unit_samples)
        plan = _record_plan(ctx, job, parent, None, [{"names": names[i:i + per]} for i in range(0, len(names), per)])
        if plan["shard"] == job.id:
            log.info("job %s: planned %d units of up to %d samples", job.id, plan["units"], per)

    def work(k: int, spec: dict, key: str) -> None:
        scratch = ctx.settings.cache_dir / "jobs" / job.id / f"unit-{k:06d}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            reasons = decode_samples(root, scratch, spec["names"], geometry["rgb_frames"], geometry["rgb_size"],
                                     geometry["skel_frames"], workers=ctx.settings.prepare_workers)
            kept = [n for n, reason in reasons.items() if reason is None]
            for name in kept:
                path = scratch / f"{name}.npz"
                ctx.patient(f"job {job.id}: upload clip {name}",
                            lambda: ctx.store.put_file(f"{params['cache']}/clips/{name}.npz", path))
            arrays = [clip_arrays(scratch / f"{n}.npz") for n in kept]
            body = _save_npz({
                "names": np.array(json.dumps(spec["names"])), "reasons": np.array(json.dumps(reasons)),
                "infos": np.array(json.dumps([a[0] for a in arrays])),
                "skel": np.stack([a[1] for a in arrays]) if arrays else np.zeros((0,), np.float32),
                "coords_min": np.stack([a[2] for a in arrays]) if arrays else np.zeros((0, 3)),
                "coords_max": np.stack([a[3] for a in arrays]) if arrays else np.zeros((0, 3)),
                "clip_bytes": np.array([(scratch / f"{n}.npz").stat().st_size for n in kept], dtype=np.int64)})
            ctx.patient(f"job {job.id}: save unit {k + 1}", lambda: ctx.store.put_bytes(key, body))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("job %s: unit %d of %d saved (%d samples decoded, %d skipped)", job.id, k + 1, plan["units"],
                 len(kept), len(reasons) - len(kept))

    _take_units(ctx, job, parent, run, plan["units"], done, work)


# At most this many units in a sharded evaluation's plan (rows of job_units, objects in the
# store); beyond, a unit holds several consecutive batches.
MAX_UNITS = 4096


def _evaluate_shard(ctx: Context, job: Job, parent: Job, run: JobRun) -> None:
    from robustact.models.evaluate import clean_records, clip_identities, plan_units, run_unit
    from robustact.service.shards import first_stage_key

    params = parent.params
    _model_row, _dataset, model, _meta, data, suite = _evaluation_inputs(ctx, parent, run)
    ids = clip_identities(data)
    strategy, device = params.get("strategy", "full"), device_name(ctx.settings)
    workers = ctx.settings.loader_workers
    plan, done = _start_shard(ctx, job, parent)
    log.info("job %s: shard %d of %d of evaluation %s (%d clips)", job.id, job.shard_index + 1, parent.shard_count,
             parent.id, len(data))
    if plan is None:  # the first stage: the clean pass
        run.progress({"phase": "clean"})
        table = clean_records(model, data, suite, batch_size=params["batch_size"], device=device, clip_ids=ids,
                              should_stop=run.should_stop, num_workers=workers)
        units = [{"group": g, "rows": rows} for g, rows in plan_units(
            table, suite, strategy, params.get("diagnostics", True), params["batch_size"], max_units=MAX_UNITS)]
        key = first_stage_key(parent.id, job.id)
        buffer = io.BytesIO()
        table.save(buffer)
        ctx.patient(f"job {job.id}: save its clean pass", lambda: ctx.store.put_bytes(key, buffer.getvalue()))
        plan = _record_plan(ctx, job, parent, key, units)
        if plan["shard"] == job.id:
            log.info("job %s: clean pass done, %d of %d clips correct; planned %d units", job.id,
                     int(table.clean_correct.sum()), len(data), len(units))
        else:
            log.info("job %s: shard %s recorded its plan first; using it", job.id, plan["shard"])
            ctx.store.delete(key)

    def work(k: int, spec: dict, key: str) -> None:
        result = run_unit(model, data, suite, (spec["group"], spec["rows"]), strategy=strategy, seed=params["seed"],
                          clip_ids=ids, batch_size=params["batch_size"], device=device, should_stop=run.should_stop,
                          num_workers=workers)
        body = _save_npz(result)
        ctx.patient(f"job {job.id}: save unit {k + 1}", lambda: ctx.store.put_bytes(key, body))
        log.info("job %s: unit %d of %d saved (group %d, %d clips)", job.id, k + 1, plan["units"], spec["group"],
                 len(spec["rows"]))

    _take_units(ctx, job, parent, run, plan["units"], done, work)


@app.task(name=SHARD_TASK, acks_late=True, reject_on_worker_lost=True)
def evaluate_shard_job(job_id: str) -> None:
    run_job(job_id, _shard_body)


def claim_merge(sessions: sessionmaker[Session], job_id: str, worker: str) -> int | None:
    """Take the merge of a sharded evaluation whose shards all succeeded (a new attempt on
    the running parent: an older merge still at work loses ownership)."""
    from robustact.service.shards import children

    with sessions() as session:
        if not all(c.status == "succeeded" for c in children(session, job_id)):
            return None
        result = session.execute(update(Job).where(Job.id == job_id, Job.status == "running",
                                                   Job.shard_count.is_not(None))
                                 .values(attempts=Job.attempts + 1, heartbeat_at=utcnow(), worker=worker))
        session.commit()
        if result.rowcount != 1:
            return None
        return session.scalar(select(Job.attempts).where(Job.id == job_id))


def _merge_body(ctx: Context, job: Job, run: JobRun) -> None:
    if job.kind == "prepare":
        _merge_prepare(ctx, job, run)
    else:
        _merge_evaluation(ctx, job, run)


def _merge_prepare(ctx: Context, job: Job, run: JobRun) -> None:
    """Assemble the cache from the units' skeleton arrays (the clip files are in the store
    already) and upload ``skel.npy``, ``labels.npy``, ``prepare.json`` and, last,
    ``meta.json``: a cache in the store is complete once its meta is there."""
    from robustact.models.data.cache import LABELS_FILE, MANIFEST_FILE, META_FILE, SKEL_FILE, assemble_cache
    from robustact.service.shards import read_plan, unit_prefix

    params, geometry = job.params, job.params["geometry"]

    def plan() -> dict | None:
        with ctx.sessions() as session:
            return read_plan(session, job.id)

    recorded = ctx.patient(f"job {job.id}: read its plan", plan)
    keys = sorted(ctx.patient(f"job {job.id}: list its units", lambda: ctx.store.list(unit_prefix(job.id))))
    if recorded is None or len(keys) != recorded["units"]:
        raise RuntimeError(f"{len(keys)} unit results in the store, the plan has {recorded and recorded['units']}")
    arrays, skipped, clip_bytes = {}, {}, 0
    for key in keys:
        unit = _load_npz(ctx.patient(f"job {job.id}: read {key}", lambda: ctx.store.get_bytes(key)))
        reasons = json.loads(str(unit["reasons"]))
        infos = json.loads(str(unit["infos"]))
        kept = [n for n in json.loads(str(unit["names"])) if reasons[n] is None]
        skipped.update({n: r for n, r in reasons.items() if r is not None})
        for i, name in enumerate(kept):
            arrays[name] = (infos[i], unit["skel"][i], unit["coords_min"][i], unit["coords_max"][i])
        clip_bytes += int(unit["clip_bytes"].sum())
    root = dataset_root(ctx, ctx.read(Dataset, job.dataset_id))
    work = ctx.settings.cache_dir / "jobs" / job.id / "assembled"
    shutil.rmtree(work, ignore_errors=True)
    try:
        meta = assemble_cache(root, work, arrays.__getitem__, skipped, clip_bytes, geometry["rgb_frames"],
                              geometry["rgb_size"], geometry["skel_frames"])
        for name in (SKEL_FILE, LABELS_FILE, MANIFEST_FILE, META_FILE):  # the meta last
            ctx.patient(f"job {job.id}: upload {name}",
                        lambda: ctx.store.put_file(f"{params['cache']}/{name}", work / name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("job %s: cache %s assembled: %d samples, %d skipped, %d bytes per clip", job.id, params["cache"],
             meta["num_samples"], len(meta["skipped"]), meta["bytes_per_clip"])
    _commit_success(ctx, job.id, run.attempt, lambda: [],
                    progress={"phase": "done", "cache": params["cache"], "samples": meta["num_samples"],
                              "skipped": len(meta["skipped"]), "bytes_per_clip": meta["bytes_per_clip"]},
                    cleanup=lambda: None)
    try:
        ctx.store.delete_prefix(unit_prefix(job.id))
    except Exception:
        log.exception("job %s: its unit results were left in the store", job.id)


def _merge_evaluation(ctx: Context, job: Job, run: JobRun) -> None:
    from robustact.models.checkpoint import load_checkpoint, resolve_device
    from robustact.models.evaluate import ClipRecords, apply_unit
    from robustact.models.report import build_report
    from robustact.service.shards import unit_prefix, read_plan

    def plan() -> dict | None:
        with ctx.sessions() as session:
            return read_plan(session, job.id)

    recorded = ctx.patient(f"job {job.id}: read its plan", plan)
    if recorded is None:
        raise RuntimeError("every shard succeeded, yet no plan was recorded")
    records = ClipRecords.load(io.BytesIO(ctx.patient(f"job {job.id}: read the clean pass",
                                                      lambda: ctx.store.get_bytes(recorded["key"]))))
    prefix = unit_prefix(job.id)
    keys = sorted(ctx.patient(f"job {job.id}: list its units", lambda: ctx.store.list(prefix)))
    if len(keys) != recorded["units"]:
        raise RuntimeError(f"{len(keys)} unit results in the store, the plan has {recorded['units']}")
    for key in keys:
        apply_unit(records, _load_npz(ctx.patient(f"job {job.id}: read {key}", lambda: ctx.store.get_bytes(key))))
    records.meta = {"seed": job.params["seed"], "strategy": job.params.get("strategy", "full"),
                    "diagnostics": job.params.get("diagnostics", True)}
    if len(records.clip) != job.params["clips"]:
        raise RuntimeError(f"the clean pass holds {len(records.clip)} clips, the evaluation has {job.params['clips']}")
    params = job.params
    model_row = ctx.read(Model, job.model_id)
    dataset = ctx.read(Dataset, job.dataset_id)
    device = resolve_device(device_name(ctx.settings))
    model, meta = load_checkpoint(model_dir(ctx, model_row), device=device)
    amr = model.amr_weights() if hasattr(model, "amr_weights") else []
    seconds = (utcnow() - job.started_at).total_seconds() if job.started_at else None
    report = build_report(records, meta, dataset_info=_dataset_info(dataset, params),
                          model_info={"name": model_row.name, "id": model_row.id}, amr_weights=amr,
                          config={"batch_size": params["batch_size"], "device": str(device),
                                  "shards": job.shard_count}, seconds=seconds)
    log.info("job %s: merged %d shard(s), %d clips", job.id, job.shard_count, len(records.clip))
    _store_report(ctx, job, run, model_row, dataset, report, records)
    try:  # the merged table is in the report now
        ctx.store.delete_prefix(prefix)
        ctx.store.delete(recorded["key"])
    except Exception:
        log.exception("job %s: its unit results were left in the store", job.id)


@app.task(name=MERGE_TASK, acks_late=True, reject_on_worker_lost=True)
def merge_shards_job(job_id: str) -> None:
    run_job(job_id, _merge_body, claimer=claim_merge)


# ---------------------------------------------------------------------------------------
# The worker process: its heartbeat in ``workers`` and its housekeeping


class WorkerBeat:
    """Keeps this worker's row in ``workers`` fresh (every heartbeat interval) with the job
    it runs; deletes it at a clean shutdown. A killed worker's row just goes stale."""

    def __init__(self, ctx: Context, name: str):
        self.ctx, self.name = ctx, name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
        self._failing = False

    def start(self) -> "WorkerBeat":
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        try:
            with self.ctx.sessions() as session:
                values = dict(seen_at=utcnow(), job_id=_current_job, hostname=socket.gethostname(), pid=os.getpid())
                if session.execute(update(Worker).where(Worker.name == self.name).values(**values)).rowcount != 1:
                    session.add(Worker(name=self.name, started_at=utcnow(), **values))
                session.commit()
            if self._failing:
                log.info("worker heartbeat recorded again")
            self._failing = False
        except Exception as e:
            if not self._failing:
                log.warning("worker heartbeat not recorded (%s: %s)", type(e).__name__, e)
            self._failing = True

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_interval_s):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            with self.ctx.sessions() as session:
                session.execute(delete(Worker).where(Worker.name == self.name))
                session.commit()
        except Exception as e:
            log.warning("worker row %s not removed (%s)", self.name, type(e).__name__)


_process: dict[str, Any] = {}


def worker_name() -> str:
    """This worker's Celery node name (``name@host``), or the host name outside a worker."""
    return _process.get("name") or socket.gethostname()


@signals.worker_ready.connect
def _worker_ready(sender=None, **_kwargs) -> None:
    ctx = context()
    if ctx.settings.worker_torch_threads > 0:
        import torch

        torch.set_num_threads(ctx.settings.worker_torch_threads)
    name = getattr(sender, "hostname", None) or f"{socket.gethostname()}:{os.getpid()}"
    _process["name"] = name
    _process["beat"] = WorkerBeat(ctx, name).start()
    _process["reaper"] = Reaper(ctx.sessions, ctx.settings, app).start(immediately=True)


@signals.worker_shutdown.connect
def _worker_shutdown(**_kwargs) -> None:
    if "reaper" in _process:
        _process.pop("reaper").stop()
    if "beat" in _process:
        _process.pop("beat").stop()
