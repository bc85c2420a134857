"""/v1/models: trained models (registered by the worker once their checkpoint is fully
uploaded), their checkpoint files, and classification of an uploaded clip."""

from __future__ import annotations

import time
from pathlib import PurePosixPath

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.checkpoint import CheckpointError
from service.api.deps import SessionDep, SettingsDep, StoreDep, get_or_404, invalid
from service.classify import MediaTypeError, Upload, UploadError, classify
from service.db import Model, Report
from service.schemas import ClassifyResult, Links, ModelList, ModelPublic
from service.store import ObjectNotFound, Store

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_public(session: Session, store: Store, row: Model) -> ModelPublic:
    config = row.config
    files = [PurePosixPath(k).name for k in store.list(row.artifact_prefix)]
    report_ids = list(session.scalars(select(Report.id).where(Report.model_id == row.id)
                                      .order_by(Report.created_at)).all())
    links = {"self": f"/v1/models/{row.id}", "classify": f"/v1/models/{row.id}/classify",
             **{f"file:{name}": f"/v1/models/{row.id}/files/{name}" for name in files}}
    if row.job_id:
        links["job"] = f"/v1/jobs/{row.job_id}"
    return ModelPublic(
        id=row.id, name=row.name, job_id=row.job_id, dataset_id=row.dataset_id, created_at=row.created_at,
        preset=config.get("preset"), arch=config["model"]["arch"], defence=(config.get("train") or {}).get("defence"),
        num_amr=config["model"].get("num_amr", 0), num_classes=len(config["class_names"]),
        class_names=config["class_names"], config=config, files=files, report_ids=report_ids, links=Links(**links))


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, store: StoreDep):
    rows = session.scalars(select(Model).order_by(Model.created_at)).all()
    return ModelList(items=[model_public(session, store, r) for r in rows])


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, session: SessionDep, store: StoreDep):
    return model_public(session, store, get_or_404(session, Model, model_id, "model"))


@router.get("/{model_id}/files/{name}", response_class=StreamingResponse,
            responses={307: {"description": "redirect to a presigned URL (S3 store)"}})
def download_file(model_id: str, name: str, session: SessionDep, store: StoreDep, settings: SettingsDep,
                  presign: bool | None = None):
    """A checkpoint file (``model.safetensors``, ``config.json``), streamed from the store,
    or a redirect to a presigned URL when the store is S3 and ``presign`` (or the
    ``presign_downloads`` setting) asks for it."""
    row = get_or_404(session, Model, model_id, "model")
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
def classify_clip(model_id: str, request: Request, session: SessionDep, settings: SettingsDep,
                  video: UploadFile | None = File(None, description="RGB clip, .avi or .mp4"),
                  skeleton: UploadFile | None = File(None, description="NTU .skeleton, or .npy of shape T×V×3[×M]"),
                  top_k: int = Form(5, ge=1, le=1000)):
    t0 = time.perf_counter()
    row = get_or_404(session, Model, model_id, "model")
    for field, upload in (("video", video), ("skeleton", skeleton)):
        if upload is not None and (upload.size or 0) > settings.max_upload_bytes:
            raise HTTPException(status_code=413, detail=f"{field}: upload larger than "
                                                        f"{settings.max_upload_mb:g} MiB")
    try:
        loaded, fresh = request.app.state.models.get(row.id, row.artifact_prefix)
    except (CheckpointError, ObjectNotFound) as e:
        raise HTTPException(status_code=503, detail=f"model {model_id!r} cannot be loaded: {e}")
    t_load = time.perf_counter()
    try:
        result = classify(loaded, _upload("video", video), _upload("skeleton", skeleton), top_k)
    except MediaTypeError as e:
        raise HTTPException(status_code=415, detail=str(e))
    except UploadError as e:
        invalid(e.field, e.message)
    total = (time.perf_counter() - t0) * 1e3
    return ClassifyResult(model_id=row.id, top=result["top"], inputs=result["inputs"], timings_ms={
        "decode": result["decode_ms"], "model_load": (t_load - t0) * 1e3 if fresh else 0.0,
        "inference": result["inference_ms"], "total": total})
