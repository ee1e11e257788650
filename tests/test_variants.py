"""The paper's variants on the real pair: each checked for its defining property."""

from __future__ import annotations

from dataclasses import replace

from coolfusion.core import loop
from coolfusion.core.types import GenerationRequest, Message
from coolfusion.core.words import common_starts

PROMPT = "Q: What is the largest planet in our solar system?\nA:"


def answer(engine, model, **kw):
    steps = list(engine.generate(GenerationRequest(prompt=PROMPT, model=model, max_tokens=12, trace=True, **kw)))
    return "".join(s.text for s in steps), steps


def test_rerank_answer_is_an_individual_answer_with_the_lowest_mean_ppl(engine):
    text, steps = answer(engine, "rerank")
    assert len(steps) == 1
    cands = steps[0].candidates
    alone = {m: answer(engine, m)[0] for m in engine.source_names}
    assert {c.text for c in cands} == set(alone.values())
    for c in cands:
        assert set(c.ppl) == set(engine.source_names)
        for m in c.proposed_by:
            assert alone[m] == c.text
    best = min(cands, key=lambda c: c.mean_ppl)
    assert text == best.text and steps[0].winner in best.proposed_by


def test_cool_rerank_picks_among_the_individual_answers_plus_cools(engine):
    text, steps = answer(engine, "cool-fusion-rerank")
    cands = steps[0].candidates
    pool = {m: answer(engine, m)[0] for m in [*engine.source_names, "cool-fusion"]}
    assert {c.text for c in cands} == set(pool.values())
    assert any("cool-fusion" in c.proposed_by for c in cands)
    assert text == min(cands, key=lambda c: c.mean_ppl).text


def test_noalign_segments_end_at_the_proposers_own_word_boundary(engine):
    every = [w.text.words for w in engine.workers]
    req = GenerationRequest(prompt="The first twenty digits of pi are 3.")  # digits: SmolLM cuts, Gemma cannot
    for align in (False, True):
        run = engine.open_run(replace(req, model="cool-fusion" if align else "cool-fusion-noalign"))
        not_common = 0
        try:
            for _ in range(8):
                proposals = loop.propose(run)
                for w, st, p in zip(run.workers, run.states, proposals):
                    if p.eos or p.capped:
                        continue
                    seen = w.text.decode(st.ids[st.committed_len :])  # the proposal with its lookahead
                    assert seen.startswith(p.text) and len(seen) > len(p.text)
                    assert len(p.text) in w.text.words(seen)  # always a boundary of the proposer
                    common = len(p.text) in common_starts(seen, every)
                    assert common or not align  # Cool: always a common boundary
                    not_common += not common
                win = loop.select(loop.assess(run, proposals))
                if win.eos:
                    break
                loop.commit(run, win)
        finally:
            run.close()
        if not align:
            assert not_common > 0  # the ablation really cuts where the other tokenizer has no boundary


def test_chat_requests_work_for_every_variant(engine):
    for model in ["cool-fusion", "cool-fusion-noalign", "rerank"]:
        steps = list(engine.generate(GenerationRequest(messages=(Message("user", "Say hi."),), model=model, max_tokens=6)))
        assert steps[-1].finish_reason in ("stop", "length")


def test_concurrent_rerank_requests_with_judge_never_deadlock(engine):
    """Rerank fans out to whole single-model answers; with the judge on, several at once
    once exhausted the shared worker pool and hung. They must all finish."""
    from concurrent.futures import ThreadPoolExecutor

    req = GenerationRequest(prompt="The sky is", model="cool-fusion-rerank", max_tokens=4, judge=True)
    with ThreadPoolExecutor(3) as ex:
        futures = [ex.submit(lambda: list(engine.generate(req))) for _ in range(3)]
        outs = [f.result(timeout=600) for f in futures]
    texts = {"".join(s.text for s in steps) for steps in outs}
    assert len(texts) == 1  # greedy: the same answer each time
    assert all(steps[-1].judge is not None for steps in outs)
    assert engine.active_requests == 0
