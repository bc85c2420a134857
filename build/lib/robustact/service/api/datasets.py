"""/v1/datasets: register a dataset (a path or an s3:// URI in the NTU layout), list, show,
share, delete when unused.

Registering names a server path or a bucket, so it is for admin keys only, and the location
must lie inside one of the configured roots (``ROBUSTACT_DATASET_ROOTS``; ``..`` and
symlinks are resolved first). A location outside them is refused before anything looks at
it, so the answer does not tell whether it exists. Other keys use the datasets an admin
shares with them (or with every key), read-only, and never see their locations.

Registration only lists the files (names, class list, counts per split); decoding into
the training cache happens in the worker the first time a job needs the dataset at a
given input geometry (``worker.tasks.prepared_cache``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, HTTPException, Query, Response
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from robustact.models.data import ntu
from robustact.service.api.deps import SessionDep, SettingsDep, invalid
from robustact.service.api.shares import ShareCreate, ShareList, add_share, delete_shares, remove_share, shares_of
from robustact.service.auth import Caller, CallerDep, can_read, not_found, require_admin, require_owner, scoped
from robustact.service.db import Dataset, Job, Model, Report, new_id
from robustact.service.idempotency import IdempotencyHeader, create_once, remember
from robustact.service.schemas import MAX_OFFSET, DatasetCreate, DatasetList, DatasetPublic, Links
from robustact.service.settings import Settings
from robustact.service.store import StoreError, open_store

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def _s3_listing(location: str, settings: Settings) -> tuple[list[str], list[str], list[str] | None]:
    """Skeleton file names, video file names and the classes.txt lines under an s3:// root."""
    from botocore.exceptions import BotoCoreError, ClientError

    store = open_store(location, settings.s3_endpoint_url, settings.s3_region)
    try:
        skeletons = [k.rsplit("/", 1)[-1] for k in store.list(ntu.SKELETON_DIR)]
        videos = [k.rsplit("/", 1)[-1] for k in store.list(ntu.RGB_DIR)]
        classes = None
        if store.exists(ntu.CLASSES_FILE):
            classes = store.get_bytes(ntu.CLASSES_FILE).decode("utf-8").splitlines()
    except (BotoCoreError, ClientError, StoreError, UnicodeDecodeError) as e:
        invalid("location", f"cannot read {location}: {e}", location)
    return skeletons, videos, classes


def _outside(location: str, roots: list[str]) -> None:
    invalid("location", f"{location!r} is outside the dataset roots this service allows ({', '.join(roots)}; "
                        "set ROBUSTACT_DATASET_ROOTS)", location)


def confine(location: str, settings: Settings) -> str:
    """The normalised location if it lies inside a configured dataset root, else a 422 that
    says nothing about whether it exists. Local paths are made absolute with ``..`` and
    symlinks resolved; an s3:// location may not contain ``.`` or ``..`` segments."""
    roots = settings.dataset_root_list()
    if location.startswith("s3://"):
        parts = [p for p in location[len("s3://"):].split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            _outside(location, roots)
        normal = "s3://" + "/".join(parts)
        if not any(normal == r or normal.startswith(r + "/") for r in roots if r.startswith("s3://")):
            _outside(location, roots)
        return normal
    path = location[len("file://"):] if location.startswith("file://") else location
    if not os.path.isabs(os.path.expanduser(path)):
        invalid("location", f"{location!r}: give an absolute path", location)
    normal = str(Path(path).expanduser().resolve())
    if not any(normal == r or normal.startswith(r.rstrip(os.sep) + os.sep) for r in roots
               if not r.startswith("s3://")):
        _outside(location, roots)
    return normal


def _local_listing(location: str, settings: Settings) -> tuple[list[str], list[str], list[str] | None]:
    root = Path(location)
    if not root.is_dir():
        invalid("location", f"{location}: no such directory (it must be readable by the API and the workers)",
                location)
    skel_dir, rgb_dir = root / ntu.SKELETON_DIR, root / ntu.RGB_DIR
    for inner in (skel_dir, rgb_dir, root / ntu.CLASSES_FILE):  # a symlink inside may point out of the roots
        if inner.exists():
            confine(str(inner), settings)
    skeletons = [p.name for p in skel_dir.iterdir()] if skel_dir.is_dir() else []
    videos = [p.name for p in rgb_dir.iterdir()] if rgb_dir.is_dir() else []
    classes_file = root / ntu.CLASSES_FILE
    classes = None
    if classes_file.is_file():
        try:
            classes = classes_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            invalid("location", f"{classes_file}: not UTF-8 text", location)
    return skeletons, videos, classes


def inspect_dataset(body: DatasetCreate, settings: Settings) -> tuple[str, dict]:
    """Check that ``body.location`` holds a dataset of ``body.format``; returns the
    normalised location and the ``info`` stored with the row. Raises a 422 naming the
    field otherwise."""
    location = confine(body.location.strip(), settings)
    if location.startswith("s3://"):
        skeletons, videos, classes = _s3_listing(location, settings)
    else:
        skeletons, videos, classes = _local_listing(location, settings)

    def ids(names: list[str], suffix: str) -> set[ntu.SampleId]:
        out = set()
        for name in names:
            if name.endswith(suffix):
                try:
                    out.add(ntu.parse_sample_name(name[: -len(suffix)]))
                except ValueError as e:
                    invalid("location", str(e), location)
        return out

    skel_ids, video_ids = ids(skeletons, ntu.SKELETON_SUFFIX), ids(videos, ntu.VIDEO_SUFFIX)
    if not skel_ids and not video_ids:
        invalid("location", f"{location}: no samples (expected {ntu.SKELETON_DIR}/*{ntu.SKELETON_SUFFIX} and "
                            f"{ntu.RGB_DIR}/*{ntu.VIDEO_SUFFIX})", location)
    if classes is not None:
        classes = [c.strip() for c in classes if c.strip()]
        if not classes:
            invalid("location", f"{location}: {ntu.CLASSES_FILE} holds no class names", location)
    if body.format == "synthetic" and classes is None:
        invalid("format", f"{location} has no {ntu.CLASSES_FILE}, so it is not a synthetic dataset "
                          "(use format ntu60 for the NTU RGB+D release)", body.format)
    if body.format == "ntu60" and classes is not None and len(classes) != len(ntu.NTU60_CLASSES):
        invalid("format", f"{location} names {len(classes)} classes in {ntu.CLASSES_FILE}, NTU RGB+D 60 has "
                          f"{len(ntu.NTU60_CLASSES)} (use format synthetic)", body.format)
    class_names = classes or list(ntu.NTU60_CLASSES)
    complete = skel_ids & video_ids
    beyond = sorted(s for s in complete if s.action > len(class_names))
    if beyond:
        invalid("location", f"{beyond[0].name}: action {beyond[0].action} but the dataset has only "
                            f"{len(class_names)} classes", location)
    splits = {}
    for protocol in ntu.PROTOCOLS:
        train = sum(ntu.in_train_split(s, protocol) for s in complete)
        splits[protocol] = {"train": train, "test": len(complete) - train}
    if not splits[body.protocol]["train"]:
        invalid("protocol", f"{location} has no training sample under the {body.protocol} protocol", body.protocol)
    info = {"class_names": class_names, "num_samples": len(complete), "splits": splits,
            "incomplete_samples": len(skel_ids ^ video_ids)}
    return location, info


def register_dataset(session: Session, body: DatasetCreate, settings: Settings, owner_id: str | None,
                     before_commit: Callable[[Dataset], None] | None = None) -> Dataset:
    if session.scalar(select(exists().where(Dataset.name == body.name))):
        raise HTTPException(status_code=409, detail=f"a dataset named {body.name!r} already exists")
    location, info = inspect_dataset(body, settings)
    row = Dataset(id=new_id(), name=body.name, format=body.format, location=location, protocol=body.protocol,
                  info=info, owner_id=owner_id)
    session.add(row)
    if before_commit is not None:
        before_commit(row)
    session.commit()
    return row


def find_dataset(session: Session, ref: str) -> Dataset | None:
    """A dataset by id, or else by its (unique) name."""
    if len(ref) > 200:
        return None
    return session.get(Dataset, ref) or session.scalar(select(Dataset).where(Dataset.name == ref))


def dataset_or_404(session: Session, ref: str, caller: Caller) -> Dataset:
    """A dataset ``caller`` may read, by id or name; 404 otherwise."""
    row = find_dataset(session, ref)
    if row is None or not can_read(session, row, caller):
        not_found("dataset", ref)
    return row


def dataset_public(row: Dataset, caller: Caller) -> DatasetPublic:
    info = row.info
    return DatasetPublic(
        id=row.id, name=row.name, format=row.format, location=row.location if caller.admin else None,
        owner_id=row.owner_id, shared=not caller.admin and row.owner_id != caller.id, protocol=row.protocol,
        num_classes=len(info["class_names"]), class_names=info["class_names"], num_samples=info["num_samples"],
        splits=info["splits"], incomplete_samples=info.get("incomplete_samples", 0), created_at=row.created_at,
        links=Links(self=f"/v1/datasets/{row.id}"))


@router.post("", status_code=201, response_model=DatasetPublic,
             responses={403: {"description": "not an admin key"}})
def create_dataset(body: DatasetCreate, caller: CallerDep, session: SessionDep, settings: SettingsDep,
                   response: Response, idempotency_key: str | None = IdempotencyHeader):
    """Register a dataset at a server path or bucket inside the configured roots (admin keys)."""
    require_admin(caller, "registering a dataset by server path or bucket")
    route = "POST /v1/datasets"

    def create(digest: str) -> DatasetPublic:
        row = register_dataset(session, body, settings, owner_id=caller.id, before_commit=lambda row: remember(
            session, caller, idempotency_key, route, digest, f"datasets/{row.id}"))
        return dataset_public(row, caller)

    def replay(resource: str) -> DatasetPublic:
        return dataset_public(dataset_or_404(session, resource.split("/", 1)[1], caller), caller)

    result = create_once(session, caller, idempotency_key, route, body.model_dump(mode="json"), create, replay)
    response.headers["Location"] = f"/v1/datasets/{result.id}"
    return result


@router.get("", response_model=DatasetList)
def list_datasets(caller: CallerDep, session: SessionDep, limit: int = Query(100, ge=1, le=500),
                  offset: int = Query(0, ge=0, le=MAX_OFFSET, description="rows to skip")):
    """The datasets this key may use: its own and those shared with it (admin: all)."""
    query = scoped(select(Dataset), Dataset, caller)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(Dataset.created_at, Dataset.id).limit(limit).offset(offset)).all()
    return DatasetList(items=[dataset_public(r, caller) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, caller: CallerDep, session: SessionDep):
    """A dataset by id or by name."""
    return dataset_public(dataset_or_404(session, dataset_id, caller), caller)


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, caller: CallerDep, session: SessionDep):
    """Unregister a dataset nothing uses any more (its files are left where they are)."""
    row = dataset_or_404(session, dataset_id, caller)
    require_owner(row, caller, "dataset", "delete")
    users = [
        kind for kind, table in (("jobs", Job), ("models", Model), ("reports", Report))
        if session.scalar(select(exists().where(table.dataset_id == row.id)))
    ]
    if users:
        raise HTTPException(status_code=409, detail=f"dataset {dataset_id!r} is used by {' and '.join(users)}; "
                                                    "delete those first")
    delete_shares(session, "dataset", row.id)
    session.delete(row)
    session.commit()
    return Response(status_code=204)


@router.get("/{dataset_id}/shares", response_model=ShareList)
def list_dataset_shares(dataset_id: str, caller: CallerDep, session: SessionDep):
    row = dataset_or_404(session, dataset_id, caller)
    require_owner(row, caller, "dataset", "list the shares of")
    return shares_of(session, "dataset", row.id)


@router.post("/{dataset_id}/shares", status_code=201, response_model=ShareList)
def share_dataset(dataset_id: str, body: ShareCreate, caller: CallerDep, session: SessionDep):
    """Share a dataset read-only with one key or with every key (admin keys)."""
    row = dataset_or_404(session, dataset_id, caller)
    require_admin(caller, "sharing a dataset")
    add_share(session, "dataset", row.id, body, caller)
    return shares_of(session, "dataset", row.id)


@router.delete("/{dataset_id}/shares/{grantee}", status_code=204)
def unshare_dataset(dataset_id: str, grantee: str, caller: CallerDep, session: SessionDep):
    """Stop sharing with a key (its id) or with every key (``all``)."""
    row = dataset_or_404(session, dataset_id, caller)
    require_admin(caller, "unsharing a dataset")
    remove_share(session, "dataset", row.id, grantee)
    return Response(status_code=204)
