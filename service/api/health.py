"""/healthz (the process answers) and /readyz (database, broker and store reachable)."""

from __future__ import annotations

import concurrent.futures
from typing import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from worker.celery_app import QUEUE

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
    with request.app.state.celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)
        declared = conn.default_channel.queue_declare(queue=QUEUE, durable=True, auto_delete=False)
    return f"ok ({declared.message_count} message(s) waiting)"


def _check_store(request: Request) -> str:
    request.app.state.store.ping()
    return "ok"


@router.get("/readyz")
def readyz(request: Request):
    checks: dict[str, Callable[[Request], str]] = {
        "database": _check_database, "broker": _check_broker, "store": _check_store}
    results, ready = {}, True
    with concurrent.futures.ThreadPoolExecutor(len(checks)) as pool:
        futures = {name: pool.submit(check, request) for name, check in checks.items()}
        for name, future in futures.items():
            try:
                results[name] = future.result(timeout=CHECK_TIMEOUT_S * 2)
            except Exception as e:  # any failure means "not ready", reported by name
                ready = False
                results[name] = f"error: {type(e).__name__}: {e}"
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": results},
                        status_code=200 if ready else 503)
