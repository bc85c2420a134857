"""Dependencies shared by the routes: the database session, settings, store and broker,
and the one way every route reports a bad request field (422 with ``loc`` and ``msg``)."""

from __future__ import annotations

from typing import Annotated, Any, Iterator, NoReturn

from celery import Celery
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from robustact.service.settings import Settings
from robustact.service.store import Store


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


def invalid(field: str | tuple[str, ...], message: str, value: Any = None, where: str = "body") -> NoReturn:
    """Raise the same 422 shape FastAPI uses for schema errors, naming ``field``."""
    loc = (where, *((field,) if isinstance(field, str) else field))
    raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])
