"""``Idempotency-Key`` on the POSTs that create things (jobs, sweeps, datasets).

A client that times out and retries must not create a job twice. With the header, the first
request records (owner, key) → the resource it created, in the same transaction that
creates it; a later request with the same key and the same body answers with that resource
(its current state, with the first request's status code) and creates nothing; the same key
with a different body or on another route is a 409. Keys are per API key and remembered for
``TTL``; two concurrent requests with one key cannot both create: the unique constraint lets
one commit, the other replays it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any, Callable, TypeVar

from fastapi import Header, HTTPException
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from robustact.service.auth import Caller
from robustact.service.db import IdempotencyKey, utcnow

TTL = dt.timedelta(hours=24)
T = TypeVar("T")

IdempotencyHeader = Header(None, alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
                           description="makes retries of this POST safe: the same key and body within 24 h "
                                       "return the first answer's resource instead of creating another")


def request_hash(route: str, body: Any) -> str:
    return hashlib.sha256(json.dumps([route, body], sort_keys=True, default=str).encode()).hexdigest()


def previous(session: Session, caller: Caller, key: str | None, route: str, digest: str) -> str | None:
    """The resource an earlier request with ``key`` created, or None; 409 if that request
    was a different one."""
    if key is None:
        return None
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.owner_id == caller.id,
                                                 IdempotencyKey.key == key,
                                                 IdempotencyKey.created_at < utcnow() - TTL))
    row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.owner_id == caller.id,
                                                      IdempotencyKey.key == key))
    if row is None:
        return None
    if row.route != route or row.request_hash != digest:
        raise HTTPException(status_code=409, detail=f"Idempotency-Key {key!r} was used for a different request "
                                                    f"({row.route}); use a new key for a new request")
    return row.resource


def remember(session: Session, caller: Caller, key: str | None, route: str, digest: str, resource: str) -> None:
    """Add (not commit) the record: it is committed with the rows it stands for."""
    if key is not None:
        session.add(IdempotencyKey(owner_id=caller.id, key=key, route=route, request_hash=digest,
                                   resource=resource))


def create_once(session: Session, caller: Caller, key: str | None, route: str, body: Any,
                create: Callable[[str], T], replay: Callable[[str], T]) -> T:
    """``create(digest)`` (which must ``remember`` before its commit), unless ``key`` was
    seen: then ``replay(resource)``. A concurrent twin that committed first is replayed."""
    digest = request_hash(route, body)
    resource = previous(session, caller, key, route, digest)
    if resource is not None:
        return replay(resource)
    try:
        return create(digest)
    except IntegrityError:
        if key is None:
            raise
        session.rollback()
        resource = previous(session, caller, key, route, digest)
        if resource is None:
            raise
        return replay(resource)
