"""Sharded evaluations (issue 10): one evaluation job, N shard jobs taking units of work
from a queue, one merge.

An evaluation with ``shard_count`` = N > 1 is a *parent*: it is never sent to the broker
itself. N jobs of kind ``shard`` (``parent_id``, ``shard_index``) are, and any worker takes
any of them. The computation is ``models.evaluate.run_records`` cut into units:

1. The first stage, the clean pass over every clip, is run by each shard that starts
   before a plan exists. The first to finish saves its clean table to the store and
   records the plan (:func:`make_plan`): one row of ``job_units`` per unit (an attack
   group on one batch of the clean-correct clips, or the unbounded check on one), all in
   one transaction. The others find that plan and use it (their clean pass is dropped), so
   every shard works from one table; no shard ever waits for another.
2. Each shard then takes the next free unit (:func:`take_unit`, a conditional update, so
   two shards never take the same one) and saves its result to the store, until none is
   left. A shard that finishes early takes the work others have not started, so the
   shards end within one unit of each other however unequal the units' costs are (a
   robust clip costs every step of every restart). Under strategy ``full`` a unit is
   exactly a batch the unsharded run attacks, so the result is identical to it.

A shard keeps the units it took across attempts: after its worker died it resumes the unit
it held, and the units it finished (result in the store, ``done``) are never redone. Shards
are ordinary jobs for claiming, heartbeats, reaping, retries and logs.

The parent goes ``queued`` → ``running`` when its first shard starts. When every shard has
succeeded, :func:`settle` sends one merge task, which applies every unit to the clean table
and writes the report. A shard that failed for good fails the parent and cancels its
siblings. :func:`settle` runs after every shard, and in every housekeeping pass
(``service.reaper``), so a lost merge message or a merge whose worker died is sent again
once the parent's heartbeat is older than the heartbeat timeout.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Callable

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from robustact.service.db import Job, JobUnit, new_id, utcnow

log = logging.getLogger("robustact.shards")

MAX_SHARDS = 64
# ``shards`` left to the service: one shard per this many clips (1 for small sets).
AUTO_CLIPS_PER_SHARD = 500


def auto_shards(clips: int) -> int:
    return max(1, min(MAX_SHARDS, clips // AUTO_CLIPS_PER_SHARD))


def shard_positions(clips: int, index: int, count: int) -> list[int]:
    """Positions (sorted) of shard ``index`` of ``count`` over ``clips`` clips, for shards
    run by hand (``robustact evaluate --shard I/N``, one machine each, then ``robustact
    merge``): a fixed pseudo-random partition (seed 0). Neither contiguous slices nor every
    N-th clip: neighbouring clips share a subject, camera or class, and with them whether
    they are classified correctly (only those are attacked), so either would give the
    shards unequal work."""
    order = np.random.default_rng(0).permutation(clips)
    return sorted(int(p) for p in order[index::count])



def cache_location(dataset_id: str, geometry: dict[str, int]) -> str:
    """Where a prepare job puts a dataset's cache in the object store (and where workers
    look for it before decoding)."""
    return f"caches/{dataset_id}/{geometry['rgb_frames']}f{geometry['rgb_size']}px{geometry['skel_frames']}s"


PLAN = -1  # the unit row that records the plan: whose first stage is the one used


def unit_prefix(parent_id: str) -> str:
    return f"jobs/{parent_id}/units"


def unit_key(parent_id: str, unit: int) -> str:
    return f"{unit_prefix(parent_id)}/unit-{unit:06d}.npz"


def first_stage_key(parent_id: str, shard_id: str) -> str:
    return f"jobs/{parent_id}/first-stage-{shard_id}.npz"


def read_plan(session: Session, parent_id: str) -> dict | None:
    """The plan of ``parent_id`` (``{"shard": ..., "key": ..., "units": N}``) once a shard
    has made it, else None."""
    row = session.get(JobUnit, (parent_id, PLAN), populate_existing=True)
    return dict(row.spec) if row is not None else None


def make_plan(session: Session, parent_id: str, shard_id: str, key: str, units: list[dict]) -> dict:
    """Record the plan of ``parent_id``, made by shard ``shard_id`` from the first stage
    it saved at ``key``: the plan row and every unit, in one transaction. A shard that
    loses the race (another plan was recorded first) gets that plan back and uses it."""
    plan = {"shard": shard_id, "key": key, "units": len(units)}
    try:
        session.add(JobUnit(parent_id=parent_id, unit=PLAN, shard_id=shard_id, spec=plan, done=True))
        session.flush()
        session.add_all([JobUnit(parent_id=parent_id, unit=k, shard_id=None, spec=spec, done=False)
                         for k, spec in enumerate(units)])
        session.commit()
        return plan
    except IntegrityError:
        session.rollback()
    found = read_plan(session, parent_id)
    if found is None:
        raise RuntimeError(f"job {parent_id}: no plan recorded, yet recording one conflicted")
    return found


def take_unit(session: Session, parent_id: str, shard_id: str) -> tuple[int, dict] | None:
    """The next unit for shard ``shard_id`` and its spec: one it took before and has not
    finished (it resumes after a lost worker), else the lowest free one, taken by a
    conditional update; None when every unit is taken."""
    mine = session.scalar(select(func.min(JobUnit.unit)).where(
        JobUnit.parent_id == parent_id, JobUnit.shard_id == shard_id, JobUnit.done.is_(False)))
    while mine is None:
        free = session.scalar(select(func.min(JobUnit.unit)).where(
            JobUnit.parent_id == parent_id, JobUnit.shard_id.is_(None)))
        if free is None:
            return None
        result = session.execute(update(JobUnit).where(
            JobUnit.parent_id == parent_id, JobUnit.unit == free, JobUnit.shard_id.is_(None)).values(
            shard_id=shard_id))
        session.commit()
        if result.rowcount == 1:
            mine = free
    spec = session.scalar(select(JobUnit.spec).where(JobUnit.parent_id == parent_id, JobUnit.unit == mine))
    return mine, dict(spec)


def finish_unit(session: Session, parent_id: str, unit: int, shard_id: str) -> None:
    session.execute(update(JobUnit).where(JobUnit.parent_id == parent_id, JobUnit.unit == unit,
                                           JobUnit.shard_id == shard_id).values(done=True))
    session.commit()


def units_done_by(session: Session, parent_id: str, shard_id: str) -> list[int]:
    """The units shard ``shard_id`` finished (in earlier attempts too)."""
    return list(session.scalars(select(JobUnit.unit).where(
        JobUnit.parent_id == parent_id, JobUnit.shard_id == shard_id, JobUnit.done.is_(True),
        JobUnit.unit != PLAN)).all())


def make_shards(parent: Job) -> list[Job]:
    """The shard rows of ``parent`` (not added to a session)."""
    count = parent.shard_count or 1
    return [Job(id=new_id(), kind="shard", status="queued", params={"shard": i, "shards": count, "of": parent.kind},
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
    succeeded run again (each with a fresh attempt budget; saved units are kept), the ones
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
