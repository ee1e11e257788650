"""The scheduler thread batches the queued forwards of many requests, each getting its own logits."""

from __future__ import annotations

import threading

import pytest
import torch

from coolfusion.runtime.batched_forward import Item
from coolfusion.runtime.batch_scheduler import BatchScheduler
from coolfusion.runtime.slots import SlotStorage
from tiny_models import TOL_TINY, full_logits, rand_ids, tiny_gemma3


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


def test_everything_queued_runs_as_one_forward(model):
    r = BatchScheduler(model, SlotStorage.for_model(model, slots=4, max_len=32), start=False)
    slots = [r.open() for _ in range(4)]
    seqs = [rand_ids(n, n) for n in (3, 8, 1, 12)]
    futs = [r.submit(Item(s, ids)) for s, ids in zip(slots, seqs)]
    r.start()
    outs = [f.result(timeout=60) for f in futs]
    assert r.forwards == 1 and r.batch_sizes == [4]
    for ids, out in zip(seqs, outs):
        assert (out[0] - full_logits(model, ids)[-1]).abs().max() < TOL_TINY
    r.stop()


def test_request_threads_get_what_they_get_alone(model):
    r = BatchScheduler(model, SlotStorage.for_model(model, slots=4, max_len=40))
    errors, barrier = [], threading.Barrier(4)

    def request(seed):
        try:
            slot = r.open()
            ids = rand_ids(4 + 3 * seed, seed)
            barrier.wait()
            out = r.forward(Item(slot, ids))
            for _ in range(6):
                ref = full_logits(model, ids)[-1]
                assert (out[0] - ref).abs().max() < TOL_TINY
                ids = ids + [int(out[0].argmax())]
                out = r.forward(Item(slot, ids[-1:]))
            r.close(slot)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert r.storage.free_slots == 4  # every request's KV room is back
    assert r.forwards <= 4 * 7
    r.stop()


def test_an_item_at_fault_fails_alone(model):
    r = BatchScheduler(model, SlotStorage.for_model(model, slots=3, max_len=32), start=False)
    a, b, c = r.open(), r.open(), r.open()
    fa, fb, fc = r.submit(Item(a, [1, 2, 3])), r.submit(Item(b, [10_000])), r.submit(Item(c, [4, 5]))
    r.start()
    with pytest.raises(Exception):
        fb.result(timeout=60)
    assert (fa.result(timeout=60)[0] - full_logits(model, [1, 2, 3])[-1]).abs().max() < TOL_TINY
    assert (fc.result(timeout=60)[0] - full_logits(model, [4, 5])[-1]).abs().max() < TOL_TINY
    assert r.length(b) == 0
    r.stop()


def test_closing_fails_a_queued_item_and_frees_the_slot(model):
    r = BatchScheduler(model, SlotStorage.for_model(model, slots=2, max_len=16), start=False)
    a = r.open()
    fut = r.submit(Item(a, [1, 2]))
    r.close(a)
    with pytest.raises(RuntimeError, match="closed"):
        fut.result(timeout=1)
    assert r.storage.free_slots == 2
    r.start()
    r.stop()


def test_a_token_budget_splits_the_queue_and_one_slot_waits_for_its_next_forward(model):
    r = BatchScheduler(model, SlotStorage.for_model(model, slots=3, max_len=32), max_batch_tokens=10, start=False)
    a, b, c = r.open(), r.open(), r.open()
    futs = [r.submit(Item(a, rand_ids(8, 1))), r.submit(Item(b, rand_ids(8, 2))), r.submit(Item(c, [7])),
            r.submit(Item(c, [8]))]  # c's second token must wait for its first
    r.start()
    outs = [f.result(timeout=60) for f in futs]
    assert r.batch_sizes == [2, 2]  # (a, c) then (b, c again)
    assert (outs[3][0] - full_logits(model, [7, 8])[-1]).abs().max() < TOL_TINY
    assert torch.equal(outs[2].argmax(-1), full_logits(model, [7])[-1:].argmax(-1))
    r.stop()


def test_with_padded_decodes_a_request_gets_the_same_bits_at_any_load(model):
    """pad_decode_to: prefills run alone, decode forwards always have the same row count, so
    the greedy run of one request is bitwise the same alone and beside three others."""

    def run(n_requests):
        r = BatchScheduler(model, SlotStorage.for_model(model, slots=4, max_len=40), pad_decode_to=4)
        results = {}

        def request(seed):
            slot = r.open()
            ids = rand_ids(5 + 4 * seed, seed)
            rows = [r.forward(Item(slot, ids))]
            for _ in range(5):
                rows.append(r.forward(Item(slot, [int(rows[-1][0].argmax())])))
            r.close(slot)
            results[seed] = torch.cat(rows)  # (6, V)

        threads = [threading.Thread(target=request, args=(i,)) for i in range(n_requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        r.stop()
        return results, r

    alone, _ = run(1)
    loaded, r = run(4)
    assert max(r.batch_sizes) > 1  # the four requests did share forwards
    assert torch.equal(loaded[0], alone[0])
