"""Read-only shares of datasets and models with other keys (or with every key), used by
``/v1/datasets/{id}/shares`` (admin keys) and ``/v1/models/{id}/shares`` (the model's owner
or an admin). A share lets the grantee read the row, train on the dataset, evaluate and
classify with the model and download its checkpoint; never change or delete it."""

from __future__ import annotations

import datetime as dt

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from robustact.service.auth import Caller
from robustact.service.db import ApiKey, Share

ALL = "all"


class ShareCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_id: str | None = Field(None, max_length=64, description="the key to share with")
    all: bool = Field(False, description="share with every key, present and future")

    @model_validator(mode="after")
    def _one_grantee(self) -> "ShareCreate":
        if (self.key_id is None) == (not self.all):
            raise ValueError("give either key_id or all: true")
        return self


class SharePublic(BaseModel):
    grantee: str = Field(description="a key id, or 'all'")
    grantee_name: str | None
    created_at: dt.datetime


class ShareList(BaseModel):
    items: list[SharePublic]


def shares_of(session: Session, kind: str, object_id: str) -> ShareList:
    rows = session.execute(select(Share, ApiKey.name).outerjoin(ApiKey, ApiKey.id == Share.grantee_id)
                           .where(Share.kind == kind, Share.object_id == object_id)
                           .order_by(Share.created_at)).all()
    return ShareList(items=[SharePublic(grantee=s.grantee_id or ALL, grantee_name=name, created_at=s.created_at)
                            for s, name in rows])


def add_share(session: Session, kind: str, object_id: str, body: ShareCreate, caller: Caller) -> None:
    """Idempotent: sharing twice with the same grantee changes nothing. An unknown or revoked
    key is a 422 naming ``key_id``."""
    from robustact.service.api.deps import invalid

    grantee = None
    if body.key_id is not None:
        key = session.get(ApiKey, body.key_id)
        if key is None or key.revoked_at is not None:
            invalid("key_id", f"no active key {body.key_id!r}", body.key_id)
        if key.id == caller.id:
            invalid("key_id", "that is the key making this request", body.key_id)
        grantee = key.id
    condition = Share.grantee_id.is_(None) if grantee is None else Share.grantee_id == grantee
    if session.scalar(select(Share.id).where(Share.kind == kind, Share.object_id == object_id, condition)) is None:
        session.add(Share(kind=kind, object_id=object_id, grantee_id=grantee))
        session.commit()


def remove_share(session: Session, kind: str, object_id: str, grantee: str) -> None:
    condition = Share.grantee_id.is_(None) if grantee == ALL else Share.grantee_id == grantee
    rows = session.scalars(select(Share).where(Share.kind == kind, Share.object_id == object_id, condition)).all()
    if not rows:
        raise HTTPException(status_code=404, detail=f"{kind} {object_id!r} is not shared with {grantee!r}")
    for row in rows:
        session.delete(row)
    session.commit()


def delete_shares(session: Session, kind: str, object_id: str) -> None:
    """Drop every share of a row that is being deleted (not committed)."""
    for row in session.scalars(select(Share).where(Share.kind == kind, Share.object_id == object_id)).all():
        session.delete(row)
