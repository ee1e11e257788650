"""Pure-ASGI middleware, outermost first: CORS, request context, API key, body size limit.

- Cors (only when server.cors_allowed_origins is set): Starlette's CORSMiddleware, outermost
  so that a preflight is answered before the API key is asked for (a browser sends none with
  it) and every answer below it, 401, 413, 429 and 500 included, carries the CORS headers a
  browser needs to let the page read it. A refused preflight is a 400 in OpenAI's shape.
- RequestContext: a request id (the client's `X-Request-Id` when sane, else a fresh one,
  echoed back), one structured log line per request when it ends (streams: after the last
  byte), the requests counter and duration histogram, and a last-resort OpenAI-shaped 500
  for any exception that escapes (never a bare traceback page).
- ApiKeyAuth: `Authorization: Bearer <key>` on every path except /health, compared in
  constant time with hmac.compare_digest; the key is never logged.
- BodyLimit: reads the whole body up front (at most max_body_bytes) and answers 413 beyond
  it, whether or not Content-Length was sent; the app then sees the buffered body.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coolfusion.config import ServerConfig
from coolfusion.server.errors import BodyTooLarge, CorsRefused, InternalError, Unauthorized, error_response
from coolfusion.server.metrics import Metrics

access_log = logging.getLogger("coolfusion.access")
log = logging.getLogger("coolfusion.server")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
OPEN_PATHS = frozenset({"/health"})


class Cors(CORSMiddleware):
    # Response headers a page may read besides the safelisted ones: the request id (clients
    # report it; the openai package exposes it) and how long to wait after a 429 or 503.
    EXPOSED = ("X-Request-Id", "Retry-After")
    # What each kind of refusal Starlette names ("Disallowed CORS origin, method") is set by.
    SETTING = {"origin": "cors_allowed_origins", "method": "cors_allowed_methods", "headers": "cors_allowed_headers"}

    def __init__(self, app: ASGIApp, settings: ServerConfig):
        super().__init__(app, allow_origins=settings.cors_allowed_origins, allow_methods=settings.cors_allowed_methods,
                         allow_headers=settings.cors_allowed_headers, allow_credentials=settings.cors_allow_credentials,
                         expose_headers=self.EXPOSED)

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        refused = bytes(answer.body).decode().removeprefix("Disallowed CORS ").split(", ")
        what = ", ".join(f"{r} (server.{self.SETTING[r]})" if r in self.SETTING else r for r in refused)
        err = CorsRefused(f"CORS preflight from {request_headers['origin']!r} refused; not allowed: {what}")
        log.warning("%s", err.message)  # the browser tells only its console; the operator reads it here
        response = error_response(err)
        response.headers["Vary"] = answer.headers["Vary"]
        return response


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _header(scope, b"x-request-id")
        rid = rid if rid and _SANE_ID.match(rid) else uuid.uuid4().hex
        fields: dict[str, Any] = {}
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["log"] = fields
        status = {"code": 0, "started": False}
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as err:  # a bug somewhere below: answer 500 in OpenAI's shape
            log.error("unhandled %s on %s %s [%s]", type(err).__name__, scope["method"], scope["path"], rid, exc_info=err)
            fields["error"] = type(err).__name__
            if not status["started"]:
                await error_response(InternalError("internal server error; see the server log"))(scope, receive, send_wrapper)
            else:
                status["code"] = status["code"] or 500
        finally:
            seconds = time.perf_counter() - t0
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            code = status["code"] or 499  # no response at all: the client went away first
            self.metrics.requests.labels(label, scope["method"], str(code)).inc()
            self.metrics.request_seconds.labels(label).observe(seconds)
            access_log.info(
                "request",
                extra={"fields": {
                    "request_id": rid, "method": scope["method"], "path": scope["path"], "status": code,
                    "duration_ms": round(seconds * 1000, 1), **fields,
                }},
            )


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.expected is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            err = Unauthorized("Incorrect or missing API key: send 'Authorization: Bearer <key>'.")
            await error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        assert self.expected is not None
        return hmac.compare_digest(given, self.expected)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left while sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = BodyTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes")
        response = error_response(err)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None
