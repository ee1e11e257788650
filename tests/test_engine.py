"""The fusion engine on the real embedded pair (CPU): faithfulness and incrementality."""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import pytest
import torch

from coolfusion.core import loop
from coolfusion.engine.engine import Engine
from coolfusion.runtime.loading import LoadedModel
from coolfusion.core.errors import Cancelled, ContextLengthExceeded, InvalidRequest, UnknownModel
from coolfusion.core.types import GenerationRequest, Message

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Q: What is 12 times 3?\nA:"]


def text_of(steps):
    return "".join(s.text for s in steps)


def clone_engine(engine, indices, names=None, **fusion):
    """An engine over already-loaded models (e.g. one model twice)."""
    from coolfusion.config import FusionConfig

    models, templates = [], {}
    for j, i in enumerate(indices):
        w = engine.workers[i]
        name = names[j] if names else w.name
        models.append(LoadedModel(name, w.runner.model, w.text.tokenizer, w.device, context_limit=w.context_limit))
        templates[name] = engine.templates[w.name]
    return Engine.from_models(models, FusionConfig(**fusion), templates)


def hf_greedy(worker, prompt, n):
    text = worker.text
    ids = torch.tensor([text.encode(prompt, special=True)])
    with torch.inference_mode():
        out = worker.runner.model.generate(ids, max_new_tokens=n, do_sample=False,
                                           eos_token_id=list(text.end_ids), pad_token_id=text.primary_end)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in text.end_ids]
    return text.decode(new)


@pytest.mark.parametrize("which", [0, 1])
def test_single_model_generation_equals_hf_generate_greedy(engine, which):
    w = engine.workers[which]
    for prompt in PROMPTS[:2]:
        ours = text_of(engine.generate(GenerationRequest(prompt=prompt, model=w.name, max_tokens=24)))
        assert ours == hf_greedy(w, prompt, 24), prompt


def test_fusing_a_model_with_itself_is_greedy_decoding(engine):
    twin = clone_engine(engine, [0, 0], names=["a", "b"])
    single = clone_engine(engine, [0])
    for prompt in PROMPTS[:2]:
        fused = text_of(twin.generate(GenerationRequest(prompt=prompt, max_tokens=24)))
        alone = text_of(single.generate(GenerationRequest(prompt=prompt, max_tokens=24)))
        assert fused == alone == hf_greedy(engine.workers[0], prompt, 24)


def reference_ppl(worker, prompt_ids, g, cand, eos, end_id):
    """PPL of `cand` after prompt+G by one full forward pass without any cache."""
    before = prompt_ids + worker.text.encode(g)
    after = prompt_ids + worker.text.encode(g + cand) + ([end_id] if eos else [])
    p = 0
    while p < min(len(before), len(after)) and before[p] == after[p]:
        p += 1
    with torch.inference_mode():
        logits = worker.runner.model(input_ids=torch.tensor([after])).logits[0].float()
    logp = torch.log_softmax(logits[p - 1 : len(after) - 1], -1)
    nll = -logp.gather(1, torch.tensor(after[p:])[:, None])[:, 0]
    return math.exp(float(nll.mean()))


def test_every_ppl_in_the_trace_equals_a_full_recomputation(engine):
    req = GenerationRequest(prompt="The capital of France is", max_tokens=30, trace=True)
    run = engine.open_run(req)
    checked = 0
    try:
        for _ in range(14):
            before = [(st.g_text, st.g_ids == w.text.encode(st.g_text)) for w, st in zip(run.workers, run.states)]
            cands = loop.assess(run, loop.propose(run))
            win = loop.select(cands)
            if len(cands) > 1:
                for c in cands:
                    for w, st, (g, canonical) in zip(run.workers, run.states, before):
                        if canonical:  # the state is T(prompt) + T(G): recompute independently
                            ref = reference_ppl(w, st.prompt_ids, g, c.text, c.eos, w.text.primary_end)
                            assert c.ppl[w.name] == pytest.approx(ref, rel=2e-3), (g, c.text, w.name)
                            checked += 1
                    assert c.mean_ppl == pytest.approx(sum(c.ppl.values()) / len(c.ppl))
                assert win.mean_ppl == min(c.mean_ppl for c in cands)  # the winner is the argmin
            if win.eos:
                break
            loop.commit(run, win)
    finally:
        run.close()
    assert checked >= 4  # the models disagreed several times: PPLs were really compared


def test_cached_state_after_n_steps_equals_a_fresh_prefill(engine):
    for req in [GenerationRequest(prompt="Multi-tasking is hard because"),
                GenerationRequest(messages=(Message("user", "Name three colours."),))]:
        run = engine.open_run(req)
        it = loop.segments(run)
        g = ""
        for _ in range(8):
            step = next(it)
            if step.eos:  # an ending is not committed: the states hold G before it
                break
            g += step.text
        assert g
        for w, st in zip(run.workers, run.states):
            assert st.g_text == g
            assert st.ids[: len(st.prompt_ids)] == st.prompt_ids
            assert w.text.decode(st.ids[len(st.prompt_ids) : st.committed_len]) == g  # its tokens of G
            cached = w.cached_logits(st)
            fresh = w.fresh_logits(st)
            assert torch.allclose(cached, fresh, atol=2e-3, rtol=1e-3), (w.name, (cached - fresh).abs().max())
            w.close(st)


def test_chat_renders_each_models_own_template(engine):
    req = GenerationRequest(messages=(Message("system", "Be brief."), Message("user", "Hi")))
    smol, gemma = engine.workers
    assert "<|im_start|>user" in smol.text.decode(engine.prompt_ids(smol, req))
    g = gemma.text.decode(engine.prompt_ids(gemma, req))
    assert g.startswith("<bos><start_of_turn>user\nBe brief.") and g.endswith("<start_of_turn>model\n")


def test_stop_string_truncates_and_max_tokens_cuts_in_the_reference_tokenizer(engine):
    full = text_of(engine.generate(GenerationRequest(prompt="The capital of France is", max_tokens=20)))
    stop = full.strip().split()[2]
    steps = list(engine.generate(GenerationRequest(prompt="The capital of France is", max_tokens=20, stop=(stop,))))
    assert steps[-1].finish_reason == "stop"
    assert text_of(steps) == full[: full.index(stop)]
    short = list(engine.generate(GenerationRequest(prompt="The capital of France is", max_tokens=5)))
    assert short[-1].finish_reason == "length"
    ref = engine.workers[0].text
    assert len(ref.encode(text_of(short))) == 5 and full.startswith(text_of(short))
    assert short[-1].completion_tokens == 5


def test_seeded_sampling_is_reproducible(engine):
    req = GenerationRequest(prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=7)
    a = text_of(engine.generate(req))
    assert a == text_of(engine.generate(req))


def test_cancellation_stops_and_frees_every_cache(engine):
    cancel = threading.Event()
    gen = engine.generate(GenerationRequest(prompt="Tell me a story:", max_tokens=200), cancel)
    next(gen)
    assert engine.active_requests == 1
    cancel.set()
    with pytest.raises(Cancelled):
        next(gen)
    assert engine.active_requests == 0
    gen2 = engine.generate(GenerationRequest(prompt="Tell me a story:", max_tokens=200))
    next(gen2)
    gen2.close()  # closing the generator (a client going away) frees it too
    assert engine.active_requests == 0


@pytest.mark.parametrize(
    "req, err, param",
    [
        (GenerationRequest(prompt=""), InvalidRequest, "prompt"),
        (GenerationRequest(prompt="hi", max_tokens=0), InvalidRequest, "max_tokens"),
        (GenerationRequest(prompt="hi", max_tokens=-3), InvalidRequest, "max_tokens"),
        (GenerationRequest(prompt="hi", model="gpt-5"), UnknownModel, "model"),
        (GenerationRequest(prompt="bad \ud800 text"), InvalidRequest, "prompt"),
        (GenerationRequest(messages=(Message("user", "x\udfff"),)), InvalidRequest, "messages.0.content"),
        (GenerationRequest(messages=(Message("robot", "hi"),)), InvalidRequest, "messages.0.role"),
        (GenerationRequest(messages=()), InvalidRequest, "messages"),
        (GenerationRequest(prompt="word " * 9000), ContextLengthExceeded, "prompt"),
        (GenerationRequest(prompt="hi", max_tokens=100000), ContextLengthExceeded, "max_tokens"),
    ],
)
def test_bad_requests_raise_typed_errors(engine, req, err, param):
    with pytest.raises(err) as info:
        next(engine.generate(req))
    assert info.value.param == param and info.value.message
    assert engine.active_requests == 0


def test_fast_paths_change_no_output(engine):
    """Lookahead and KV reuse, block scoring reuse, skipped scoring on agreement, tail-only
    re-tokenization and threads are pure speed-ups: turning them all off (a full re-prefill
    every step) gives the same fused text."""
    slow = clone_engine(engine, [0, 1], fast_paths=False)
    reqs = [GenerationRequest(prompt=p, max_tokens=16) for p in PROMPTS] + [
        GenerationRequest(messages=(Message("user", "Give me two tips for sleeping well."),), max_tokens=16)]
    for req in reqs:
        fast_steps = list(engine.generate(replace(req, trace=True)))
        slow_steps = list(slow.generate(replace(req, trace=True)))
        assert text_of(fast_steps) == text_of(slow_steps), req
        assert [s.winner for s in fast_steps] == [s.winner for s in slow_steps]
