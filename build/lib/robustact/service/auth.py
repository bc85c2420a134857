"""API keys and ownership: who is calling, and which rows they may see.

A key is ``ra_`` + 43 URL-safe characters (256 random bits). Only its SHA-256 is stored; the
key itself is shown once, when it is created (``robustact keys create`` or
``POST /v1/keys``). Every ``/v1`` request carries ``Authorization: Bearer KEY``; the
``Authenticate`` middleware (``service.middleware``) resolves it to a :class:`Caller` before
the body is read, so an unauthenticated client cannot make the API parse anything.

Ownership (docs/SERVICE.md, Security): every dataset, sweep, job, model and report has an
``owner_id``, the key that created it. A non-admin key sees its own rows, plus datasets and
models shared with it (or with every key) read-only; anything else answers 404, exactly like
an id that does not exist. Admin keys see and manage everything.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from robustact.service.db import ApiKey, Dataset, Model, Share, utcnow

KEY_PREFIX = "ra_"
ADMIN_KEY_FILE = "admin.key"
CALLER_SCOPE_KEY = "robustact.caller"
SHAREABLE = {Dataset: "dataset", Model: "model"}


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Caller:
    """The key a request was made with (a snapshot of its row)."""

    id: str
    name: str
    admin: bool
    max_active_jobs: int | None
    max_active_sweeps: int | None

    @classmethod
    def of(cls, row: ApiKey) -> "Caller":
        return cls(id=row.id, name=row.name, admin=row.admin, max_active_jobs=row.max_active_jobs,
                   max_active_sweeps=row.max_active_sweeps)


def create_key(session: Session, name: str, admin: bool = False, max_active_jobs: int | None = None,
               max_active_sweeps: int | None = None) -> tuple[ApiKey, str]:
    """Add (and commit) a key; returns its row and the key itself, which is not stored."""
    key = new_key()
    row = ApiKey(name=name, prefix=key[:10], key_hash=hash_key(key), admin=admin, max_active_jobs=max_active_jobs,
                 max_active_sweeps=max_active_sweeps)
    session.add(row)
    session.commit()
    return row, key


def lookup(session: Session, key: str) -> ApiKey | None:
    """The active key row for ``key``, or None (unknown or revoked)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def revoke(session: Session, row: ApiKey) -> None:
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()


def active_admins(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.admin.is_(True), ApiKey.revoked_at.is_(None))).all())


def write_key_file(path: Path, key: str) -> None:
    """Write ``key`` to ``path`` readable by its owner only (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_admin_key(session: Session, data_dir: Path) -> Path | None:
    """First start: if no key exists at all, create an admin key and write it to
    ``DATA_DIR/admin.key`` (mode 0600). Returns the file's path when it made one."""
    if session.scalar(select(exists().where(ApiKey.id.is_not(None)))):
        return None
    _, key = create_key(session, "admin", admin=True)
    path = data_dir / ADMIN_KEY_FILE
    write_key_file(path, key)
    return path


# --------------------------------------------------------------------------- visibility


def shared_with(caller: Caller, table) -> object:
    """SQL condition: a share of ``table``'s row with ``caller`` or with every key."""
    return exists().where(Share.kind == SHAREABLE[table], Share.object_id == table.id,
                          or_(Share.grantee_id.is_(None), Share.grantee_id == caller.id))


def visible(caller: Caller, table):
    """SQL condition on ``table`` for the rows ``caller`` may read (None: all of them)."""
    if caller.admin:
        return None
    own = table.owner_id == caller.id
    return or_(own, shared_with(caller, table)) if table in SHAREABLE else own


def scoped(query, table, caller: Caller):
    condition = visible(caller, table)
    return query if condition is None else query.where(condition)


def not_found(kind: str, ident: str) -> NoReturn:
    raise HTTPException(status_code=404, detail=f"{kind} {ident!r} not found")


def get_visible(session: Session, table, ident: str, caller: Caller, kind: str):
    """The row ``ident`` of ``table`` if ``caller`` may read it, else 404 (the same answer as
    for an id that does not exist: no existence leak)."""
    row = session.get(table, ident) if len(ident) <= 64 else None
    if row is None or not can_read(session, row, caller):
        not_found(kind, ident)
    return row


def can_read(session: Session, row, caller: Caller) -> bool:
    if caller.admin or row.owner_id == caller.id:
        return True
    table = type(row)
    if table not in SHAREABLE:
        return False
    return bool(session.scalar(select(exists().where(
        Share.kind == SHAREABLE[table], Share.object_id == row.id,
        or_(Share.grantee_id.is_(None), Share.grantee_id == caller.id)))))


def require_owner(row, caller: Caller, kind: str, action: str) -> None:
    """Changing a row is for its owner and admins; a key it is only shared with gets 403
    (it can read the row, so its existence is no secret to it)."""
    if not (caller.admin or row.owner_id == caller.id):
        raise HTTPException(status_code=403, detail=f"{kind} {row.id!r} is shared with this key read-only; "
                                                    f"only its owner or an admin can {action} it")


def require_admin(caller: Caller, action: str) -> None:
    if not caller.admin:
        raise HTTPException(status_code=403, detail=f"{action} needs an admin key")


# --------------------------------------------------------------------------- dependency

# Documents the scheme in OpenAPI ("Authorize" in /docs); the middleware enforces it.
bearer = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description="An API key: `Authorization: Bearer ra_...` (robustact keys create, or "
                                "DATA_DIR/admin.key after the first start)")


def get_caller(request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Caller:
    caller = request.scope.get(CALLER_SCOPE_KEY)
    if caller is None:  # only if a /v1 route were mounted outside the middleware
        raise HTTPException(status_code=401, detail="missing API key: send Authorization: Bearer KEY",
                            headers={"WWW-Authenticate": "Bearer"})
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]
