"""/v1/keys: API keys. Creating, listing, changing and revoking keys is for admin keys;
any key can read itself (``GET /v1/keys/me``). A new key is shown once, in the answer that
creates it; only its hash is stored."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from robustact.service.api.deps import SessionDep, SettingsDep
from robustact.service.auth import CallerDep, active_admins, create_key, not_found, require_admin, revoke
from robustact.service.db import ApiKey
from robustact.service.schemas import MAX_OFFSET, Links
from robustact.service.settings import Settings

router = APIRouter(prefix="/v1/keys", tags=["keys"])

Quota = Field(None, ge=0, le=100_000)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="who or what uses the key")
    admin: bool = Field(False, description="admin keys see every row and manage keys and datasets")
    max_active_jobs: int | None = Field(None, ge=0, le=100_000,
                                        description="queued + running jobs outside sweeps (default: the service's)")
    max_active_sweeps: int | None = Field(None, ge=0, le=100_000,
                                          description="sweeps with queued or running jobs (default: the service's)")


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    max_active_jobs: int | None = Quota
    max_active_sweeps: int | None = Quota


class KeyPublic(BaseModel):
    id: str
    name: str
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    admin: bool
    max_active_jobs: int = Field(description="in effect (the key's own or the service's default)")
    max_active_sweeps: int
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    links: Links


class KeyCreated(KeyPublic):
    key: str = Field(description="the API key itself: shown this once, store it now")


class KeyList(BaseModel):
    items: list[KeyPublic]
    total: int
    limit: int
    offset: int


def key_public(row: ApiKey, settings: Settings) -> dict:
    return dict(id=row.id, name=row.name, prefix=row.prefix, admin=row.admin,
                max_active_jobs=row.max_active_jobs if row.max_active_jobs is not None else settings.max_active_jobs,
                max_active_sweeps=(row.max_active_sweeps if row.max_active_sweeps is not None
                                   else settings.max_active_sweeps),
                created_at=row.created_at, revoked_at=row.revoked_at, links=Links(self=f"/v1/keys/{row.id}"))


def _key_or_404(session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id) if len(key_id) <= 64 else None
    if row is None:
        not_found("key", key_id)
    return row


@router.post("", status_code=201, response_model=KeyCreated)
def create(body: KeyCreate, caller: CallerDep, session: SessionDep, settings: SettingsDep, response: Response):
    """A new key; the answer is the only place its secret ever appears."""
    require_admin(caller, "creating keys")
    row, key = create_key(session, body.name, admin=body.admin, max_active_jobs=body.max_active_jobs,
                          max_active_sweeps=body.max_active_sweeps)
    response.headers["Location"] = f"/v1/keys/{row.id}"
    return KeyCreated(**key_public(row, settings), key=key)


@router.get("", response_model=KeyList)
def list_keys(caller: CallerDep, session: SessionDep, settings: SettingsDep,
              revoked: bool | None = Query(None, description="only revoked (true) or active (false) keys"),
              limit: int = Query(100, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_OFFSET)):
    require_admin(caller, "listing keys")
    query = select(ApiKey)
    if revoked is not None:
        query = query.where(ApiKey.revoked_at.is_not(None) if revoked else ApiKey.revoked_at.is_(None))
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(ApiKey.created_at, ApiKey.id).limit(limit).offset(offset)).all()
    return KeyList(items=[KeyPublic(**key_public(r, settings)) for r in rows], total=total, limit=limit,
                   offset=offset)


@router.get("/me", response_model=KeyPublic)
def me(caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """The key this request was made with."""
    return KeyPublic(**key_public(_key_or_404(session, caller.id), settings))


@router.get("/{key_id}", response_model=KeyPublic)
def get_key(key_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    if key_id != caller.id:
        require_admin(caller, "reading another key")
    return KeyPublic(**key_public(_key_or_404(session, key_id), settings))


@router.patch("/{key_id}", response_model=KeyPublic)
def update_key(key_id: str, body: KeyUpdate, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """Rename a key or set its quotas (``null`` returns a quota to the service's default)."""
    require_admin(caller, "changing keys")
    row = _key_or_404(session, key_id)
    for field in body.model_fields_set:
        value = getattr(body, field)
        if field == "name" and value is None:
            continue
        setattr(row, field, value)
    session.commit()
    return KeyPublic(**key_public(row, settings))


@router.delete("/{key_id}", status_code=204)
def revoke_key(key_id: str, caller: CallerDep, session: SessionDep):
    """Revoke a key: it answers 401 from now on. Its rows stay (admins still see them)."""
    require_admin(caller, "revoking keys")
    row = _key_or_404(session, key_id)
    if row.admin and row.revoked_at is None and len(active_admins(session)) == 1:
        raise HTTPException(status_code=409, detail="this is the last active admin key; create another admin key "
                                                    "first (or use `robustact keys create --admin`)")
    revoke(session, row)
    return Response(status_code=204)
