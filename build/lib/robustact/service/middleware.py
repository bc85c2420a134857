"""ASGI middleware around the API, outermost first:

``Authenticate``   every ``/v1`` request must carry an active API key (401 otherwise), checked
                   before a byte of the body is read;
``Admit``          classify requests beyond ``K`` running + a short queue get a 503 with
                   ``Retry-After`` at once, before their upload is read;
``LimitBody``      a request body larger than its limit (the upload limit for classify, a
                   smaller one for JSON bodies) gets a 413, whether it declares a
                   Content-Length or arrives chunked: the bytes are counted as they stream in.

They are plain ASGI callables (not ``BaseHTTPMiddleware``) so that the body streams through
them untouched.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from robustact.service.auth import CALLER_SCOPE_KEY, Caller, lookup

CLASSIFY_PATH = re.compile(r"^/v1/models/[^/]+/classify/?$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _reply(scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                 headers: dict[str, str] | None = None) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


def _wants_key(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class Authenticate:
    """Resolve ``Authorization: Bearer KEY`` to a :class:`Caller` in the request scope."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _wants_key(scope["path"]):
            return await self.app(scope, receive, send)
        header = _header(scope, b"authorization") or ""
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return await _reply(scope, receive, send, 401, "missing API key: send the header "
                                "'Authorization: Bearer KEY' (see `robustact keys create`)",
                                {"WWW-Authenticate": "Bearer"})
        sessions = scope["app"].state.sessions
        try:
            caller = await anyio.to_thread.run_sync(self._resolve, sessions, key)
        except Exception as e:  # the database is down: nobody can be authenticated
            return await _reply(scope, receive, send, 503, f"cannot check the API key: the database is "
                                f"unreachable ({type(e).__name__})", {"Retry-After": "5"})
        if caller is None:
            return await _reply(scope, receive, send, 401, "invalid or revoked API key",
                                {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        scope[CALLER_SCOPE_KEY] = caller
        await self.app(scope, receive, send)

    @staticmethod
    def _resolve(sessions, key: str) -> Caller | None:
        with sessions() as session:
            row = lookup(session, key)
            return Caller.of(row) if row is not None else None


class Admission:
    """At most ``slots`` classify computations at once and ``queue`` more requests waiting;
    ``try_enter`` says at once whether a request may come in."""

    def __init__(self, slots: int, queue: int):
        self.slots, self.capacity = slots, slots + max(0, queue)
        self.compute = threading.BoundedSemaphore(slots)  # held while decoding and running the model
        self._inflight = 0
        self._lock = threading.Lock()
        self.rejected = 0

    def try_enter(self) -> bool:
        with self._lock:
            if self._inflight >= self.capacity:
                self.rejected += 1
                return False
            self._inflight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._inflight -= 1

    @property
    def inflight(self) -> int:
        return self._inflight


class Admit:
    def __init__(self, app: ASGIApp, admission: Admission, retry_after_s: int):
        self.app, self.admission, self.retry_after = app, admission, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not CLASSIFY_PATH.match(scope["path"]):
            return await self.app(scope, receive, send)
        if not self.admission.try_enter():
            return await _reply(scope, receive, send, 503,
                                f"the service is classifying {self.admission.capacity} clips already (its "
                                f"limit); retry in {self.retry_after} s", {"Retry-After": str(self.retry_after)})
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


class LimitBody:
    """413 for a body over its limit (``upload_bytes`` for classify, ``body_bytes`` for any
    other route): at once from Content-Length, or as soon as the streamed (e.g. chunked)
    body passes the limit. In the second case the rest of the body is read and dropped for
    a bounded time and size first, so that the client, still sending, gets to read the 413
    instead of a reset connection."""

    DRAIN_SECONDS = 10.0

    def __init__(self, app: ASGIApp, upload_bytes: int, body_bytes: int):
        self.app, self.upload_bytes, self.body_bytes = app, upload_bytes, body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = CLASSIFY_PATH.match(scope["path"]) is not None
        limit = self.upload_bytes if upload else self.body_bytes
        limit_text = f"{_mib(limit)} {'upload' if upload else 'request body'}"
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return await _reply(scope, receive, send, 413, f"request body of {int(length)} bytes is larger than "
                                                           f"the {limit_text} limit")
        state: dict[str, Any] = {"received": 0, "rejected": False, "started": False}

        async def counted_receive() -> Message:
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request":
                return message
            state["received"] += len(message.get("body", b""))
            if state["received"] <= limit:
                return message
            state["rejected"] = True
            more = message.get("more_body", False)
            drained, deadline = 0, time.monotonic() + self.DRAIN_SECONDS
            while more and drained <= limit and time.monotonic() < deadline:
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                    message = await receive()
                if message["type"] != "http.request":
                    break
                drained += len(message.get("body", b""))
                more = message.get("more_body", False)
            if not state["started"]:
                state["started"] = True
                await JSONResponse({"detail": f"request body is larger than the {limit_text} limit (stopped "
                                              f"reading after {state['received']} bytes)"},
                                   status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return {"type": "http.disconnect"}

        async def guarded_send(message: Message) -> None:
            if state["rejected"]:
                return  # our 413 went out; whatever the app answers to the disconnect is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["rejected"]:
                raise
