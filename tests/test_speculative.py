"""Speculative proposals on the real pair (docs/speculative.md): the text cannot change.

At every step, every model's proposal after checking another model's draft equals the proposal
it makes by decoding alone, over prompts of prose, code, numbers and non-English text, with
either model drafting. (The pinned greedy outputs with speculation on: test_pinned_outputs.py.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from coolfusion.core import loop, speculation
from coolfusion.core.types import COOL, COOL_NOALIGN, GenerationRequest

PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "The three primary colours are",
    "Q: What is 12 times 3?\nA:", "The opposite of hot is", "Water boils at", "My favourite book is",
    "The quick brown fox", "In 1969, the first man on the moon was",
    "def fibonacci(n):", "import numpy as np\n\ndef mean(xs):", "for (int i = 0; i < n; i++) {",
    "SELECT name, age FROM users WHERE", "<html>\n  <body>\n", "x = [i * i for i in",
    "Der schnelle braune Fuchs springt", "La capitale de la France est", "El perro de mi vecino",
    "中国的首都是", "東京は日本の", "Москва — столица", "The price is 3.50 € or £2.99, i.e.",
    "Emoji test: 🎉 party 🎂 cake and", "1, 2, 3, 5, 8, 13,",
]
STEPS = 3  # per prompt: the first step (no lookahead yet) and two that start from the last step's lookahead


def _lockstep(engine, prompt: str, model: str, drafter: str):
    """Two runs of one request, one plain and one speculative, fed the same winner each step:
    yields (plain proposals, speculative proposals, speculation record) per step."""
    req = GenerationRequest(prompt=prompt, model=model, max_tokens=64)
    plain = engine.open_run(replace(req, speculative=False))
    spec = engine.open_run(replace(req, speculative=True))
    spec.drafting = speculation.Drafting(drafter, lambda: tuple(engine.source_names))
    try:
        for _ in range(STEPS):
            a = loop.propose(plain)
            b, record = loop.propose_step(spec)
            yield a, b, record
            win = loop.select(loop.assess(plain, a))
            if win.eos:
                return
            loop.commit(plain, win)
            spec_win = loop.select(loop.assess(spec, b))  # scored as the loop does (check log-probs reused)
            assert (spec_win.text, spec_win.eos) == (win.text, win.eos), (prompt, win, spec_win)
            loop.commit(spec, win)
    finally:
        plain.close()
        spec.close()


@pytest.mark.parametrize("model,prompts", [(COOL, PROMPTS), (COOL_NOALIGN, PROMPTS[::4])], ids=[COOL, COOL_NOALIGN])
def test_every_proposal_with_a_draft_equals_the_proposal_without_one(engine, model, prompts):
    accepted = checked = 0
    for i, prompt in enumerate(prompts):
        drafter = engine.source_names[i % 2]
        for step, (a, b, record) in enumerate(_lockstep(engine, prompt, model, drafter)):
            assert record["drafter"] == drafter
            for name, p, q in zip(engine.source_names, a, b):
                where = (prompt, step, name, drafter)
                assert (p.text, p.eos, p.n_tokens, p.capped, p.end_id) == (q.text, q.eos, q.n_tokens, q.capped, q.end_id), where
                assert p.logprobs == pytest.approx(q.logprobs, abs=2e-3), where
            accepted += sum(record["accepted"].values())
            checked += sum(record["checked"].values())
        print(f"{prompt!r}: accepted so far {accepted} of {checked}", flush=True)
    print(f"\n{model}: draft tokens accepted {accepted} of {checked} checked")
    assert accepted > 0  # the checks did take over decoding somewhere


def test_speculative_requests_give_the_same_text_through_the_engine(engine):
    """The whole loop (drafter = last step's winner), with its trace: the drafter and each
    other model's accepted tokens per step."""
    fused = engine.fusion.model_copy(update={"speculative": True, "drafter": "winner"})
    spec_engine = type(engine)(engine.workers, fused, engine.templates)
    for prompt in ("def fibonacci(n):", "La capitale de la France est"):
        req = GenerationRequest(prompt=prompt, max_tokens=24, trace=True)
        plain = list(engine.generate(req))
        steps = list(spec_engine.generate(req))
        assert "".join(s.text for s in steps) == "".join(s.text for s in plain)
        assert [s.winner for s in steps] == [s.winner for s in plain]
        assert all(s.speculation and s.speculation["drafter"] in engine.source_names for s in steps)
        for prev, s in zip(steps, steps[1:]):
            assert s.speculation["drafter"] == prev.winner
        assert all(s.speculation is None for s in plain)


def test_check_rows_differ_from_one_token_decodes_far_less_than_the_margin(engine):
    """The margin guard's premise: a row of a many-token forward is within float rounding of
    the one-token decode of the same position. Printed: the largest difference seen."""
    from coolfusion.runtime.draft_check import MARGIN

    worst = 0.0
    for w in engine.workers:
        for prompt in ("The capital of France is", "def fibonacci(n):", "中国的首都是"):
            ids = w.text.encode(prompt, special=True)
            cont = w.text.encode(" Paris is a city of light and of many bridges over the river", special=False)
            st = w.open(ids)
            w.cached_logits(st)  # prefill the prompt
            many = w.runner.forward(st.cache, cont)  # (T, V): a check of T tokens
            w.close(st)
            st = w.open(ids)
            w.cached_logits(st)
            one = torch.stack([w.runner.forward(st.cache, [t])[-1] for t in cont])  # T one-token decodes
            w.close(st)
            worst = max(worst, float((many - one).abs().max()))
    print(f"\nlargest |logit difference| between a check row and a one-token decode: {worst:.2e} (margin {MARGIN})")
    assert worst * 4 < MARGIN


def test_speculative_proposals_with_the_batched_runner_give_the_plain_text(engine):
    """With `fusion.batching` a check is one more multi-token item of the model's batched
    forward; concurrent speculative requests still give each its plain text."""
    from concurrent.futures import ThreadPoolExecutor

    batched = engine.with_fusion(engine.fusion.model_copy(update={"batching": True, "kv_slots": 4,
                                                                   "speculative": True, "speculative_max_requests": 4}))
    try:
        reqs = [GenerationRequest(prompt=p, max_tokens=16, trace=True) for p in PROMPTS[:4]]
        plain = [engine.complete_text(replace(r, speculative=False))[0] for r in reqs]
        with ThreadPoolExecutor(4) as ex:
            runs = list(ex.map(lambda r: list(batched.generate(r)), reqs))
        assert ["".join(s.text for s in steps) for steps in runs] == plain
        assert all(s.speculation for steps in runs for s in steps)  # every step drafted and checked
        assert max(max(w.runner.batch_sizes) for w in batched.workers) > 1  # they did share forwards
    finally:
        batched.close()


def test_under_load_steps_propose_plainly_and_alone_they_speculate_again(engine):
    """`fusion.speculative_max_requests` 1: while another request is generating on the
    engine, a speculative request's steps propose plainly (no draft in the trace); alone, they
    draft again. The text is the plain one either way."""
    spec_engine = type(engine)(engine.workers, engine.fusion.model_copy(
        update={"speculative": True, "speculative_max_requests": 1}), engine.templates)
    req = GenerationRequest(prompt="def fibonacci(n):", max_tokens=16, trace=True)
    plain = engine.complete_text(replace(req, speculative=False))[0]
    other = spec_engine.generate(GenerationRequest(prompt="The capital of France is", max_tokens=64))
    next(other)  # generating (and holding its states) until closed
    try:
        loaded = list(spec_engine.generate(req))
    finally:
        other.close()
    alone = list(spec_engine.generate(req))
    assert "".join(s.text for s in loaded) == "".join(s.text for s in alone) == plain
    assert all(s.speculation is None for s in loaded)
    assert all(s.speculation for s in alone)
