"""What counts as a backend outage, and riding one out.

An *outage* is an error that says nothing about the request or the job: the database
refused or dropped the connection, the object store did not answer. The API turns one into
a 503 (``service.app``); a worker retries the write it was doing with backoff for up to
``outage_tolerance_s`` (:func:`retrying`), so a short outage costs a running job a pause,
not its result.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from sqlalchemy import exc as sa_exc

from robustact.service.store import StoreUnavailable

T = TypeVar("T")

log = logging.getLogger("robustact.backends")

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0


def is_outage(exc: BaseException) -> bool:
    """True for a database connection that failed or was cut, a database with no free
    connection, and an object store that could not be reached."""
    if isinstance(exc, sa_exc.DBAPIError):
        return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)) or bool(exc.connection_invalidated)
    return isinstance(exc, (sa_exc.TimeoutError, *StoreUnavailable))


def retrying(fn: Callable[[], T], what: str, budget_s: float, logger: logging.Logger = log,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, called again after 0.5, 1, 2, 4 … (at most 10) seconds while it fails with
    an outage, until ``budget_s`` seconds have passed; then the last error is raised. Any
    other error is raised at once."""
    deadline = time.monotonic() + budget_s
    delay = FIRST_DELAY_S
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_outage(e):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                logger.error("%s: backend still unavailable after %.0fs, giving up (%s)", what, budget_s,
                             _brief(e))
                raise
            wait = min(delay, left)
            logger.warning("%s: backend unavailable (%s); retrying in %.1fs", what, _brief(e), wait)
            sleep(wait)
            delay = min(delay * 2, MAX_DELAY_S)


def _brief(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
