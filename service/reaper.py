"""The stale-job reaper, run by the API process too (``create_app``'s lifespan).

Workers reap jobs whose worker vanished (``worker.tasks.reap_stale_jobs``), but when the
only worker is the one that died, nobody would: the job would stay ``running`` until a
worker starts again. So every API process also runs a pass every third of the heartbeat
timeout; claims are conditional on the attempt number, so passes in several processes
cannot requeue one job twice.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from worker.celery_app import TASK_FOR_KIND

log = logging.getLogger("robustact.reaper")


class Reaper:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, celery: Celery):
        self.sessions, self.settings, self.celery = sessions, settings, celery
        self.every_s = max(1.0, settings.heartbeat_timeout_s / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def start(self) -> "Reaper":
        self._thread.start()
        return self

    def _send(self, job) -> None:
        self.celery.send_task(TASK_FOR_KIND[job.kind], args=[job.id])

    def reap(self) -> list[tuple[str, str]]:
        from worker.tasks import reap_stale_jobs

        return reap_stale_jobs(self.sessions, self.settings.heartbeat_timeout_s, self.settings.max_attempts,
                               self._send)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.reap()
            except Exception as e:  # e.g. the database is down: try again next time
                log.warning("reaping stale jobs failed: %s: %s", type(e).__name__, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
