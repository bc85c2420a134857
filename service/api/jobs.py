"""/v1/jobs: submit training and evaluation jobs, follow them, cancel or retry them.

A job is validated completely here (configs resolved through ``models.config``, so a bad
value is a 422 naming the field before anything is queued), written as a ``queued`` row,
and only then sent to the broker with its id. The worker owns it from there.
``new_job`` (validate → row) and ``submit_jobs`` (commit → send) are shared with
``/v1/sweeps``, which validates every job of a grid before committing them together.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, NoReturn

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from robustact.models.config import AMR_DEFENCES, AttackConfig, ConfigError, TrainConfig, preset_config, resolve_model_config
from robustact.models.data import layouts
from robustact.models.evaluate import build_suite, check_suite, default_strategy
from robustact.service.api.datasets import check_protocol, dataset_geometry, dataset_or_404
from robustact.service.api.deps import CeleryDep, SessionDep, SettingsDep, StoreDep, invalid
from robustact.service.auth import Caller, CallerDep, get_visible, scoped
from robustact.service.idempotency import IdempotencyHeader, create_once, remember
from robustact.service.db import FINISHED, ApiKey, Dataset, Job, JobGroup, Model, Report, new_id, utcnow
from robustact.service.schemas import MAX_OFFSET
from robustact.service.settings import Settings
from robustact.service.schemas import (EvaluateJobCreate, JobCreate, JobInputs, JobList, JobOutputs, JobPublic, JobStatus,
                             JobTimings, Links, PrepareJobCreate, ShardPublic, TrainJobCreate)
from robustact.service.shards import auto_shards, cache_location, cancel_parent, make_shards, retry_parent, settle
from robustact.service.store import ObjectNotFound
from robustact.worker.celery_app import MERGE_TASK, TASK_FOR_KIND

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("robustact.api")

# Fields of the engine's configs → where they sit in the request body.
_CONFIG_FIELDS = {
    "eps_rgb": ("attack", "eps"), "eps_skel": ("attack", "eps"), "alpha_rgb": ("attack", "alpha"),
    "alpha_skel": ("attack", "alpha"), "steps": ("attack", "steps"), "name": ("attack", "name"),
}


def _seconds(a, b) -> float | None:
    return (b - a).total_seconds() if a and b else None


def _fraction(shard: Job) -> float:
    """The share of its evaluation's work that a shard has done: shards take units from a
    queue, so a shard's share is not known in advance; the evaluation's fraction is the
    sum over its shards."""
    progress = shard.progress or {}
    if progress.get("phase") in ("evaluate", "prepare", "done") and progress.get("steps"):
        return min(1.0, max(0.0, progress.get("step", 0) / progress["steps"]))
    return 0.0


def _shards_progress(shards: list[Job]) -> dict[str, Any]:
    counts = {status: sum(s.status == status for s in shards) for status in ("queued", "running", "succeeded")}
    units = next((s.progress["units"] for s in shards if (s.progress or {}).get("units")), None)
    done = sum((s.progress or {}).get("units_done", 0) for s in shards)
    return {"phase": "merge" if counts["succeeded"] == len(shards) else "shards", "shards": len(shards), **counts,
            "units": units, "units_done": done, "fraction": min(1.0, sum(_fraction(s) for s in shards))}


def job_public(job: Job, model_id: str | None = None, report_id: str | None = None,
               max_attempts: int = 3, shards: list[Job] | None = None) -> JobPublic:
    links: dict[str, str] = {"self": f"/v1/jobs/{job.id}", "log": f"/v1/jobs/{job.id}/log"}
    if job.status in ("queued", "running"):
        links["cancel"] = f"/v1/jobs/{job.id}/cancel"
    if job.status in ("failed", "cancelled"):
        links["retry"] = f"/v1/jobs/{job.id}/retry"
    if job.dataset_id:
        links["dataset"] = f"/v1/datasets/{job.dataset_id}"
    if model_id:
        links["model"] = f"/v1/models/{model_id}"
    if report_id:
        links["report"] = f"/v1/reports/{report_id}"
    if job.kind == "evaluate" and job.model_id:
        links["evaluated_model"] = f"/v1/models/{job.model_id}"
    if job.group_id:
        links["sweep"] = f"/v1/sweeps/{job.group_id}"
    if job.parent_id:  # a shard: the job it is part of
        links["prepare" if (job.params or {}).get("of") == "prepare" else "evaluation"] = f"/v1/jobs/{job.parent_id}"
    progress = job.progress
    if shards and job.status in ("queued", "running"):
        progress = _shards_progress(shards)
    end = job.finished_at or (utcnow() if job.status == "running" else None)
    queued_at = job.queued_at or job.created_at
    # The wait ends when the current attempt starts (a start from before it was last queued
    # belongs to an earlier attempt), or when it was cancelled while waiting.
    waited_until = job.started_at if job.started_at and job.started_at >= queued_at else None
    if waited_until is None and job.status != "queued":
        waited_until = job.finished_at
    return JobPublic(
        id=job.id, kind=job.kind, status=job.status,
        inputs=JobInputs(dataset_id=job.dataset_id, model_id=job.model_id if job.kind == "evaluate" else None),
        params=job.params, group_id=job.group_id, progress=progress, error=job.error,
        cancel_requested=job.cancel_requested, attempts=job.attempts,
        attempts_left=max(0, max_attempts - (job.attempts - (job.attempt_base or 0))), worker=job.worker,
        timings=JobTimings(created_at=job.created_at, queued_at=queued_at, sent_at=job.sent_at,
                           started_at=job.started_at, finished_at=job.finished_at, heartbeat_at=job.heartbeat_at,
                           queued_seconds=_seconds(queued_at, waited_until),
                           running_seconds=_seconds(job.started_at, end) if waited_until == job.started_at else None),
        outputs=JobOutputs(model_id=model_id, report_id=report_id,
                           cache=job.params.get("cache") if job.kind == "prepare" and job.status == "succeeded"
                           else None), links=Links(**links),
        shards=[ShardPublic(index=s.shard_index, id=s.id, status=s.status, attempts=s.attempts, worker=s.worker,
                            fraction=_fraction(s), error=s.error) for s in shards] if shards else None)


def _outputs(session: Session, job_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    if not job_ids:
        return {}, {}
    models = dict(session.execute(select(Model.job_id, Model.id).where(Model.job_id.in_(job_ids))).all())
    reports = dict(session.execute(select(Report.job_id, Report.id).where(Report.job_id.in_(job_ids))).all())
    return models, reports


def _shards(session: Session, jobs: list[Job]) -> dict[str, list[Job]]:
    parents = [j.id for j in jobs if j.shard_count]
    found: dict[str, list[Job]] = {}
    if parents:
        for shard in session.scalars(select(Job).where(Job.parent_id.in_(parents)).order_by(Job.shard_index)):
            found.setdefault(shard.parent_id, []).append(shard)
    return found


def _public(session: Session, job: Job, settings: Settings) -> JobPublic:
    models, reports = _outputs(session, [job.id])
    return job_public(job, models.get(job.id), reports.get(job.id), settings.max_attempts,
                      _shards(session, [job]).get(job.id))


def _config_error(e: ConfigError) -> NoReturn:
    invalid(_CONFIG_FIELDS.get(e.field, (e.field,)), e.message)


def _train_params(session: Session, body: TrainJobCreate, caller: Caller) -> tuple[dict[str, Any], Dataset]:
    dataset = dataset_or_404(session, body.dataset_id, caller)
    protocol = body.protocol or dataset.protocol
    check_protocol(dataset, protocol)
    if not dataset.info["splits"][protocol]["train"]:
        invalid("protocol", f"dataset {dataset.name!r} has no training sample under {protocol}", protocol)
    num_amr = body.num_amr if body.num_amr is not None else (3 if body.defence in AMR_DEFENCES else 0)
    try:
        model_cfg = preset_config(body.preset, arch=body.arch, num_classes=len(dataset.info["class_names"]),
                                  num_amr=num_amr, **dataset_geometry(dataset))
        attack = AttackConfig(name=body.attack.name, mode="RS", steps=body.attack.steps,
                              eps_rgb=body.attack.eps / 255, eps_skel=body.attack.eps / 255,
                              alpha_rgb=body.attack.alpha / 255, alpha_skel=body.attack.alpha / 255,
                              random_start=body.attack.random_start)
        train_cfg = TrainConfig(defence=body.defence, lam=body.lam, epochs=body.epochs, batch_size=body.batch_size,
                                lr=body.lr, attack=attack, seed=body.seed)
        model_cfg = resolve_model_config(model_cfg, train_cfg)  # ExFMem bank size, fusion-only defences
    except ConfigError as e:
        _config_error(e)
    if body.batch_size % body.devices:
        invalid("batch_size", f"the global batch {body.batch_size} does not split over {body.devices} devices; "
                              f"use a multiple of {body.devices}", body.batch_size)
    params = {"request": body.model_dump(mode="json"), "name": body.name, "preset": body.preset,
              "protocol": protocol, "max_samples": body.max_samples, "devices": body.devices,
              "model_config": model_cfg.to_dict(),
              "train_config": train_cfg.to_dict()}
    return params, dataset


# What a model config without skeleton geometry fields (from before 2-D pose) was built for.
NTU_GEOMETRY = layouts.NTU.geometry()


def _shape(geometry: dict[str, int]) -> str:
    persons = geometry["persons"]
    return (f"{geometry['joints']} joints × {geometry['skel_channels']} coordinates × {persons} "
            f"bod{'y' if persons == 1 else 'ies'}")


def _evaluate_params(session: Session, body: EvaluateJobCreate,
                     caller: Caller) -> tuple[dict[str, Any], Dataset, Model]:
    model = get_visible(session, Model, body.model_id, caller, "model")
    dataset_id = body.dataset_id or model.dataset_id
    if dataset_id is None:
        invalid("dataset_id", f"model {model.id!r} has no training dataset on record; name one")
    dataset = dataset_or_404(session, dataset_id, caller)
    model_geometry = {k: model.config.get("model", {}).get(k, v) for k, v in NTU_GEOMETRY.items()}
    geometry = dataset_geometry(dataset)
    if model_geometry != geometry:
        invalid("dataset_id", f"model {model.name!r} takes skeletons of {_shape(model_geometry)}, dataset "
                              f"{dataset.name!r} holds {_shape(geometry)}", dataset_id)
    model_classes = model.config.get("class_names") or []
    if len(model_classes) != len(dataset.info["class_names"]):
        invalid("dataset_id", f"dataset {dataset.name!r} has {len(dataset.info['class_names'])} classes, model "
                              f"{model.name!r} was trained on {len(model_classes)}", dataset_id)
    protocol = body.protocol or dataset.protocol
    check_protocol(dataset, protocol)
    if not dataset.info["splits"][protocol][body.split]:
        invalid("split", f"dataset {dataset.name!r} has no {body.split} sample under {protocol}", body.split)
    try:
        suite = build_suite(body.attacks, modes=list(body.modes), eps=list(body.eps), alpha=body.alpha,
                            random_start=body.random_start, restarts=body.restarts)
        check_suite(suite, len(model_classes))
    except ConfigError as e:
        invalid({"eps_rgb": "eps", "eps_skel": "eps", "alpha_rgb": "alpha", "alpha_skel": "alpha"}
                .get(e.field, e.field if e.field in EvaluateJobCreate.model_fields else "attacks"), e.message)
    available = dataset.info["splits"][protocol][body.split]
    clips = min(available, body.max_samples) if body.max_samples else available
    if body.shards is not None and body.shards > clips:
        invalid("shards", f"{body.shards} shards for {clips} clips; at most one shard per clip", body.shards)
    params = {"request": body.model_dump(mode="json"), "protocol": protocol, "split": body.split,
              "suite": [c.to_dict() for c in suite], "batch_size": body.batch_size, "seed": body.seed,
              "max_samples": body.max_samples, "strategy": body.strategy or default_strategy(body.attacks),
              "diagnostics": body.diagnostics, "clips": clips, "shards": body.shards or auto_shards(clips)}
    return params, dataset, model


PREPARE_SAMPLES_PER_SHARD = 200


def _prepare_params(session: Session, body: PrepareJobCreate, caller: Caller) -> tuple[dict[str, Any], Dataset]:
    dataset = dataset_or_404(session, body.dataset_id, caller)
    cfg = preset_config(body.preset, num_classes=len(dataset.info["class_names"]), **dataset_geometry(dataset))
    samples = dataset.info["num_samples"] + dataset.info.get("incomplete_samples", 0)
    if body.shards is not None and body.shards > samples:
        invalid("shards", f"{body.shards} shards for {samples} samples; at most one shard per sample", body.shards)
    geometry = {"rgb_frames": cfg.rgb_frames, "rgb_size": cfg.rgb_size, "skel_frames": cfg.skel_frames}
    shards = body.shards or max(1, min(64, samples // PREPARE_SAMPLES_PER_SHARD))
    return {"request": body.model_dump(mode="json"), "preset": body.preset, "geometry": geometry,
            "samples": samples, "shards": shards, "cache": cache_location(dataset.id, geometry)}, dataset


def new_job(session: Session, body: TrainJobCreate | EvaluateJobCreate | PrepareJobCreate, caller: Caller) -> Job:
    """A ``queued`` row of ``caller`` for ``body``, validated completely (422 naming the
    field, 404 for a dataset or model it cannot see) but not added to the session: nothing is
    written."""
    if isinstance(body, TrainJobCreate):
        params, dataset = _train_params(session, body, caller)
        return Job(id=new_id(), kind="train", status="queued", params=params, dataset_id=dataset.id,
                   owner_id=caller.id)
    if isinstance(body, PrepareJobCreate):  # always run by shards (one or more) and a merge
        params, dataset = _prepare_params(session, body, caller)
        return Job(id=new_id(), kind="prepare", status="queued", params=params, dataset_id=dataset.id,
                   owner_id=caller.id, shard_count=params["shards"])
    params, dataset, model = _evaluate_params(session, body, caller)
    return Job(id=new_id(), kind="evaluate", status="queued", params=params, dataset_id=dataset.id,
               model_id=model.id, owner_id=caller.id, shard_count=params["shards"] if params["shards"] > 1 else None)


ACTIVE = ("queued", "running")


def check_quota(session: Session, caller: Caller, settings: Settings, jobs: int = 0, sweeps: int = 0) -> None:
    """429 (with Retry-After) if ``jobs`` more jobs outside sweeps, or ``sweeps`` more sweeps,
    would take ``caller`` over its quota. Writing the key's row first locks it until the
    caller's transaction ends (row lock on Postgres, the write lock on SQLite), so two
    concurrent submissions of one key cannot both pass on the same count."""
    session.execute(update(ApiKey).where(ApiKey.id == caller.id).values(submitted_at=utcnow()))
    checks = []
    if jobs:
        limit = caller.max_active_jobs if caller.max_active_jobs is not None else settings.max_active_jobs
        active = session.scalar(select(func.count()).select_from(Job).where(
            Job.owner_id == caller.id, Job.group_id.is_(None), Job.parent_id.is_(None), Job.status.in_(ACTIVE)))
        checks.append((active, jobs, limit, "queued or running jobs (outside sweeps)"))
    if sweeps:
        limit = caller.max_active_sweeps if caller.max_active_sweeps is not None else settings.max_active_sweeps
        active = session.scalar(select(func.count(func.distinct(Job.group_id))).where(
            Job.owner_id == caller.id, Job.group_id.is_not(None), Job.status.in_(ACTIVE)))
        checks.append((active, sweeps, limit, "sweeps with queued or running jobs"))
    for active, more, limit, what in checks:
        if active + more > limit:
            session.rollback()
            raise HTTPException(status_code=429, headers={"Retry-After": str(settings.quota_retry_after_s)},
                                detail=f"this key has {active} {what}; its quota is {limit}. Wait for some to "
                                       "finish or cancel them (an admin can raise the quota: PATCH /v1/keys/{id})")


def enqueue(session: Session, celery, jobs: list[Job]) -> None:
    """Send the jobs' ids to the broker, in order, and record when (``sent_at``). If the
    broker is unreachable the rest stay queued and unsent: the outbox (``service.reaper``)
    sends them once it is back, so the request still succeeds and no job is lost."""
    sent = []
    for job in jobs:
        try:
            celery.send_task(TASK_FOR_KIND[job.kind], args=[job.id])
        except Exception as e:
            log.warning("broker unreachable (%s: %s): %d job(s) left for the outbox", type(e).__name__, e,
                        len(jobs) - len(sent))
            break
        sent.append(job.id)
    if sent:
        now = utcnow()
        session.execute(update(Job).where(Job.id.in_(sent), Job.status == "queued").values(sent_at=now))
        session.commit()
        for job in jobs:
            if job.id in sent:
                job.sent_at = now


def submit_jobs(session: Session, celery, jobs: list[Job], group: JobGroup | None = None) -> None:
    """Commit ``jobs`` (rows from ``new_job``), and ``group`` with them, in one transaction,
    then send them to the broker."""
    if group is not None:
        session.add(group)
        session.flush()  # no relationship tells the unit of work to insert the group first
        for job in jobs:
            job.group_id = group.id
    session.add_all(jobs)
    session.flush()  # parents before the shards that point at them
    sent = []
    for job in jobs:
        if job.shard_count:  # a sharded evaluation: its shards are the jobs sent
            shards = make_shards(job)
            session.add_all(shards)
            sent += shards
        else:
            sent.append(job)
    session.commit()
    enqueue(session, celery, sent)


@router.post("", status_code=202, response_model=JobPublic,
             responses={429: {"description": "the key's quota of queued + running jobs is used up"}})
def create_job(body: JobCreate, caller: CallerDep, session: SessionDep, settings: SettingsDep, celery: CeleryDep,
               response: Response, idempotency_key: str | None = IdempotencyHeader):
    route = "POST /v1/jobs"

    def create(digest: str) -> JobPublic:
        job = new_job(session, body, caller)
        check_quota(session, caller, settings, jobs=1)
        remember(session, caller, idempotency_key, route, digest, f"jobs/{job.id}")
        submit_jobs(session, celery, [job])
        return _public(session, job, settings)

    def replay(resource: str) -> JobPublic:
        return _public(session, get_visible(session, Job, resource.split("/", 1)[1], caller, "job"), settings)

    result = create_once(session, caller, idempotency_key, route, body.model_dump(mode="json"), create, replay)
    response.headers["Location"] = f"/v1/jobs/{result.id}"
    return result


@router.get("", response_model=JobList)
def list_jobs(caller: CallerDep, session: SessionDep, settings: SettingsDep, status: JobStatus | None = None, kind: Literal["train", "evaluate", "prepare"] | None = None,
              dataset_id: str | None = None, model_id: str | None = None, group_id: str | None = None,
              parent_id: str | None = Query(None, description="the shard jobs of this sharded evaluation (shards are "
                                                              "listed only this way)"),
              limit: int = Query(50, ge=1, le=500),
              offset: int = Query(0, ge=0, le=MAX_OFFSET, description="rows to skip")):
    query = scoped(select(Job), Job, caller)
    query = query.where(Job.parent_id == parent_id) if parent_id is not None else query.where(Job.parent_id.is_(None))
    for column, value in ((Job.status, status), (Job.kind, kind), (Job.dataset_id, dataset_id),
                          (Job.model_id, model_id), (Job.group_id, group_id)):
        if value is not None:
            query = query.where(column == value)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    models, reports = _outputs(session, [j.id for j in jobs])
    shards = _shards(session, jobs)
    return JobList(items=[job_public(j, models.get(j.id), reports.get(j.id), settings.max_attempts, shards.get(j.id))
                          for j in jobs],
                   total=total,
                   limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    return _public(session, get_visible(session, Job, job_id, caller, "job"), settings)


def _not_a_shard(job: Job, action: str) -> None:
    if job.parent_id:
        raise HTTPException(status_code=409, detail=f"job {job.id!r} is a shard of job {job.parent_id!r}; "
                                                    f"{action} that job (POST /v1/jobs/{job.parent_id}/{action})")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """A queued job is cancelled at once; a running one stops at the worker's next step."""
    job = get_visible(session, Job, job_id, caller, "job")
    _not_a_shard(job, "cancel")
    if job.status in FINISHED:
        raise HTTPException(status_code=409, detail=f"job {job_id!r} already {job.status}")
    if job.shard_count:  # a sharded evaluation: the evaluation and all its shards
        cancel_parent(session, job)
        session.refresh(job)
        return _public(session, job, settings)
    now = utcnow()
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
        status="cancelled", cancel_requested=True, finished_at=now))
    if result.rowcount != 1:  # it started meanwhile: ask the worker
        session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
    session.commit()
    session.refresh(job)
    return _public(session, job, settings)


@router.post("/{job_id}/retry", status_code=202, response_model=JobPublic)
def retry_job(job_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep, celery: CeleryDep):
    """Queue a failed or cancelled job again, with a fresh budget of attempts; training resumes
    from its last epoch. It counts against the quota of the key retrying it, like a new job."""
    job = get_visible(session, Job, job_id, caller, "job")
    _not_a_shard(job, "retry")
    if job.status in ("failed", "cancelled") and job.group_id is None:
        check_quota(session, caller, settings, jobs=1)
    if job.shard_count:
        if job.status not in ("failed", "cancelled"):
            raise HTTPException(status_code=409, detail=f"job {job_id!r} is {job.status}; only failed or cancelled "
                                                        "jobs can be retried")
        redo = retry_parent(session, job)
        if redo:
            enqueue(session, celery, redo)
        else:  # every shard had succeeded: only the merge is left
            settle(session, job.id, lambda pid: celery.send_task(MERGE_TASK, args=[pid]),
                   settings.heartbeat_timeout_s)
        session.refresh(job)
        return _public(session, job, settings)
    # A retry by a user gives the job its full budget of attempts again (``attempts`` itself
    # only grows: it is the ownership token of a run).
    result = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(("failed", "cancelled"))).values(
        status="queued", cancel_requested=False, error=None, finished_at=None, heartbeat_at=None, sent_at=None,
        queued_at=utcnow(), attempt_base=Job.attempts))
    if result.rowcount != 1:
        raise HTTPException(status_code=409, detail=f"job {job_id!r} is {job.status}; only failed or cancelled "
                                                    "jobs can be retried")
    session.commit()
    session.refresh(job)
    enqueue(session, celery, [job])
    return _public(session, job, settings)


@router.get("/{job_id}/log", response_class=StreamingResponse)
def get_job_log(job_id: str, caller: CallerDep, session: SessionDep, store: StoreDep):
    """Every attempt's log, oldest first, each under a ``----- attempt N -----`` line (a
    sharded evaluation: each shard's attempts, then the merge's). A running attempt's log is
    uploaded every few seconds and at every epoch end, so it is there before the job
    finishes, and an attempt whose worker was killed keeps its log."""
    job = get_visible(session, Job, job_id, caller, "job")
    parts: list[tuple[str, str]] = []
    for shard in _shards(session, [job]).get(job.id, []):
        parts += _log_parts(store, shard.id, f"shard {shard.shard_index + 1} of {job.shard_count}, ")
    parts += _log_parts(store, job_id, "merge, " if job.shard_count else "")
    if not parts:
        raise HTTPException(status_code=404, detail=f"job {job_id!r} has no log yet (it has not started)")
    first = store.stream(parts[0][1])  # an error (store down) is raised here, before the 200 is sent

    def chunks():
        for index, (header, key) in enumerate(parts):
            if header:
                yield header.encode()
            try:
                yield from (first if index == 0 else store.stream(key))
            except ObjectNotFound:  # deleted meanwhile
                continue

    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")


def _log_parts(store, job_id: str, what: str) -> list[tuple[str, str]]:
    keys = [k for k in store.list(f"jobs/{job_id}/logs") if k.endswith(".log")]
    if not keys and store.exists(f"jobs/{job_id}/job.log"):  # written before per-attempt logs
        return [("", f"jobs/{job_id}/job.log")]
    return [(f"----- {what}attempt {int(k.rsplit('/', 1)[-1][8:-4])} -----\n", k) for k in keys]
