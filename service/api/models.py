"""/v1/models: trained models (registered by the worker once their checkpoint is fully
uploaded), their checkpoint files, classification of an uploaded clip, read-only shares with
other keys, deletion.

Classify holds no database connection while it decodes or runs the model: the model row is
read in a short session of its own, then the request waits for a compute slot (admission
control, ``service.middleware``)."""

from __future__ import annotations

import logging
import time
from pathlib import PurePosixPath

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from robustact.models.checkpoint import CheckpointError
from robustact.service.api.deps import SessionDep, SettingsDep, StoreDep, invalid
from robustact.service.api.shares import ShareCreate, ShareList, add_share, delete_shares, remove_share, shares_of
from robustact.service.auth import Caller, CallerDep, get_visible, require_owner, scoped
from robustact.service.classify import MediaTypeError, Upload, UploadError, classify
from robustact.service.decoder import DecodeError
from robustact.service.db import Job, Model, Report
from robustact.service.schemas import MAX_OFFSET, ClassifyResult, Links, ModelList, ModelPublic
from robustact.service.store import ObjectNotFound, Store

router = APIRouter(prefix="/v1/models", tags=["models"])
log = logging.getLogger("robustact.api")


def model_public(session: Session, store: Store, row: Model, caller: Caller) -> ModelPublic:
    config = row.config
    files = [PurePosixPath(k).name for k in store.list(row.artifact_prefix)]
    report_ids = list(session.scalars(scoped(select(Report.id), Report, caller).where(Report.model_id == row.id)
                                      .order_by(Report.created_at)).all())
    links = {"self": f"/v1/models/{row.id}", "classify": f"/v1/models/{row.id}/classify",
             **{f"file:{name}": f"/v1/models/{row.id}/files/{name}" for name in files}}
    if row.job_id:
        links["job"] = f"/v1/jobs/{row.job_id}"
    return ModelPublic(
        id=row.id, name=row.name, job_id=row.job_id, dataset_id=row.dataset_id, created_at=row.created_at,
        owner_id=row.owner_id, shared=not caller.admin and row.owner_id != caller.id, preset=config.get("preset"), arch=config["model"]["arch"], defence=(config.get("train") or {}).get("defence"),
        num_amr=config["model"].get("num_amr", 0), num_classes=len(config["class_names"]),
        class_names=config["class_names"], config=config, files=files, report_ids=report_ids, links=Links(**links))


@router.get("", response_model=ModelList)
def list_models(caller: CallerDep, session: SessionDep, store: StoreDep, limit: int = Query(100, ge=1, le=500),
                offset: int = Query(0, ge=0, le=MAX_OFFSET, description="rows to skip")):
    """This key's models and those shared with it (admin: all), oldest first."""
    query = scoped(select(Model), Model, caller)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(Model.created_at, Model.id).limit(limit).offset(offset)).all()
    return ModelList(items=[model_public(session, store, r, caller) for r in rows], total=total, limit=limit,
                     offset=offset)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, caller: CallerDep, session: SessionDep, store: StoreDep):
    return model_public(session, store, get_visible(session, Model, model_id, caller, "model"), caller)


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, request: Request, caller: CallerDep, session: SessionDep, store: StoreDep):
    """Delete a model (owner or admin): its row and shares, then its checkpoint files. Jobs and
    reports that refer to it keep their results and lose the link (``model_id`` null). Refused
    (409) while a queued or running evaluation uses it."""
    row = get_visible(session, Model, model_id, caller, "model")
    require_owner(row, caller, "model", "delete")
    if session.scalar(select(exists().where(Job.model_id == row.id, Job.status.in_(("queued", "running"))))):
        raise HTTPException(status_code=409, detail=f"model {model_id!r} is being evaluated by a queued or running "
                                                    "job; cancel it or wait")
    prefix = row.artifact_prefix
    session.execute(update(Job).where(Job.model_id == row.id).values(model_id=None))
    session.execute(update(Report).where(Report.model_id == row.id).values(model_id=None))
    delete_shares(session, "model", row.id)
    session.delete(row)
    session.commit()
    request.app.state.models.evict(model_id)
    try:
        store.delete_prefix(prefix)
    except Exception:  # the row is gone; stray files are only wasted space
        log.exception("model %s deleted, but not its files under %s", model_id, prefix)
    return Response(status_code=204)


@router.get("/{model_id}/shares", response_model=ShareList)
def list_model_shares(model_id: str, caller: CallerDep, session: SessionDep):
    row = get_visible(session, Model, model_id, caller, "model")
    require_owner(row, caller, "model", "list the shares of")
    return shares_of(session, "model", row.id)


@router.post("/{model_id}/shares", status_code=201, response_model=ShareList)
def share_model(model_id: str, body: ShareCreate, caller: CallerDep, session: SessionDep):
    """Share a model read-only with another key (``key_id``) or with every key (``all``): it
    can read it, download its checkpoint, evaluate it and classify with it. Owner or admin."""
    row = get_visible(session, Model, model_id, caller, "model")
    require_owner(row, caller, "model", "share")
    add_share(session, "model", row.id, body, caller)
    return shares_of(session, "model", row.id)


@router.delete("/{model_id}/shares/{grantee}", status_code=204)
def unshare_model(model_id: str, grantee: str, caller: CallerDep, session: SessionDep):
    row = get_visible(session, Model, model_id, caller, "model")
    require_owner(row, caller, "model", "unshare")
    remove_share(session, "model", row.id, grantee)
    return Response(status_code=204)


@router.get("/{model_id}/files/{name}", response_class=StreamingResponse,
            responses={307: {"description": "redirect to a presigned URL (S3 store)"}})
def download_file(model_id: str, name: str, caller: CallerDep, session: SessionDep, store: StoreDep,
                  settings: SettingsDep, presign: bool | None = None):
    """A checkpoint file (``model.safetensors``, ``config.json``), streamed from the store,
    or a redirect to a presigned URL when the store is S3 and ``presign`` (or the
    ``presign_downloads`` setting) asks for it."""
    row = get_visible(session, Model, model_id, caller, "model")
    key = f"{row.artifact_prefix}/{PurePosixPath(name).name}"
    try:
        size = store.size(key)
    except ObjectNotFound:
        raise HTTPException(status_code=404, detail=f"model {model_id!r} has no file {name!r}")
    if presign if presign is not None else settings.presign_downloads:
        url = store.presign(key)
        if url:
            return RedirectResponse(url, status_code=307)
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return StreamingResponse(store.stream(key), media_type=media, headers={
        "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{PurePosixPath(name).name}"'})


def _upload(field: str, file: UploadFile | None) -> Upload | None:
    if file is None:
        return None
    return Upload(field=field, filename=file.filename or "", content_type=file.content_type or "", file=file.file)


@router.post("/{model_id}/classify", response_model=ClassifyResult,
             responses={413: {"description": "upload too large"}, 415: {"description": "wrong media type"},
                        422: {"description": "corrupt or mismatched input"}})
def classify_clip(model_id: str, request: Request, caller: CallerDep, settings: SettingsDep,
                  video: UploadFile | None = File(None, description="RGB clip, .avi or .mp4"),
                  skeleton: UploadFile | None = File(None, description=(
                      "NTU .skeleton; .npy of shape T×V×C[×M]; or, for a 2-D 22-joint model, OpenPose .json: "
                      'a JSON array of per-frame OpenPose documents ({"people": [...]}), or {"frames": [...]}')),
                  top_k: int = Form(5, ge=1, le=1000)):
    t0 = time.perf_counter()
    with request.app.state.sessions() as session:  # closed before any decoding
        row = get_visible(session, Model, model_id, caller, "model")
    for field, upload in (("video", video), ("skeleton", skeleton)):
        if upload is not None and (upload.size or 0) > settings.max_upload_bytes:
            raise HTTPException(status_code=413, detail=f"{field}: upload larger than "
                                                        f"{settings.max_upload_mb:g} MiB")
    with request.app.state.admission.compute:  # K at once; the middleware bounds how many wait
        return _classify_admitted(request, row, model_id, video, skeleton, top_k, t0)


def _classify_admitted(request: Request, row: Model, model_id: str, video: UploadFile | None,
                       skeleton: UploadFile | None, top_k: int, t0: float) -> ClassifyResult:
    try:
        loaded, fresh = request.app.state.models.get(row.id, row.artifact_prefix)
    except (CheckpointError, ObjectNotFound) as e:
        raise HTTPException(status_code=503, detail=f"model {model_id!r} cannot be loaded: {e}")
    t_load = time.perf_counter()
    try:
        result = classify(loaded, _upload("video", video), _upload("skeleton", skeleton), top_k,
                          request.app.state.decoders)
    except MediaTypeError as e:
        raise HTTPException(status_code=415, detail=str(e))
    except UploadError as e:
        invalid(e.field, e.message)
    except DecodeError as e:
        if e.status != 422:  # the decoder failed, not the clip: worth a retry
            raise HTTPException(status_code=e.status, detail=str(e),
                                headers={"Retry-After": str(request.app.state.settings.busy_retry_after_s)}
                                if e.status == 503 else None)
        invalid(e.field, e.message)
    request.app.state.metrics.observe_classify_result(result)
    total = (time.perf_counter() - t0) * 1e3
    return ClassifyResult(model_id=row.id, top=result["top"], inputs=result["inputs"], timings_ms={
        "decode": result["decode_ms"], "model_load": (t_load - t0) * 1e3 if fresh else 0.0,
        "inference": result["inference_ms"], "total": total})
