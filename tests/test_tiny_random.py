"""Mechanics on tiny random-weight models (fast; CUDA when present, else CPU).

In addition to the real-pair tests: a Llama-shaped and a Gemma-3-shaped model with a tiny
sliding window (so contexts cross it), over the two real tokenizers. Random weights make
the models disagree at almost every step, which exercises scoring and block reuse hard.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusion import loop
from fusion.config import FusionConfig
from fusion.engine import Engine, make_worker
from fusion.types import GenerationRequest

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
    workers = [make_worker("tiny-llama", tiny("llama", smol, 0), smol, DEVICE),
               make_worker("tiny-gemma3", tiny("gemma3_text", gemma, 1), gemma, DEVICE)]
    return Engine(workers, FusionConfig(max_segment_tokens=6))


def test_state_after_many_steps_equals_fresh_prefill_across_the_sliding_window(tiny_engine):
    req = GenerationRequest(prompt="Multi-tasking is hard because you have to")
    run = tiny_engine._open(tiny_engine.workers, req, None, [])
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
        w.close(st)


def test_block_scoring_equals_one_forward_per_candidate(tiny_engine):
    """A batched scoring pass gives the same PPLs as scoring each candidate alone."""
    w = tiny_engine.workers[1]
    st = w.open(w.encode("The quick brown fox jumps over the lazy dog and then", special=True))
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
