"""Mechanics on tiny random-weight models (fast; CUDA when present, else CPU).

In addition to the real-pair tests: a Llama-shaped and a Gemma-3-shaped model with a tiny
sliding window (so contexts cross it), over the two real tokenizers. Random weights make
the models disagree at almost every step, which exercises scoring and block reuse hard.
"""

from __future__ import annotations

import math

import pytest
import torch

from coolfusion.core import loop
from coolfusion.config import FusionConfig
from coolfusion.engine.engine import Engine
from coolfusion.runtime.loading import LoadedModel
from coolfusion.core.types import GenerationRequest

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny(arch: str, tok, seed: int, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {}
    if arch == "gemma3_text":
        extra = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2, head_dim=16)
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(DEVICE).eval()
    return model


@pytest.fixture(scope="module")
def tiny_engine(tokenizers):
    smol, gemma = tokenizers
    models = [LoadedModel("tiny-llama", tiny("llama", smol, 0), smol, DEVICE),
              LoadedModel("tiny-gemma3", tiny("gemma3_text", gemma, 1), gemma, DEVICE)]
    return Engine.from_models(models, FusionConfig(max_segment_tokens=6))


def test_state_after_many_steps_equals_fresh_prefill_across_the_sliding_window(tiny_engine):
    req = GenerationRequest(prompt="Multi-tasking is hard because you have to")
    run = tiny_engine.open_run(req)
    it = loop.segments(run)
    scored = 0
    for _ in range(25):
        step = next(it, None)
        if step is None or step.eos:
            break
        scored += len(step.candidates) > 1
    assert scored >= 5
    for w, st in zip(run.workers, run.states):
        assert len(st.ids) > 2 * 8  # well past the sliding window
        cached, fresh = w.cached_logits(st), w.fresh_logits(st)
        assert torch.allclose(cached, fresh, atol=1e-3, rtol=1e-3), (w.name, (cached - fresh).abs().max())
    run.close()


def test_block_scoring_equals_one_forward_per_candidate(tiny_engine):
    """A batched scoring pass gives the same PPLs as scoring each candidate alone."""
    w = tiny_engine.workers[1]
    st = w.open(w.text.encode("The quick brown fox jumps over the lazy dog and then", special=True))
    cands = [(" runs", False), (" sleeps all day", False), ("", True), (" 走", False)]
    together = w.score(st, cands)
    alone = []
    for c in cands:
        s2 = w.open(st.prompt_ids)
        alone.append(w.score(s2, [c])[0])
        w.close(s2)
    for a, b in zip(together, alone):
        assert math.isclose(a, b, rel_tol=1e-3), (together, alone)
    w.close(st)


def test_growing_kv_cache_matches_dynamic_cache_and_appends_in_place(tiny_engine):
    """The engine's cache (kvcache.GrowingLayer) gives the same logits as transformers'
    DynamicCache through appends, crops and block moves, and an append within its capacity
    writes into the storage it already has (no copy of the cache per token)."""
    from transformers import DynamicCache

    from coolfusion.runtime import kvcache
    from coolfusion.runtime.hf_compat import cache_keyword

    model = tiny_engine.workers[1].runner.model  # Gemma-3 shaped: sliding and full layers
    cache_kw = cache_keyword(model)  # the forward's name for the cache (it differs across transformers versions)
    ours, ref = kvcache.new_cache(), DynamicCache()
    g = torch.Generator().manual_seed(0)

    def feed(cache, toks, start):
        pos = torch.arange(start, start + len(toks), device=DEVICE)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([toks], device=DEVICE), use_cache=True,
                        position_ids=pos[None], cache_position=pos, **{cache_kw: cache})
        return out.logits[0]

    def ref_crop(n):
        for layer in ref.layers:
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]

    n = 0
    for step in range(12):
        toks = torch.randint(0, 1000, (1 + step % 3,), generator=g).tolist()
        a, b = feed(ours, toks, n), feed(ref, toks, n)
        assert torch.allclose(a, b, atol=1e-4), step
        n += len(toks)
        if step % 4 == 3:  # crop back two slots, as a commit that keeps a common prefix does
            n -= 2
            kvcache.crop(ours, n)
            ref_crop(n)
    storage = [layer._k.data_ptr() for layer in ours.layers]
    spare = ours.layers[0]._k.shape[-2] - n
    for _ in range(min(spare, 5)):
        tok = torch.randint(0, 1000, (1,), generator=g).tolist()
        assert torch.allclose(feed(ours, tok, n), feed(ref, tok, n), atol=1e-4)
        n += 1
    assert [layer._k.data_ptr() for layer in ours.layers] == storage
    # move the last 3 slots two places back (a scored block moved into place), then compare
    kvcache.move(ours, n - 3, n - 5, 3)
    kvcache.crop(ours, n - 2)
    with torch.inference_mode():
        for layer in ref.layers:
            layer.keys = torch.cat([layer.keys[..., : n - 5, :], layer.keys[..., n - 3 : n, :]], -2)
            layer.values = torch.cat([layer.values[..., : n - 5, :], layer.values[..., n - 3 : n, :]], -2)
    tok = [7]
    assert torch.allclose(feed(ours, tok, n), feed(ref, tok, n), atol=1e-4)


def test_benchmark_figures_follow_their_definitions(tiny_engine):
    """`coolfusion bench`'s figures on a small run: the floors and ratios are computed from
    the measured rates as documented, the token floor prices the fused texts the engine
    really produced, and the result is JSON."""
    import json

    from coolfusion.bench import speed as bench

    res = bench.measure(tiny_engine, bench.PROMPTS[:2], 8, growth_steps=2, growth_repeats=1)
    names = tiny_engine.source_names
    rates = [res["hf_generate"][v]["chars_per_s"] for v in names]
    assert res["floor_one_device_chars_per_s"] == pytest.approx(1 / sum(1 / r for r in rates))
    assert res["floor_device_per_model_chars_per_s"] == pytest.approx(min(rates))
    assert res["fused_vs_floor"] == pytest.approx(res["cool_fusion"]["chars_per_s"] / res["floor_one_device_chars_per_s"])
    texts = [tiny_engine.complete_text(GenerationRequest(prompt=p, max_tokens=8))[0] for p in bench.PROMPTS[:2]]
    assert res["cool_fusion"]["texts"] == texts and res["cool_fusion"]["chars"] == sum(map(len, texts))
    floor_s = sum(sum(len(w.text.encode(t)) for t in texts) / res["hf_generate"][w.name]["tokens_per_s"]
                  for w in tiny_engine.workers)
    assert res["fused_vs_floor_tokens"] == pytest.approx(floor_s / res["cool_fusion"]["seconds"])
    assert res["cost_growth"] == pytest.approx(res["ms_per_step_at_2000"] / res["ms_per_step_at_100"])
    assert res["forward_tokens_per_step_at_100"] >= 1 and res["forward_tokens_per_step_at_2000"] >= 1
    assert json.loads(json.dumps(res))["fused_vs_floor"] == res["fused_vs_floor"]
