"""Typed errors raised by the engine.

Each carries what an OpenAI-style error needs (message, param, code) and the HTTP status the
server should use. The engine never imports HTTP code; `coolfusion/server/` translates these in one place.
"""

from __future__ import annotations


class FusionError(Exception):
    """Base class: a request or the engine cannot proceed."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(FusionError):
    """The request itself is wrong (bad value, empty prompt, invalid text)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus max_tokens does not fit a source model's context limit."""

    code = "context_length_exceeded"


class UnknownModel(FusionError):
    """The requested model id is neither a fused variant nor a configured source model."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Overloaded(FusionError):
    """Admission control refused the request; the client may retry later."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class NotReady(FusionError):
    """The engine is loading or a worker is broken."""

    status = 503
    type = "service_unavailable"
    code = "engine_not_ready"


class Cancelled(FusionError):
    """The generation was cancelled (client disconnect, timeout, shutdown)."""

    status = 499
    type = "cancelled"
    code = "cancelled"


class ConfigError(ValueError):
    """config.yaml is invalid; the message names the offending key."""
