"""The app factory: `create_app(engine, settings)` wires state, routes, errors and middleware.

No module globals: everything a request needs lives in the AppState at `app.state.fusion`
(see `app_state`). The engine may be None: the app then answers /health and model routes
with 503 until a loader thread calls `app_state(app).set_engine(engine)` (or `set_failed`).
The app also serves the built-in chat page (`/` and `/static/*`, from coolfusion/server/static/): open
without the API key, which the page asks for and sends as Bearer on its API calls.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from coolfusion.config import ServerConfig
from coolfusion.engine.client import EngineClient

from coolfusion.server.errors import install_handlers
from coolfusion.server.middleware import ApiKeyAuth, BodyLimit, Cors, RequestContext
from coolfusion.server.routes import router
from coolfusion.server.state import AppState


def create_app(engine: EngineClient | None = None, settings: ServerConfig | None = None) -> FastAPI:
    """An OpenAI-compatible app around `engine` (None: still loading).

    `settings` is the config's `server:` section (host and port are used by the runner, not
    here; its `shutdown_grace_s` is how long running generations may continue on shutdown
    before they are cancelled and their streams end with an in-band error).
    """
    settings = settings or ServerConfig()
    state = AppState(settings, engine)

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
    _serve_chat_page(app)
    # add_middleware wraps: the last one added runs first.
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(_ApiKeyAuthExceptPage, api_key=settings.api_key)
    app.add_middleware(RequestContext, metrics=state.metrics)
    if settings.cors_allowed_origins:  # outermost: see coolfusion/server/middleware.py
        app.add_middleware(Cors, settings=settings)
    return app


STATIC_DIR = Path(__file__).with_name("static")


def _serve_chat_page(app: FastAPI) -> None:
    """The built-in chat page: `/` is index.html, `/static/*` its script and style."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")


class _ApiKeyAuthExceptPage(ApiKeyAuth):
    """The key guards the API, not the page: the page asks for the key and sends it as Bearer."""

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/" or path.startswith("/static/")):
            await self.app(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def app_state(app: FastAPI) -> AppState:
    return app.state.fusion


def _version() -> str:
    try:
        return version("coolfusion")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"
