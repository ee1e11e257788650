"""Every error the server sends, in OpenAI's shape: the one place errors become HTTP.

The body is always `{"error": {"message", "type", "param", "code"}}`. Engine errors
(coolfusion.core.errors.FusionError) carry their own status/type/code; the few errors only the HTTP
layer can raise (401, 413, a refused CORS preflight, queue timeout, shutdown) are FusionError
subclasses defined here, so one function, `error_body`, renders them all, and `install_handlers`
wires FastAPI's own exceptions (validation 422 -> 400, unknown route 404, 405) into the same shape.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from coolfusion.core.errors import Cancelled, FusionError, InvalidRequest, NotReady


UNSUPPORTED_PARAMETER = "unsupported_parameter"  # pydantic error type of a refused field (coolfusion.server.schemas), and its code


class Unauthorized(FusionError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class BodyTooLarge(FusionError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class CorsRefused(FusionError):
    """A CORS preflight from an origin, or for a method or header, that the config does not allow."""

    status = 400
    type = "invalid_request_error"
    code = "cors_not_allowed"


class QueueTimeout(NotReady):
    """The request timed out while waiting for a free generation slot."""

    code = "queue_timeout"


class ShuttingDown(NotReady):
    code = "server_shutting_down"


class InternalError(FusionError):
    """An unexpected exception; the message never leaks internals."""

    status = 500
    type = "server_error"
    code = "internal_error"


def error_body(exc: FusionError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def _headers(exc: FusionError) -> dict[str, str]:
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is None and exc.status in (429, 503):
        retry_after = 1
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_response(exc: FusionError) -> JSONResponse:
    """The HTTP response for an error raised before any response bytes were sent."""
    status = exc.status
    if isinstance(exc, Cancelled):  # engine cancelled without the client asking: treat as unavailable
        status = 503
    return JSONResponse(error_body(exc), status_code=status, headers=_headers(exc))


def in_band(exc: FusionError) -> str:
    """The SSE `data:` payload for an error after a stream has begun."""
    return dumps(error_body(exc))


def dumps(obj: Any) -> str:
    """Compact JSON that is always valid: non-finite floats -> null, lone surrogates replaced."""
    text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8", "replace").decode("utf-8")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def from_validation(exc: RequestValidationError) -> FusionError:
    """pydantic's 422 as OpenAI's 400: param is the dotted field path of the first error."""
    errors = list(exc.errors())
    if not errors:
        return _invalid("invalid request body", None)
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return _invalid(f"request body is not valid JSON: {ctx.get('error', 'decode error')}", None)
    if not loc:
        if first.get("type") == "missing":
            return _invalid("request body is required (a JSON object)", None)
        return _invalid("request body must be a JSON object (Content-Type: application/json)", None)
    if loc[0] == "fusion":  # an error inside the fusion object names its key, as the engine's checks do
        loc = loc[:2]
    param = ".".join(str(p) for p in loc)
    msgs = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msgs.append(f"{where}: {_clean(e.get('msg', 'invalid value'))}")
    code = UNSUPPORTED_PARAMETER if first.get("type") == UNSUPPORTED_PARAMETER else None
    return InvalidRequest("; ".join(msgs), param=param, code=code)


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _invalid(message: str, param: str | None) -> FusionError:
    return InvalidRequest(message, param=param)


def from_http_exception(exc: StarletteHTTPException) -> FusionError:
    err = FusionError(str(exc.detail))
    err.status = exc.status_code
    err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    err.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return err


def install_handlers(app: FastAPI) -> None:
    """Route every exception FastAPI catches through `error_response`."""

    async def on_fusion(_: Request, exc: FusionError) -> JSONResponse:
        return error_response(exc)

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation(exc))

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        resp = error_response(from_http_exception(exc))
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    app.add_exception_handler(FusionError, on_fusion)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
