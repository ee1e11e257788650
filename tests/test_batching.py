"""`fusion.batching: true` on the real pair: the forwards of concurrent requests batched per
model over KV slots (coolfusion/runtime/batched_runner.py) give every request the text it gets alone.

The pinned greedy outputs (tests/data/pinned_outputs.json, recorded with one forward per
request) are run all at once (two of them twice) through one engine whose runners batch;
every output must equal its pin byte for byte, the runners must really have batched
(forwards with more than one request), and every KV slot must be free afterwards."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pinned_requests import REQUESTS
from test_pinned_outputs import PINNED, _request

from coolfusion.config import FusionConfig
from coolfusion.core.errors import Overloaded
from coolfusion.core.types import GenerationRequest


@pytest.fixture(scope="module")
def batched(engine):
    """An engine over the session's loaded models, batching, 16 slots per model."""
    eng = engine.with_fusion(FusionConfig(batching=True, kv_slots=16, kv_max_tokens=2048))
    yield eng
    eng.close()


def test_concurrent_requests_get_their_pinned_outputs_and_really_batch(engine, batched):
    jobs = [*range(len(REQUESTS)), 0, 6]  # every pinned request, two of them twice
    with ThreadPoolExecutor(len(jobs)) as ex:
        outs = list(ex.map(lambda i: list(batched.generate(_request(REQUESTS[i]))), jobs))
    for i, steps in zip(jobs, outs):
        pinned = PINNED[i]
        assert "".join(s.text for s in steps).encode() == pinned["text"].encode(), REQUESTS[i]
        assert [s.winner for s in steps] == pinned["winners"]
        assert steps[-1].finish_reason == pinned["finish_reason"]
    sizes = [n for w in batched.workers for n in w.runner.batch_sizes]
    assert max(sizes) > 1, "the runners never batched two requests"
    assert all(w.runner.kv_report()["slots_in_use"] == 0 for w in batched.workers)


def test_cancelled_and_closed_requests_free_their_slots(batched):
    cancel = threading.Event()
    gen = batched.generate(GenerationRequest(prompt="Tell me a story:", max_tokens=200), cancel)
    next(gen)
    assert all(w.runner.kv_report()["slots_in_use"] == 1 for w in batched.workers)
    gen.close()
    assert all(w.runner.kv_report()["slots_in_use"] == 0 for w in batched.workers)


def test_no_free_slot_waits_then_refuses_with_429(batched):
    w = batched.workers[0]
    runner = w.runner
    held = [runner.open_cache() for _ in range(runner.storage.slots)]
    runner.wait_s, saved = 0.2, runner.wait_s
    try:
        with pytest.raises(Overloaded) as err:
            runner.open_cache()
        assert err.value.status == 429 and "kv_slots" in err.value.message
        threading.Timer(0.05, runner.close_cache, (held.pop(),)).start()
        runner.wait_s = 5
        held.append(runner.open_cache())  # a slot freed while waiting is taken
    finally:
        runner.wait_s = saved
        for s in held:
            runner.close_cache(s)
    assert runner.kv_report()["slots_in_use"] == 0


def test_a_prefill_longer_than_a_chunk_is_fed_in_chunks_and_gives_the_same_text(engine, batched):
    from coolfusion.runtime.batched_runner import PREFILL_CHUNK

    prompt = "The quick brown fox jumps over the lazy dog. " * 60 + "Then the fox"
    w = batched.workers[0]
    assert len(w.text.encode(prompt, special=True)) > 2 * PREFILL_CHUNK
    before = w.runner.forwards
    req = GenerationRequest(prompt=prompt, model=w.name, max_tokens=12)
    alone = "".join(s.text for s in engine.generate(req))
    assert "".join(s.text for s in batched.generate(req)) == alone
    assert w.runner.forwards - before >= 3 + 12  # at least three prefill chunks, then the decode steps


def test_the_shipped_config_batches_eight_fused_requests(config, engine):
    """config.yaml (the `engine` fixture) batches by default, with room for every generation the
    server admits (two slots each: judge), and 8 concurrent fused requests meet in its runners'
    forwards while each gets the text it gets alone."""
    from coolfusion.bench import concurrency

    assert config.fusion.batching and config.server.max_concurrent >= 8
    assert config.fusion.kv_slots >= 2 * config.server.max_concurrent
    assert all(w.runner.kv_report()["slots"] == config.fusion.kv_slots for w in engine.workers)
    prompts = [f"Fact {i}: the {word}" for i, word in enumerate(["sun", "moon", "sea", "sky", "tree", "city",
                                                                  "river", "book"])]
    alone = concurrency.solo_texts(engine, "cool-fusion", 10, 8, prompts)
    start = [w.runner.forwards for w in engine.workers]
    row = concurrency.level(engine, "cool-fusion", 8, 10, alone, prompts)  # 8 clients at once
    assert row["identical"]
    sizes = [w.runner.batch_sizes[-(w.runner.forwards - n):] for w, n in zip(engine.workers, start)]
    assert all(max(s) >= 4 for s in sizes), [max(s) for s in sizes]  # many requests per forward, on each model
    assert all(w.runner.kv_report()["slots_in_use"] == 0 for w in engine.workers)
