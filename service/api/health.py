"""/healthz (the process answers) and /readyz (database, broker and store reachable, and
enough workers seen alive). Every check has its own timeout, and /readyz answers within
about ``CHECK_TIMEOUT_S`` even when a backend hangs."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Callable

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from fastapi.responses import JSONResponse
from sqlalchemy import text

from robustact.service.reaper import workers_alive
from robustact.worker.celery_app import queue_depth

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 5.0


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


def _check_database(request: Request) -> str:
    with request.app.state.sessions() as session:
        session.execute(text("SELECT 1"))
    return "ok"


def _check_broker(request: Request) -> str:
    return f"ok ({queue_depth(request.app.state.celery, CHECK_TIMEOUT_S)} message(s) waiting)"


class NotEnoughWorkers(RuntimeError):
    """Fewer workers heartbeating than ``ready_min_workers``."""


def _check_workers(request: Request) -> str:
    """Workers whose heartbeat (``workers.seen_at``) is within the heartbeat timeout."""
    settings = request.app.state.settings
    with request.app.state.sessions() as session:
        alive = workers_alive(session, settings.heartbeat_timeout_s)
    names = ", ".join(f"{w.name}" + (f" (job {w.job_id})" if w.job_id else "") for w in alive[:20])
    summary = f"{len(alive)} alive" + (f": {names}" if names else "")
    if len(alive) < settings.ready_min_workers:
        raise NotEnoughWorkers(f"{summary}; at least {settings.ready_min_workers} needed (no heartbeat within "
                               f"{settings.heartbeat_timeout_s:.0f}s)")
    return f"ok ({summary})"


def _check_store(request: Request) -> str:
    request.app.state.store.ping()
    return "ok"


class Readiness(BaseModel):
    status: str = Field(description="ready | not ready")
    checks: dict[str, str] = Field(description="database, broker, store, workers: ok (...) or error: ...")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
def readyz(request: Request):
    checks: dict[str, Callable[[Request], str]] = {
        "database": _check_database, "broker": _check_broker, "store": _check_store, "workers": _check_workers}
    results, ready = {}, True
    pool = concurrent.futures.ThreadPoolExecutor(len(checks), thread_name_prefix="readyz")
    try:
        futures = {name: pool.submit(check, request) for name, check in checks.items()}
        deadline = time.monotonic() + CHECK_TIMEOUT_S * 2
        for name, future in futures.items():
            try:
                results[name] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                ready = False
                results[name] = f"error: no answer within {CHECK_TIMEOUT_S * 2:.0f}s"
            except Exception as e:  # any failure means "not ready", reported by name
                ready = False
                results[name] = f"error: {type(e).__name__}: {e}"
    finally:
        pool.shutdown(wait=False)  # a check that hangs must not hang the answer
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": results},
                        status_code=200 if ready else 503)
