"""Admission control: at most `max_concurrent` generations run, at most `max_queue` wait.

`reserve()` decides at once (so an overload is a proper 429 with Retry-After before any
response starts) and returns a Ticket: already holding a slot, or holding a place in the
FIFO queue. `await ticket.acquire(deadline)` waits for the slot; `ticket.release()` hands it
to the next waiter. One request holds one ticket for all its choices, and releases it only
once its last engine thread has exited, so a slot is free only when its caches are.
Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Callable

from coolfusion.core.errors import Overloaded

from coolfusion.server.errors import QueueTimeout, ShuttingDown


class Ticket:
    def __init__(self, admission: "Admission", granted: bool):
        self._admission = admission
        self._future: asyncio.Future[None] | None = None
        self.granted = granted
        self.released = False
        if not granted:
            self._future = asyncio.get_running_loop().create_future()

    async def acquire(self, deadline: float) -> None:
        """Wait (until the loop time `deadline`) for a slot; raise QueueTimeout/ShuttingDown."""
        if self.granted:
            return
        fut = self._future
        assert fut is not None
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            if not self._admission._abandon(self):
                return  # the slot arrived just as the deadline passed: keep it
            raise QueueTimeout(
                "timed out waiting for a free generation slot", code="queue_timeout"
            ) from None
        except BaseException:
            if not self._admission._abandon(self):
                self.release()  # granted while we were being cancelled: pass it on
            raise
        self.granted = True

    def _grant(self) -> None:
        self.granted = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def release(self) -> None:
        """Give the slot back (idempotent); a ticket still queued just leaves the queue."""
        if self.released:
            return
        if not self.granted and self._admission._abandon(self):
            return
        self.released = True
        self._admission._release_slot()


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, on_change: Callable[[int, int], None] | None = None):
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.running = 0
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._on_change = on_change or (lambda running, waiting: None)
        self._closed = False
        self._ewma_s = 1.0  # smoothed duration of one request's slot tenure, for Retry-After

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def reserve(self) -> Ticket:
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self.running < self.max_concurrent and not self._waiting:
            self.running += 1
            ticket = Ticket(self, granted=True)
        elif len(self._waiting) < self.max_queue:
            ticket = Ticket(self, granted=False)
            self._waiting.append(ticket)
        else:
            err = Overloaded(
                f"server overloaded: {self.running} generations running and {len(self._waiting)} queued; retry later"
            )
            err.retry_after = self.retry_after_s()  # type: ignore[attr-defined]
            raise err
        self._changed()
        return ticket

    def retry_after_s(self) -> int:
        """A hint for clients: roughly how long until a queue place frees up."""
        per_slot = self._ewma_s * (1 + len(self._waiting)) / self.max_concurrent
        return int(min(60, max(1, math.ceil(per_slot))))

    def record_duration(self, seconds: float) -> None:
        self._ewma_s = 0.8 * self._ewma_s + 0.2 * max(0.0, seconds)

    def close(self) -> None:
        """Refuse new requests and fail every queued one (graceful shutdown)."""
        self._closed = True
        while self._waiting:
            t = self._waiting.popleft()
            if t._future is not None and not t._future.done():
                t._future.set_exception(ShuttingDown("the server is shutting down"))
        self._changed()

    def _release_slot(self) -> None:
        while self._waiting:
            nxt = self._waiting.popleft()
            if nxt._future is not None and not nxt._future.done():
                nxt._grant()  # the slot passes on; running stays the same
                self._changed()
                return
        self.running -= 1
        self._changed()

    def _abandon(self, ticket: Ticket) -> bool:
        """Drop a queued ticket; False if it had already been granted a slot."""
        if ticket.granted:
            return False
        try:
            self._waiting.remove(ticket)
        except ValueError:
            pass
        if ticket._future is not None and not ticket._future.done():
            ticket._future.cancel()
        ticket.released = True
        self._changed()
        return True

    def _changed(self) -> None:
        self._on_change(self.running, len(self._waiting))
