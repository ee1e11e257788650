"""The app factory: `create_app(engine, settings)` wires state, routes, errors and middleware.

No module globals: everything a request needs lives in the AppState at `app.state.fusion`
(see `app_state`). The engine may be None: the app then answers /health and model routes
with 503 until a loader thread calls `app_state(app).set_engine(engine)` (or `set_failed`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, AsyncIterator

from fastapi import FastAPI

from fusion.config import ServerConfig

from .errors import install_handlers
from .middleware import ApiKeyAuth, BodyLimit, RequestContext
from .routes import router
from .state import AppState


def create_app(engine: Any | None = None, settings: ServerConfig | None = None, *, shutdown_grace_s: float = 10.0) -> FastAPI:
    """An OpenAI-compatible app around `engine` (None: still loading).

    `settings` is the config's `server:` section (host and port are used by the runner, not
    here). `shutdown_grace_s`: on shutdown, how long running generations may continue
    before they are cancelled and their streams end with an in-band error.
    """
    settings = settings or ServerConfig()
    state = AppState(settings, engine, shutdown_grace_s=shutdown_grace_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.reopen()  # an app may be served again after a shutdown (tests do)
        yield
        # Connections are closed (or were cut) by now: make sure no engine thread keeps working.
        state.shutting_down = True
        state.admission.close()
        state.cancel_all("shutdown")

    app = FastAPI(
        title="Cool-Fusion server",
        version=_version(),
        description="OpenAI-compatible completions and chat over a training-free fusion of several LLMs.",
        lifespan=lifespan,
    )
    app.state.fusion = state
    install_handlers(app)
    app.include_router(router)
    # add_middleware wraps: the last one added runs first.
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    app.add_middleware(RequestContext, metrics=state.metrics)
    return app


def app_state(app: FastAPI) -> AppState:
    return app.state.fusion


def _version() -> str:
    try:
        return version("coolfusion")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"
