"""One `engine.generate` call, run in its own thread and consumed from the event loop (`EngineThread`).

The thread owns the engine's generator from first `next()` to `close()` (a generator must
not be closed from another thread while it runs), so the KV caches are always freed by the
thread that used them. Steps travel to the loop through an asyncio.Queue. Cancelling
(client gone, timeout, shutdown) sets the engine's cancel Event, so it stops at the next
segment, and wakes the consumer at once, so a slow segment never delays the response.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from coolfusion.core.errors import Cancelled, FusionError
from coolfusion.core.types import Step
from coolfusion.engine.client import Checked, EngineClient

from coolfusion.server.errors import InternalError
from coolfusion.server.metrics import Metrics

log = logging.getLogger("coolfusion.server")


class GenerationTimeout(Exception):
    """The request's deadline passed; the generation has been cancelled."""


@dataclass(frozen=True)
class _End:
    pass


@dataclass(frozen=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True)
class _Stopped:
    reason: str


class EngineThread:
    def __init__(self, engine: EngineClient, request: Checked, metrics: Metrics, *, name: str = "generation"):
        self._engine = engine
        self._request = request
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._on_exit: list[Callable[[], None]] = []
        self.cancel_event = threading.Event()
        self.cancel_reason: str | None = None
        self.done = False  # the consumer has received the last step (or the end)
        self.exited = False  # the engine thread has finished (generator closed)
        self._exited_event = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=f"coolfusion-{name}", daemon=True)

    # ---- event-loop side ------------------------------------------------------------------

    def start(self) -> "EngineThread":
        self._metrics.active_generations.inc()
        self._thread.start()
        return self

    def cancel(self, reason: str) -> None:
        """Stop the engine at its next segment and end `steps()` now (loop thread only)."""
        if self.done or self.exited or self.cancel_event.is_set():
            return
        self.cancel_reason = reason
        self.cancel_event.set()
        self._metrics.cancelled.labels(reason).inc()
        self._queue.put_nowait(_Stopped(reason))

    def when_exited(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop once the engine thread has exited (at once if it has)."""
        if self.exited:
            callback()
        else:
            self._on_exit.append(callback)

    async def wait_exited(self) -> None:
        await self._exited_event.wait()

    async def steps(self, deadline: float) -> AsyncIterator[Step]:
        """Yield the engine's steps until the last one; raise on error, timeout or cancel.

        Abandoning the iteration (the client went away) cancels the generation.
        """
        try:
            while True:
                timeout = deadline - self._loop.time()
                try:
                    if timeout <= 0:
                        raise asyncio.TimeoutError
                    item = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    self.cancel("timeout")
                    raise GenerationTimeout() from None
                if isinstance(item, Step):
                    if item.finish_reason is not None:
                        self.done = True
                    yield item
                    if self.done:
                        return
                elif isinstance(item, _End):
                    self.done = True
                    return
                elif isinstance(item, _Stopped):
                    raise Cancelled(f"generation cancelled ({item.reason})", code=item.reason)
                else:
                    raise item.error
        finally:
            self.cancel("disconnect")  # no-op unless the consumer left before the end

    def _exited(self) -> None:
        self.exited = True
        self._exited_event.set()
        self._metrics.active_generations.dec()
        for cb in self._on_exit:
            try:
                cb()
            except Exception:  # pragma: no cover - a callback bug must not kill the loop
                log.exception("generation exit callback failed")
        self._on_exit.clear()

    # ---- worker-thread side ---------------------------------------------------------------

    def _post(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        model = self._request.request.model
        outcome = "finished"
        gen = None
        completion_tokens = 0
        try:
            gen = self._engine.generate(self._request, cancel=self.cancel_event)
            t0 = time.perf_counter()
            for step in gen:
                now = time.perf_counter()
                self._metrics.on_step(model, step, now - t0)
                completion_tokens = step.completion_tokens
                self._post(step)
                if step.finish_reason is not None or self.cancel_event.is_set():
                    break
                t0 = time.perf_counter()
            if self.cancel_event.is_set():
                outcome = "cancelled"
            self._post(_End())
        except Cancelled as err:
            outcome = "cancelled"
            # Asked for: the consumer already got _Stopped. Unasked: report it as an error.
            self._post(_End() if self.cancel_event.is_set() else _Failed(err))
        except FusionError as err:
            outcome = "error"
            self._post(_Failed(err))
        except BaseException as err:  # an engine bug: log it here, send the client a plain 500
            outcome = "error"
            log.error("engine.generate raised %s: %s", type(err).__name__, err, exc_info=err)
            self._post(_Failed(InternalError("internal error while generating; see the server log")))
        finally:
            if gen is not None:
                try:
                    gen.close()  # frees the request's KV caches
                except Exception:
                    log.exception("closing the engine generator failed")
            self._metrics.completion_tokens.labels(model).inc(completion_tokens)
            self._metrics.generations.labels(model, outcome).inc()
            try:
                self._loop.call_soon_threadsafe(self._exited)
            except RuntimeError:
                pass
