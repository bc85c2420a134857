"""/v1/datasets: register a dataset (a path or an s3:// URI in the NTU layout), list, show,
delete when unused.

Registration only lists the files (names, class list, counts per split); decoding into
the training cache happens in the worker the first time a job needs the dataset at a
given input geometry (``worker.tasks.prepared_cache``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Response
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from models.data import ntu
from service.api.deps import SessionDep, SettingsDep, invalid, not_found
from service.db import Dataset, Job, Model, Report
from service.schemas import DatasetCreate, DatasetList, DatasetPublic, Links
from service.settings import Settings
from service.store import StoreError, open_store

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


def _local_listing(location: str) -> tuple[list[str], list[str], list[str] | None]:
    root = Path(location)
    if not root.is_dir():
        invalid("location", f"{location}: no such directory (it must be readable by the API and the workers)",
                location)
    skel_dir, rgb_dir = root / ntu.SKELETON_DIR, root / ntu.RGB_DIR
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
    location = body.location.strip()
    if location.startswith("s3://"):
        skeletons, videos, classes = _s3_listing(location, settings)
    else:
        if location.startswith("file://"):
            location = location[len("file://"):]
        location = str(Path(location).expanduser().resolve())
        skeletons, videos, classes = _local_listing(location)

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


def register_dataset(session: Session, body: DatasetCreate, settings: Settings) -> Dataset:
    if session.scalar(select(exists().where(Dataset.name == body.name))):
        raise HTTPException(status_code=409, detail=f"a dataset named {body.name!r} already exists")
    location, info = inspect_dataset(body, settings)
    row = Dataset(name=body.name, format=body.format, location=location, protocol=body.protocol, info=info)
    session.add(row)
    session.commit()
    return row


def find_dataset(session: Session, ref: str) -> Dataset | None:
    """A dataset by id, or else by its (unique) name."""
    return session.get(Dataset, ref) or session.scalar(select(Dataset).where(Dataset.name == ref))


def dataset_or_404(session: Session, ref: str) -> Dataset:
    row = find_dataset(session, ref)
    if row is None:
        not_found("dataset", ref)
    return row


def dataset_public(row: Dataset) -> DatasetPublic:
    info = row.info
    return DatasetPublic(
        id=row.id, name=row.name, format=row.format, location=row.location, protocol=row.protocol,
        num_classes=len(info["class_names"]), class_names=info["class_names"], num_samples=info["num_samples"],
        splits=info["splits"], incomplete_samples=info.get("incomplete_samples", 0), created_at=row.created_at,
        links=Links(self=f"/v1/datasets/{row.id}"))


@router.post("", status_code=201, response_model=DatasetPublic)
def create_dataset(body: DatasetCreate, session: SessionDep, settings: SettingsDep, response: Response):
    row = register_dataset(session, body, settings)
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return dataset_public(row)


@router.get("", response_model=DatasetList)
def list_datasets(session: SessionDep):
    rows = session.scalars(select(Dataset).order_by(Dataset.created_at)).all()
    return DatasetList(items=[dataset_public(r) for r in rows])


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep):
    """A dataset by id or by name."""
    return dataset_public(dataset_or_404(session, dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, session: SessionDep):
    row = dataset_or_404(session, dataset_id)
    users = [
        kind for kind, table in (("jobs", Job), ("models", Model), ("reports", Report))
        if session.scalar(select(exists().where(table.dataset_id == row.id)))
    ]
    if users:
        raise HTTPException(status_code=409, detail=f"dataset {dataset_id!r} is used by {' and '.join(users)}; "
                                                    "delete those first")
    session.delete(row)
    session.commit()
    return Response(status_code=204)


