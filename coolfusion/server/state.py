"""The per-app state every route reaches through dependency injection (no module globals).

It owns the engine slot (None while loading; `set_engine` / `set_failed` from a loader
thread), the settings, admission control, metrics, the set of running generations, and
graceful shutdown: `drain()` refuses new work, lets running generations finish for a grace
period, then cancels the rest so every stream ends with an in-band error and [DONE].
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import Request

from coolfusion.config import ServerConfig
from coolfusion.core.errors import NotReady
from coolfusion.engine.client import Checked, EngineClient

from coolfusion.server.admission import Admission
from coolfusion.server.errors import ShuttingDown
from coolfusion.server.engine_thread import EngineThread
from coolfusion.server.metrics import Metrics
from coolfusion.server.response_bodies import health_body

log = logging.getLogger("coolfusion.server")


class AppState:
    def __init__(self, settings: ServerConfig, engine: EngineClient | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.admission = Admission(settings.max_concurrent, settings.max_queue, self.metrics.on_admission)
        self.created = int(time.time())
        self.engine: EngineClient | None = None
        self.load_error: str | None = None
        self.shutting_down = False
        self._generations: set[EngineThread] = set()
        if engine is not None:
            self.set_engine(engine)

    # ---- engine slot (may be called from any thread) ----------------------------------------

    def set_engine(self, engine: EngineClient) -> None:
        if not isinstance(engine, EngineClient):
            raise TypeError(f"{engine!r} does not implement coolfusion.engine.client.EngineClient")
        self.engine = engine
        self.load_error = None
        self.metrics.engine_ready.set(1)

    def set_failed(self, error: BaseException | str) -> None:
        self.load_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.metrics.engine_ready.set(0)

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): the body is a `response_bodies.Health`."""
        if self.shutting_down:
            return 503, health_body("shutting_down")
        if self.load_error is not None:
            return 503, health_body("error", self.load_error)
        if self.engine is None:
            return 503, health_body("loading")
        if self.engine.unavailable is not None:
            return 503, health_body("error", self.engine.unavailable)
        return 200, health_body("ok")

    def require_engine(self) -> EngineClient:
        """The engine, or NotReady (503) while loading, broken or shutting down."""
        status, body = self.health()
        if status == 200:
            return self.engine
        if body["status"] == "shutting_down":
            raise ShuttingDown("the server is shutting down")
        if body["status"] == "loading":
            err = NotReady("the engine is still loading; retry shortly")
            err.retry_after = 5  # type: ignore[attr-defined]
            raise err
        raise NotReady(f"the engine is not available ({body.get('error')})")

    # ---- generations (event-loop thread) ----------------------------------------------------

    def start_generation(self, request: Checked, name: str) -> EngineThread:
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down")
        gen = EngineThread(self.require_engine(), request, self.metrics, name=name)
        self._generations.add(gen)
        gen.when_exited(lambda: self._generations.discard(gen))
        return gen.start()

    @property
    def running_generations(self) -> int:
        return len(self._generations)

    def cancel_all(self, reason: str) -> None:
        for gen in list(self._generations):
            gen.cancel(reason)

    def reopen(self) -> None:
        """Accept requests again (a fresh server run of the same app)."""
        self.shutting_down = False
        self.admission = Admission(self.settings.max_concurrent, self.settings.max_queue, self.metrics.on_admission)

    def begin_drain(self) -> None:
        """Start `drain()` in the background unless shutdown has already begun."""
        if not self.shutting_down:
            self.shutting_down = True
            self._drain_task = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """Graceful shutdown: refuse new requests, wait up to the grace period
        (`server.shutdown_grace_s`), cancel the rest."""
        self.shutting_down = True
        self.admission.close()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self._generations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._generations:
            log.info("shutdown: cancelling %d running generation(s)", len(self._generations))
            self.cancel_all("shutdown")


def get_state(request: Request) -> AppState:
    """FastAPI dependency: this app's state."""
    return request.app.state.fusion
