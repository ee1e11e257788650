"""Admission control (coolfusion.server.admission) on its own: slots, the FIFO queue, 429 beyond it,
queue timeouts, hand-over of a released slot, shutdown (fast tier)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")  # the server package; absent only on the bare GPU image of device_check.sh

from coolfusion.core.errors import Overloaded  # noqa: E402
from coolfusion.server.admission import Admission  # noqa: E402
from coolfusion.server.errors import QueueTimeout, ShuttingDown  # noqa: E402


def run(coro):
    return asyncio.run(coro)


def test_slots_then_queue_then_429_with_a_retry_after():
    async def main():
        adm = Admission(max_concurrent=2, max_queue=1)
        a, b = adm.reserve(), adm.reserve()
        assert a.granted and b.granted and adm.running == 2
        c = adm.reserve()
        assert not c.granted and adm.waiting == 1
        with pytest.raises(Overloaded) as err:
            adm.reserve()
        assert err.value.status == 429 and 1 <= err.value.retry_after <= 60
    run(main())


def test_a_released_slot_goes_to_the_first_waiter_in_order():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=2)
        first = adm.reserve()
        q1, q2 = adm.reserve(), adm.reserve()
        loop = asyncio.get_running_loop()
        order = []

        async def wait(t, name):
            await t.acquire(loop.time() + 5)
            order.append(name)

        tasks = [asyncio.create_task(wait(q2, "q2")), asyncio.create_task(wait(q1, "q1"))]
        await asyncio.sleep(0)
        first.release()
        await asyncio.sleep(0.01)
        assert order == ["q1"] and adm.running == 1  # the slot passed on, not freed
        q1.release()
        await asyncio.gather(*tasks)
        assert order == ["q1", "q2"]
        q2.release()
        assert adm.running == 0 and adm.waiting == 0
        q2.release()  # idempotent
        assert adm.running == 0
    run(main())


def test_a_queued_request_times_out_and_leaves_the_queue():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=1)
        adm.reserve()
        queued = adm.reserve()
        with pytest.raises(QueueTimeout):
            await queued.acquire(asyncio.get_running_loop().time() + 0.02)
        assert adm.waiting == 0
        adm.reserve()  # its place is free again
    run(main())


def test_close_fails_the_queue_and_refuses_new_requests():
    async def main():
        adm = Admission(max_concurrent=1, max_queue=1)
        adm.reserve()
        queued = adm.reserve()
        adm.close()
        with pytest.raises(ShuttingDown):
            await queued.acquire(asyncio.get_running_loop().time() + 1)
        with pytest.raises(ShuttingDown):
            adm.reserve()
    run(main())
