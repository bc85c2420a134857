"""The FastAPI application: ``create_app(settings)``.

On start it migrates the database to the newest schema, opens the store and a Celery
producer on the configured broker. Errors are JSON ``{"detail": ...}``: 404 unknown ids,
409 conflicts, 413 too large, 415 wrong media type, 422 invalid input (``detail`` is a
list of ``{"loc", "msg"}`` naming the field), 503 a backend is down. A 500 is a bug.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.api import datasets, health, jobs, models, reports, sweeps
from service.classify import ModelCache
from service.db import make_engine, make_sessionmaker, migrate
from service.settings import Settings
from service.store import open_store
from worker.celery_app import make_celery

log = logging.getLogger("robustact.api")


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
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(title="robustact", version="0.1.0", lifespan=lifespan,
                  description="Train, attack and serve RGB + skeleton action-recognition models (AMR).")

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        # Reject an oversized upload before reading it; chunked uploads without a length
        # are checked again after parsing (classify route).
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_upload_bytes:
            return JSONResponse({"detail": f"request body of {int(length)} bytes is larger than the "
                                           f"{settings.max_upload_mb:g} MiB limit"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); this is a bug, see the server log"},
                            status_code=500)

    for module in (health, datasets, jobs, sweeps, models, reports):
        app.include_router(module.router)
    return app
