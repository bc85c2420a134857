"""The FastAPI application: ``create_app(settings)``.

On start it migrates the database to the newest schema, opens the store and a Celery
producer on the configured broker. Every ``/v1`` route needs an API key
(``service.auth``). Errors are JSON ``{"detail": ...}``: 401 no or a bad key, 403 an admin
route or a read-only share, 404 unknown (or someone else's) ids, 409 conflicts, 413 too
large, 415 wrong media type, 422 invalid input (``detail`` is a list of ``{"loc", "msg"}``
naming the field), 429 over a quota, 503 busy or a backend is down (with ``Retry-After``
when waiting helps). A 500 is a bug.
"""

from __future__ import annotations

import logging
import math
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from robustact.service.api import datasets, health, jobs, keys, models, reports, sweeps
from robustact.service.auth import get_caller
from robustact.service.classify import ModelCache
from robustact.service.db import make_engine, make_sessionmaker, migrate
from robustact.service.decoder import make_decoder_pool
from robustact.service.metrics import install_metrics
from robustact.service.middleware import Admission, Admit, Authenticate, LimitBody
from robustact.service.backends import is_outage
from robustact.service.reaper import Reaper
from robustact.service.schemas import ErrorPublic
from robustact.service.settings import Settings
from robustact.service.store import StoreUnavailable, open_store
from robustact.worker.celery_app import make_celery

log = logging.getLogger("robustact.api")


def _error(description: str) -> dict:
    # The schema spelled out, not ``model``: FastAPI would file it under the route's own media
    # type, text/html for the HTML pages, while errors are always JSON.
    return {"description": description, "content": {"application/json": {"schema": ErrorPublic.model_json_schema()}}}


# Every /v1 route checks its key in the database before anything else, so any of them may
# answer these (the other codes are documented by the routes that give them).
V1_ERRORS = {
    401: _error("no API key, or an invalid or revoked one"),
    503: _error("a backend (database, broker, object store, decoder) is unreachable or busy; retry after Retry-After"),
}


def _unavailable(what: str, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"{what} is unreachable ({type(exc).__name__}); retry shortly"},
                        status_code=503, headers={"Retry-After": "5"})


def _json_safe(value):
    """``value`` with every non-finite float replaced by its name ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.api_torch_threads > 0:
            import torch

            torch.set_num_threads(settings.api_torch_threads)
        migrate(settings.database_url)
        engine = make_engine(settings.database_url)
        store = open_store(settings.store_url, settings.s3_endpoint_url, settings.s3_region)
        app.state.settings = settings
        app.state.engine = engine
        app.state.sessions = make_sessionmaker(engine)
        app.state.store = store
        app.state.celery = make_celery(settings)
        app.state.models = ModelCache(store, settings.cache_dir / "models", settings.model_cache_size,
                                      settings.device)
        app.state.decoders = make_decoder_pool(settings)
        reaper = Reaper(app.state.sessions, settings, app.state.celery).start()  # also when no worker lives
        try:
            yield
        finally:
            reaper.stop()
            app.state.decoders.close()
            engine.dispose()

    app = FastAPI(title="robustact", version="0.1.0", lifespan=lifespan,
                  description="Train, attack and serve RGB + skeleton action-recognition models (AMR).")

    # Outermost first: authenticate, admit (classify), then count the body's bytes.
    app.state.admission = Admission(settings.classify_slots, settings.classify_queue)
    app.add_middleware(LimitBody, upload_bytes=settings.max_upload_bytes, body_bytes=settings.max_body_bytes)
    app.add_middleware(Admit, admission=app.state.admission, retry_after_s=settings.busy_retry_after_s)
    app.add_middleware(Authenticate)
    install_metrics(app, settings)  # GET /metrics; its HTTP middleware is outermost, so it sees every answer

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes each bad value; a NaN or an infinity (Python's json
        # reads them) would make that answer unserialisable, i.e. a 500.
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(sa_exc.DBAPIError)
    async def database_error(request: Request, exc: sa_exc.DBAPIError):
        # A dropped or refused connection is an outage, not a bug: 503, and the client may retry.
        if is_outage(exc):
            log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                        str(exc.orig).splitlines()[0] if exc.orig else exc)
            return _unavailable("the database", exc)
        return await unexpected_error(request, exc)

    @app.exception_handler(sa_exc.TimeoutError)
    async def database_busy(request: Request, exc: sa_exc.TimeoutError):
        return _unavailable("the database (no free connection)", exc)

    async def store_error(request: Request, exc: Exception):
        log.warning("object store unavailable on %s %s: %s", request.method, request.url.path, exc)
        return _unavailable("the object store", exc)

    for unavailable in StoreUnavailable:  # botocore's connection errors
        app.add_exception_handler(unavailable, store_error)

    try:
        from botocore.exceptions import ClientError
    except ImportError:  # boto3 not installed: only the file store
        ClientError = None
    if ClientError is not None:
        @app.exception_handler(ClientError)
        async def store_refused(request: Request, exc: ClientError):
            # A missing object is ObjectNotFound (the routes' 404) before it gets here; anything
            # else S3 answers (no such bucket, access denied, throttling) is the deployment's
            # problem, not the request's.
            code = exc.response.get("Error", {}).get("Code", "unknown")
            log.error("object store refused %s %s: %s", request.method, request.url.path, exc)
            return JSONResponse({"detail": f"the object store refused the request ({code}); retry shortly or "
                                           "tell the operator"}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); this is a bug, see the server log"},
                            status_code=500)

    app.include_router(health.router)
    for module in (keys, datasets, jobs, sweeps, models, reports):  # every /v1 route needs a key
        app.include_router(module.router, dependencies=[Depends(get_caller)], responses=V1_ERRORS)
    return app
