"""Housekeeping that keeps every job moving, run by every API process and every worker.

* **Lost workers** (:func:`reap_stale_jobs`): a ``running`` job whose heartbeat is older
  than ``heartbeat_timeout_s`` lost its worker; it is requeued, or failed once its attempt
  budget (``max_attempts`` since the last retry by a user) is spent.
* **Outbox** (:func:`resend_unsent`): a job row is committed before its message is sent, so
  a crash or a broker error in between leaves a ``queued`` row with ``sent_at`` NULL; after
  ``outbox_grace_s`` it is sent again. And when the broker holds fewer messages than there
  are queued jobs (a broker restarted without its data), the queued jobs are all sent again.
  Claiming a job is conditional (``worker.tasks.claim``), so a duplicate message is a no-op.
* **Sharded evaluations** (``service.shards.settle_all``): a failed shard fails its
  evaluation; a finished one whose merge message was lost (or whose merge worker died) gets
  it sent again.
* **Departed workers** (:func:`prune_workers`): rows of ``workers`` not seen for a long time.

The API runs it too (``create_app``'s lifespan): when the only worker is the one that died,
nobody else would notice. Every change is a conditional UPDATE, so passes in several
processes at once cannot requeue one job twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any, Callable

from celery import Celery
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from robustact.service.db import Job, Worker, utcnow
from robustact.service.settings import Settings
from robustact.worker.celery_app import MERGE_TASK, TASK_FOR_KIND, queue_depth

log = logging.getLogger("robustact.reaper")

# A worker row unseen this many heartbeat timeouts is deleted (a worker that was killed).
PRUNE_AFTER_TIMEOUTS = 20


def reap_stale_jobs(sessions: sessionmaker[Session], timeout_s: float, max_attempts: int,
                    requeue: Callable[[Job], None]) -> list[tuple[str, str]]:
    """Requeue (or fail, after ``max_attempts`` attempts since the last retry) running jobs
    whose heartbeat is older than ``timeout_s``. Returns ``[(job_id, new_status)]``."""
    cutoff = utcnow() - dt.timedelta(seconds=timeout_s)
    changed = []
    with sessions() as session:
        # A sharded evaluation's own row is settled from its shards (``service.shards``).
        stale = session.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff,
                                                  Job.shard_count.is_(None))).all()
        for job in stale:
            last_heartbeat = job.heartbeat_at
            used = job.attempts - (job.attempt_base or 0)
            if job.cancel_requested:
                status, error = "cancelled", None
            elif used >= max_attempts:
                status, error = "failed", (f"worker lost: no heartbeat for {timeout_s:.0f}s "
                                           f"(attempt {used} of {max_attempts})")
            else:
                status, error = "queued", None
            values: dict[str, Any] = {"status": status, "error": error, "heartbeat_at": None}
            if status == "queued":
                values.update(sent_at=None, queued_at=utcnow())
            else:
                values["finished_at"] = utcnow()
            result = session.execute(update(Job).where(Job.id == job.id, Job.status == "running",
                                                       Job.attempts == job.attempts).values(**values))
            session.commit()
            if result.rowcount == 1:
                log.warning("job %s: no heartbeat since %s -> %s", job.id, last_heartbeat, status)
                changed.append((job.id, status))
                if status == "queued":
                    try:
                        requeue(job)
                    except Exception:  # the outbox sends it later; the pass goes on
                        log.exception("job %s: requeued, but its message could not be sent", job.id)
                    else:
                        _mark_sent(session, [job.id])
    return changed


def _mark_sent(session: Session, job_ids: list[str]) -> None:
    session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == "queued").values(sent_at=utcnow()))
    session.commit()


def resend_unsent(sessions: sessionmaker[Session], grace_s: float, send: Callable[[Job], None],
                  depth: Callable[[], int] | None = None) -> list[str]:
    """Send again the queued jobs whose message may be lost (see the module docstring).
    ``depth()`` is the broker's count of waiting messages (None: skip that check). Stops at
    the first send error (the broker is down: the next pass tries again). Returns the ids
    sent."""
    cutoff = utcnow() - dt.timedelta(seconds=grace_s)
    with sessions() as session:
        queued = select(Job).where(Job.status == "queued", Job.cancel_requested.is_(False), Job.queued_at < cutoff,
                                   Job.shard_count.is_(None)).order_by(Job.queued_at, Job.id)
        todo = list(session.scalars(queued.where(Job.sent_at.is_(None))).all())
        if depth is not None:
            sent_before = session.scalars(queued.where(Job.sent_at < cutoff)).all()
            waiting = None
            if sent_before:
                try:
                    waiting = depth()
                except Exception as e:
                    log.warning("outbox: cannot count the broker's messages (%s: %s)", type(e).__name__, e)
                # Every queued job's message waits in the queue (a worker holds only the message
                # of the job it runs). Fewer messages than jobs: some were lost.
                if waiting is not None and waiting < len(sent_before):
                    log.warning("the broker holds %d message(s) for %d queued job(s): sending them again",
                                waiting, len(sent_before))
                    todo += sent_before
        done = []
        for job in todo:
            try:
                send(job)
            except Exception as e:
                log.warning("outbox: job %s still not sent (%s: %s)", job.id, type(e).__name__, e)
                break
            done.append(job.id)
        if done:
            log.info("outbox: sent %d queued job(s) again: %s", len(done), ", ".join(done))
            _mark_sent(session, done)
        return done


def prune_workers(sessions: sessionmaker[Session], timeout_s: float) -> int:
    cutoff = utcnow() - dt.timedelta(seconds=timeout_s * PRUNE_AFTER_TIMEOUTS)
    with sessions() as session:
        result = session.execute(delete(Worker).where(Worker.seen_at < cutoff))
        session.commit()
        return result.rowcount


def workers_alive(session: Session, timeout_s: float) -> list[Worker]:
    cutoff = utcnow() - dt.timedelta(seconds=timeout_s)
    return list(session.scalars(select(Worker).where(Worker.seen_at >= cutoff).order_by(Worker.name)).all())


def count_alive(session: Session, timeout_s: float) -> int:
    cutoff = utcnow() - dt.timedelta(seconds=timeout_s)
    return session.scalar(select(func.count()).select_from(Worker).where(Worker.seen_at >= cutoff))


class Reaper:
    """Runs :meth:`run_once` every third of the heartbeat timeout in a daemon thread."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, celery: Celery):
        self.sessions, self.settings, self.celery = sessions, settings, celery
        self.every_s = max(1.0, min(settings.heartbeat_timeout_s, settings.outbox_grace_s) / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def start(self, immediately: bool = False) -> "Reaper":
        self._immediately = immediately
        self._thread.start()
        return self

    def send(self, job: Job) -> None:
        self.celery.send_task(TASK_FOR_KIND[job.kind], args=[job.id])

    def send_merge(self, parent_id: str) -> None:
        self.celery.send_task(MERGE_TASK, args=[parent_id])

    def run_once(self) -> None:
        from robustact.service.shards import settle_all

        s = self.settings
        reap_stale_jobs(self.sessions, s.heartbeat_timeout_s, s.max_attempts, self.send)
        resend_unsent(self.sessions, s.outbox_grace_s, self.send, depth=lambda: queue_depth(self.celery))
        with self.sessions() as session:
            settle_all(session, self.send_merge, s.heartbeat_timeout_s)
        prune_workers(self.sessions, s.heartbeat_timeout_s)

    def _run(self) -> None:
        if self._immediately:
            self._pass()
        while not self._stop.wait(self.every_s):
            self._pass()

    def _pass(self) -> None:
        try:
            self.run_once()
        except Exception as e:  # e.g. the database is down: try again next time
            log.warning("housekeeping pass failed: %s: %s", type(e).__name__, e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
