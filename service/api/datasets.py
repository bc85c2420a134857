"""/v1/datasets: register a dataset (a path or an s3:// URI in the NTU or the iMiGUE-style
layout, ``models.data.layouts``), list, show, share, delete when unused.

Registering names a server path or a bucket, so it is for admin keys only, and the location
must lie inside one of the configured roots (``ROBUSTACT_DATASET_ROOTS``; ``..`` and
symlinks are resolved first). A location outside them is refused before anything looks at
it, so the answer does not tell whether it exists. Other keys use the datasets an admin
shares with them (or with every key), read-only, and never see their locations.

Registration only lists the files (names, class list, counts per split) and records the
layout and its skeleton geometry, which models trained or evaluated on it must match
(rows from before layouts have neither: they are NTU, ``dataset_layout``); decoding into
the training cache happens in the worker the first time a job needs the dataset at a
given input geometry (``worker.tasks.prepared_cache``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from fastapi import APIRouter, HTTPException, Query, Response
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from robustact.models.data import imigue, layouts, ntu
from robustact.models.data.imigue import Clip
from robustact.models.data.layouts import Layout
from robustact.service.api.deps import SessionDep, SettingsDep, invalid
from robustact.service.api.shares import ShareCreate, ShareList, add_share, delete_shares, remove_share, shares_of
from robustact.service.auth import Caller, CallerDep, can_read, not_found, require_admin, require_owner, scoped
from robustact.service.db import Dataset, Job, Model, Report, new_id
from robustact.service.idempotency import IdempotencyHeader, create_once, remember
from robustact.service.schemas import MAX_OFFSET, DatasetCreate, DatasetList, DatasetPublic, Links
from robustact.service.settings import Settings
from robustact.service.store import Store, StoreError, open_store

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


T = TypeVar("T")


def _from_s3(location: str, settings: Settings, read: Callable[[Store], T]) -> T:
    """``read(store)`` of the store at an s3:// location; a 422 on ``location`` if the store fails."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return read(open_store(location, settings.s3_endpoint_url, settings.s3_region))
    except (BotoCoreError, ClientError, StoreError, UnicodeDecodeError) as e:
        invalid("location", f"cannot read {location}: {e}", location)


def _s3_listing(store: Store) -> tuple[list[str], list[str], list[str] | None]:
    """Skeleton file names, video file names and the classes.txt lines under an s3:// root."""
    skeletons = [k.rsplit("/", 1)[-1] for k in store.list(ntu.SKELETON_DIR)]
    videos = [k.rsplit("/", 1)[-1] for k in store.list(ntu.RGB_DIR)]
    classes = None
    if store.exists(ntu.CLASSES_FILE):
        classes = store.get_bytes(ntu.CLASSES_FILE).decode("utf-8").splitlines()
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
    skel_dir, rgb_dir = root / ntu.SKELETON_DIR, root / ntu.RGB_DIR
    _confine_inside(root, (ntu.SKELETON_DIR, ntu.RGB_DIR, ntu.CLASSES_FILE), settings)
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


def _confine_inside(root: Path, names: tuple[str, ...], settings: Settings) -> None:
    """A 422 if one of ``names`` under ``root`` is a symlink out of the dataset roots."""
    for name in names:
        if (root / name).exists():
            confine(str(root / name), settings)


def _ntu_info(body: DatasetCreate, location: str, settings: Settings) -> dict[str, Any]:
    if location.startswith("s3://"):
        skeletons, videos, classes = _from_s3(location, settings, _s3_listing)
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
    return {"class_names": class_names, "num_samples": len(complete), "splits": splits,
            "incomplete_samples": len(skel_ids ^ video_ids)}


# An iMiGUE-style root read: class names, training subjects, clips, and whether a clip's
# video and skeleton frames are there.
ImigueRead = tuple[list[str], frozenset[int], list[Clip], Callable[[Clip], bool]]


def _local_imigue(location: str, settings: Settings) -> ImigueRead:
    root = Path(location)
    _confine_inside(root, (imigue.CLASSES_FILE, imigue.LABELS_FILE, imigue.SPLIT_FILE, imigue.VIDEO_DIR,
                           imigue.SKELETON_DIR), settings)
    names, (train, _) = imigue.class_names(root), imigue.read_split(root)
    return names, train, imigue.find_clips(root), lambda clip: clip.video.is_file() and clip.skeleton_dir.is_dir()


def _s3_imigue(location: str, store: Store) -> ImigueRead:
    """The same rules as ``_local_imigue`` over a store: a clip is complete when its video
    object exists and its skeleton directory holds at least one object."""

    def content(name: str) -> bytes:
        if not store.exists(name):
            raise imigue.missing(f"{location}/{name}", name)
        return store.get_bytes(name)

    names = imigue.parse_class_names(content(imigue.CLASSES_FILE), f"{location}/{imigue.CLASSES_FILE}")
    train, test = imigue.parse_split(content(imigue.SPLIT_FILE), f"{location}/{imigue.SPLIT_FILE}")
    clips = imigue.parse_labels(content(imigue.LABELS_FILE), f"{location}/{imigue.LABELS_FILE}", names, train,
                                test, "")  # paths relative to the store's prefix: its keys
    videos = set(store.list(imigue.VIDEO_DIR))
    skeletons = {v for v in {c.video_id for c in clips} if store.has_prefix(f"{imigue.SKELETON_DIR}/{v}")}
    return names, train, clips, lambda clip: clip.video.as_posix() in videos and clip.video_id in skeletons


def _imigue_info(location: str, settings: Settings) -> dict[str, Any]:
    try:
        if location.startswith("s3://"):
            names, train, clips, complete = _from_s3(location, settings, lambda store: _s3_imigue(location, store))
        else:
            names, train, clips, complete = _local_imigue(location, settings)
    except imigue.LayoutError as e:
        invalid("location", str(e), location)
    usable = [clip for clip in clips if complete(clip)]
    in_train = sum(clip.subject in train for clip in usable)
    return {"class_names": names, "num_samples": len(usable),
            "splits": {"xsub": {"train": in_train, "test": len(usable) - in_train}},
            "incomplete_samples": len(clips) - len(usable)}


def _layout_at(location: str, settings: Settings) -> Layout:
    """The layout of the dataset at ``location`` (``layouts.detect``: iMiGUE-style when it
    holds labels.csv)."""
    if location.startswith("s3://"):
        has_labels = _from_s3(location, settings, lambda store: store.exists(imigue.LABELS_FILE))
        return layouts.IMIGUE if has_labels else layouts.NTU
    root = Path(location)
    if not root.is_dir():
        invalid("location", f"{location}: no such directory (it must be readable by the API and the workers)",
                location)
    _confine_inside(root, (imigue.LABELS_FILE,), settings)
    return layouts.detect(root)


_LAYOUT_TITLES = {"ntu": "an NTU RGB+D-layout", "imigue": "an iMiGUE-style"}


def inspect_dataset(body: DatasetCreate, settings: Settings) -> tuple[str, dict]:
    """Check that ``body.location`` holds a dataset of ``body.format``; returns the
    normalised location and the ``info`` stored with the row (class names, counts per
    protocol and split, layout, skeleton geometry). Raises a 422 naming the field otherwise."""
    location = confine(body.location.strip(), settings)
    layout = _layout_at(location, settings)
    if body.format == "imigue" and layout is not layouts.IMIGUE:
        invalid("format", f"{location} has no {imigue.LABELS_FILE}, so it is not an iMiGUE-style dataset (that needs "
                          f"{imigue.CLASSES_FILE}, {imigue.LABELS_FILE}, {imigue.SPLIT_FILE}, {imigue.VIDEO_DIR}/ and "
                          f"{imigue.SKELETON_DIR}/; use format ntu60 or synthetic for the NTU layout)", body.format)
    if body.format != "imigue" and layout is layouts.IMIGUE:
        invalid("format", f"{location} holds {imigue.LABELS_FILE}: it is an iMiGUE-style dataset (use format "
                          "imigue)", body.format)
    if body.protocol not in layout.protocols:
        invalid("protocol", f"{_LAYOUT_TITLES[layout.name]} dataset has only the {' and '.join(layout.protocols)} "
                            f"protocol, not {body.protocol}", body.protocol)
    info = _imigue_info(location, settings) if layout is layouts.IMIGUE else _ntu_info(body, location, settings)
    if not info["splits"][body.protocol]["train"]:
        invalid("protocol", f"{location} has no training sample under the {body.protocol} protocol", body.protocol)
    return location, {**info, "layout": layout.name, "geometry": layout.geometry()}


def dataset_layout(row: Dataset) -> Layout:
    """The layout of a registered dataset (rows from before layouts are NTU)."""
    return layouts.by_name(row.info.get("layout", "ntu"))


def dataset_geometry(row: Dataset) -> dict[str, int]:
    """``joints``, ``skel_channels`` and ``persons`` of a registered dataset's skeletons, as
    ``ModelConfig`` takes them."""
    return row.info.get("geometry") or dataset_layout(row).geometry()


def check_protocol(row: Dataset, protocol: str) -> None:
    """A 422 on ``protocol`` if the dataset has no such protocol."""
    if protocol not in row.info["splits"]:
        invalid("protocol", f"dataset {row.name!r} has only the {' and '.join(row.info['splits'])} protocol, "
                            f"not {protocol}", protocol)


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
        splits=info["splits"], incomplete_samples=info.get("incomplete_samples", 0),
        layout=dataset_layout(row).name, geometry=dataset_geometry(row), created_at=row.created_at,
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
