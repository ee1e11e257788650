"""select's tie-break and the loop's dedup/agreement rules, on scripted models (fast tier).

Two real `LocalWorker`s over `ScriptedModel`s and the in-memory byte tokenizer: each model
writes its own script and gives every other token the same low logit, so candidates get
finite perplexities and symmetric scripts give exact ties."""

from __future__ import annotations

import math

import pytest
from fakes import byte_tokenizer
from fakes import scripted_engine as engine

from coolfusion.core import loop
from coolfusion.core.types import Candidate, GenerationRequest

TOK = byte_tokenizer()
PROMPT = "Say:"


def test_select_is_the_argmin_of_the_score_and_ties_go_to_the_first_candidate():
    a = Candidate("a", ("m0",), False, {"m0": 1.0, "m1": 3.0}, 2.0, 2.0)
    b = Candidate("b", ("m1",), False, {"m0": 3.0, "m1": 1.0}, 2.0, 2.0)
    c = Candidate("c", ("m2",), False, {"m0": 1.5, "m1": 2.0}, 1.75, 1.75)
    assert loop.select([a, b]) is a  # a tie: the earlier proposer in config order
    assert loop.select([b, a]) is b
    assert loop.select([a, b, c]) is c
    assert loop.select([b]) is b


def test_symmetric_disagreement_is_an_exact_tie_won_by_the_first_model_every_step():
    eng = engine(" aaa bbb ccc", " xxx yyy zzz")  # same word lengths: the scores mirror each other
    steps = list(eng.generate(GenerationRequest(prompt=PROMPT, max_tokens=64, trace=True)))
    assert "".join(s.text for s in steps) == " aaa bbb ccc"
    scored = [s for s in steps if len(s.candidates) > 1]
    assert scored, "the scripts disagree: steps must be scored"
    for s in scored:
        a, b = s.candidates
        assert a.proposed_by == ("m0",) and b.proposed_by == ("m1",)
        assert math.isclose(a.mean_ppl, b.mean_ppl, rel_tol=1e-6)  # symmetric scripts: a tie
        assert s.winner == "m0"


def test_identical_proposals_are_one_candidate_and_skip_scoring_only_on_the_fast_path():
    for fast in (True, False):
        eng = engine(" same words here", " same words here", fast=fast)
        steps = list(eng.generate(GenerationRequest(prompt=PROMPT, max_tokens=64, trace=True)))
        assert "".join(s.text for s in steps) == " same words here"
        for s in steps:
            (c,) = s.candidates  # deduplicated: one candidate, proposed by both
            assert c.proposed_by == ("m0", "m1")
            assert (c.mean_ppl is None) == fast  # the reference path scores it anyway


def test_a_proposal_ends_at_the_first_word_start_after_its_first_word():
    eng = engine(" alpha beta gamma")
    run = eng.open_run(GenerationRequest(prompt=PROMPT, model="m0"))
    try:
        assert [p.text for p in loop.propose(run)] == [" alpha"]
    finally:
        run.close()


def test_the_run_reports_a_full_context_before_a_proposal_could_overflow_it():
    limit = len(TOK.backend_tokenizer.encode(PROMPT).ids) + 10
    eng = engine(" a b c d e f g h i j k l m n o p", max_segment_tokens=4, context_limit=limit)
    steps = list(eng.generate(GenerationRequest(prompt=PROMPT, model="m0", max_tokens=10)))  # fits the check
    assert steps[-1].finish_reason == "length"
    assert steps[-1].completion_tokens < 10  # ended by the context, before max_tokens


@pytest.mark.parametrize("fast", [True, False])
def test_stats_count_steps_and_agreements(fast):
    eng = engine(" x y z", " x y q", fast=fast)
    gen = eng.start(GenerationRequest(prompt=PROMPT, max_tokens=64))
    steps = list(gen)
    assert gen.stats.steps == len(steps)
    assert gen.stats.agreed == sum(len(s.candidates) == 1 for s in
                                   eng.generate(GenerationRequest(prompt=PROMPT, max_tokens=64, trace=True)))
    assert gen.stats.propose_s > 0 and gen.stats.commit_s > 0
