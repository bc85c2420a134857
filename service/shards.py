"""Sharded evaluations (issue 10): one evaluation job, N shard jobs, one merge.

An evaluation job with ``shard_count`` = N > 1 is a *parent*: it is never sent to the
broker itself. N jobs of kind ``shard`` (``parent_id``, ``shard_index``) are, and any worker
takes any of them: shard i attacks its share of a fixed pseudo-random partition of the evaluated clips (``shard_positions``) and
writes its per-clip records to the store in chunks of ``shard_chunk_clips`` clips, so a shard
whose worker died resumes after its last saved chunk, not from zero. Shards are ordinary
jobs for claiming, heartbeats, reaping, retries and logs.

The parent goes ``queued`` → ``running`` when its first shard starts. When every shard has
succeeded, :func:`settle` sends one merge task, which concatenates the shards' records
(``ClipRecords.concat``) and writes the report, exactly as an unsharded evaluation would
have (a clip's random start depends on its id, never on its batch or shard). A shard that
failed for good fails the parent and cancels its siblings. :func:`settle` runs after every
shard, and in every housekeeping pass (``service.reaper``), so a lost merge message or a
merge whose worker died is sent again once the parent's heartbeat is older than the
heartbeat timeout.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Callable

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from robustact.service.db import Job, new_id, utcnow

log = logging.getLogger("robustact.shards")

MAX_SHARDS = 64
# ``shards`` left to the service: one shard per this many clips (1 for small sets).
AUTO_CLIPS_PER_SHARD = 500


def auto_shards(clips: int) -> int:
    return max(1, min(MAX_SHARDS, clips // AUTO_CLIPS_PER_SHARD))


def shard_positions(clips: int, index: int, count: int) -> list[int]:
    """Positions (sorted) of shard ``index`` of ``count`` over ``clips`` clips: a fixed
    pseudo-random partition (seed 0, the same on every machine and for every evaluation of
    that many clips). Neither contiguous slices nor every N-th clip: neighbouring clips
    share a subject, camera or class, and with them whether they are classified correctly
    (only those are attacked), so either would give the shards unequal work."""
    order = np.random.default_rng(0).permutation(clips)
    return sorted(int(p) for p in order[index::count])


def chunk_prefix(shard_id: str) -> str:
    return f"jobs/{shard_id}/records"


def chunk_key(shard_id: str, chunk: int) -> str:
    return f"{chunk_prefix(shard_id)}/chunk-{chunk:05d}.npz"


def make_shards(parent: Job) -> list[Job]:
    """The shard rows of ``parent`` (not added to a session)."""
    count = parent.shard_count or 1
    return [Job(id=new_id(), kind="shard", status="queued", params={"shard": i, "shards": count},
                dataset_id=parent.dataset_id, model_id=parent.model_id, owner_id=parent.owner_id,
                parent_id=parent.id, shard_index=i) for i in range(count)]


def children(session: Session, parent_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.parent_id == parent_id).order_by(Job.shard_index)).all())


def start_parent(session: Session, parent_id: str) -> None:
    """A shard starts: its parent is running from now on (if it was still queued)."""
    now = utcnow()
    session.execute(update(Job).where(Job.id == parent_id, Job.status == "queued").values(
        status="running", started_at=now, heartbeat_at=None))
    session.commit()


def cancel_parent(session: Session, parent: Job) -> None:
    """Cancel a sharded evaluation: the parent at once, queued shards at once, running
    shards at their next step (``cancel_requested``)."""
    now = utcnow()
    session.execute(update(Job).where(Job.id == parent.id, Job.status.in_(("queued", "running"))).values(
        status="cancelled", cancel_requested=True, finished_at=now))
    session.execute(update(Job).where(Job.parent_id == parent.id, Job.status == "queued").values(
        status="cancelled", cancel_requested=True, finished_at=now))
    session.execute(update(Job).where(Job.parent_id == parent.id, Job.status == "running").values(
        cancel_requested=True))
    session.commit()


def retry_parent(session: Session, parent: Job) -> list[Job]:
    """Queue a failed or cancelled sharded evaluation again: the shards that had not
    succeeded run again (each with a fresh attempt budget; saved chunks are kept), the ones
    that succeeded are not redone. Returns the shards to send (none: only the merge is
    left, :func:`settle` sends it)."""
    now = utcnow()
    redo = [c for c in children(session, parent.id) if c.status != "succeeded"]
    session.execute(update(Job).where(Job.id == parent.id).values(
        status="queued" if redo else "running", cancel_requested=False, error=None, finished_at=None,
        heartbeat_at=None, queued_at=now, attempt_base=Job.attempts))
    if redo:
        session.execute(update(Job).where(Job.id.in_([c.id for c in redo])).values(
            status="queued", cancel_requested=False, error=None, finished_at=None, heartbeat_at=None, sent_at=None,
            queued_at=now, attempt_base=Job.attempts))
    session.commit()
    for c in redo:
        session.refresh(c)
    return redo


def settle(session: Session, parent_id: str, send_merge: Callable[[str], None], stale_after_s: float) -> str | None:
    """Move a sharded evaluation on from what its shards did: a failed shard fails it (and
    cancels the others); when all succeeded, send the merge unless one was sent less than
    ``stale_after_s`` ago (the parent's heartbeat). Returns what it did, if anything."""
    parent = session.get(Job, parent_id, populate_existing=True)
    if parent is None or parent.status not in ("queued", "running"):
        return None
    shards = children(session, parent_id)
    failed = [c for c in shards if c.status == "failed"]
    if failed:
        now = utcnow()
        first = failed[0]
        error = f"shard {first.shard_index + 1} of {parent.shard_count} failed: {first.error}"
        result = session.execute(update(Job).where(Job.id == parent_id, Job.status.in_(("queued", "running")))
                                 .values(status="failed", error=error, finished_at=now))
        session.execute(update(Job).where(Job.parent_id == parent_id, Job.status == "queued").values(
            status="cancelled", cancel_requested=True, finished_at=now))
        session.execute(update(Job).where(Job.parent_id == parent_id, Job.status == "running").values(
            cancel_requested=True))
        session.commit()
        if result.rowcount == 1:
            log.warning("evaluation %s: %s", parent_id, error)
            return "failed"
        return None
    if shards and all(c.status == "succeeded" for c in shards):
        cutoff = utcnow() - dt.timedelta(seconds=stale_after_s)
        result = session.execute(update(Job).where(
            Job.id == parent_id, Job.status.in_(("queued", "running")),
            (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff)).values(
            status="running", heartbeat_at=utcnow()))
        session.commit()
        if result.rowcount == 1:
            try:
                send_merge(parent_id)
            except Exception as e:  # the next housekeeping pass sends it once the heartbeat is stale
                log.warning("evaluation %s: merge not sent (%s: %s)", parent_id, type(e).__name__, e)
                return None
            log.info("evaluation %s: all %d shards done, merge sent", parent_id, len(shards))
            return "merge"
    return None


def settle_all(session: Session, send_merge: Callable[[str], None], stale_after_s: float) -> list[str]:
    """:func:`settle` every unfinished sharded evaluation (a housekeeping pass)."""
    ids = session.scalars(select(Job.id).where(Job.shard_count.is_not(None), Job.parent_id.is_(None),
                                               Job.status.in_(("queued", "running")))).all()
    done = []
    for parent_id in ids:
        if settle(session, parent_id, send_merge, stale_after_s):
            done.append(parent_id)
    return done
