"""Speculative proposals on scripted models (fast tier): the drafter rules, the trace record,
and the same text as the plain loop when the scripts agree, diverge, or end the turn."""

from __future__ import annotations

import pytest
from fakes import scripted_engine

from coolfusion.config import FusionConfig, parse_config
from coolfusion.core.errors import ConfigError
from coolfusion.core.speculation import Drafting
from coolfusion.core.types import GenerationRequest


def _engine(*scripts, **fusion):
    eng = scripted_engine(*scripts)
    eng = type(eng)(eng.workers, eng.fusion.model_copy(update=fusion), eng.templates)
    eng._fastest_first = ("m1", "m0")  # scripted models have no full forward to time
    return eng


def _steps(eng, **kw):
    return list(eng.generate(GenerationRequest(prompt="Say:", max_tokens=64, trace=True, **kw)))


@pytest.mark.parametrize("scripts", [
    (" same words here and there", " same words here and there"),  # every draft accepted
    (" aaa bbb ccc ddd", " aaa bxb ccc ddd"),  # a disagreement inside the second word
    (" one two three", " one two four five six"),  # different lengths: one ends its turn first
])
@pytest.mark.parametrize("drafter", ["fastest", "winner", "m1"])
def test_speculative_steps_are_the_plain_steps(scripts, drafter):
    plain = _steps(_engine(*scripts))
    spec = _steps(_engine(*scripts, speculative=True, drafter=drafter))
    assert [(s.text, s.winner, s.eos, [(c.text, c.proposed_by) for c in s.candidates]) for s in spec] == \
        [(s.text, s.winner, s.eos, [(c.text, c.proposed_by) for c in s.candidates]) for s in plain]
    assert all(s.speculation is None for s in plain)
    for prev, s in zip([None] + spec, spec):
        if drafter == "m1":
            assert s.speculation["drafter"] == "m1"
        elif drafter == "winner" and prev is not None:
            assert s.speculation["drafter"] == prev.winner
        other = "m0" if s.speculation["drafter"] == "m1" else "m1"
        assert set(s.speculation["accepted"]) == {other}
        assert s.speculation["accepted"][other] <= s.speculation["checked"][other]


def test_agreeing_scripts_accept_the_draft_and_a_request_can_turn_speculation_off():
    eng = _engine(" same words here and there", " same words here and there", speculative=True, drafter="m0")
    steps = _steps(eng)
    assert sum(s.speculation["accepted"]["m1"] for s in steps) > 0
    assert all(s.speculation is None for s in _steps(eng, speculative=False))
    assert all(s.speculation is None for s in _steps(eng, temperature=0.7, seed=1))  # sampled: plain path


def test_drafter_rules():
    d = Drafting("fastest", lambda: ("b", "a"))
    assert d.drafter(["a", "b"]) == 1
    d = Drafting("winner", lambda: ("a", "b"), last_winner="b")
    assert d.drafter(["a", "b"]) == 1
    assert Drafting("winner", lambda: ("b", "a")).drafter(["a", "b"]) == 1  # first step: the fastest
    assert Drafting("a", lambda: ("b", "a")).drafter(["a", "b"]) == 0


def test_config_names_a_bad_drafter():
    models = [{"name": "x", "path": "gpt2"}, {"name": "y", "path": "gpt2"}]
    assert parse_config({"models": models, "fusion": {"speculative": True, "drafter": "y"}}).fusion.drafter == "y"
    with pytest.raises(ConfigError, match="fusion.drafter"):
        parse_config({"models": models, "fusion": {"drafter": "z"}})
    assert FusionConfig().speculative is False


def test_the_trace_and_metrics_show_the_drafter_and_accepted_tokens():
    from coolfusion.server.metrics import Metrics
    from coolfusion.server.response_bodies import trace_step

    eng = _engine(" same words here and there", " same words here and there", speculative=True, drafter="m0")
    steps = _steps(eng)
    wire = trace_step(steps[0]).model_dump(exclude_unset=True)
    assert wire["speculation"] == {"drafter": "m0", "checked": steps[0].speculation["checked"],
                                   "accepted": steps[0].speculation["accepted"]}
    assert "speculation" not in trace_step(_steps(eng, speculative=False)[0]).model_dump(exclude_unset=True)
    m = Metrics()
    for s in steps:
        m.on_step("cool-fusion", s, 0.1)
    text = m.render().decode()
    accepted = sum(s.speculation["accepted"]["m1"] for s in steps)
    assert f'coolfusion_speculative_accepted_tokens_total{{model="m1"}} {float(accepted)}' in text
    assert f'coolfusion_speculative_drafts_total{{model="m0"}} {float(len(steps))}' in text


def test_the_speed_order_is_measured_only_when_a_rule_needs_it():
    def unmeasurable():
        raise AssertionError("measured although the rule did not need it")

    assert Drafting("a", unmeasurable).drafter(["a", "b"]) == 0
    assert Drafting("winner", unmeasurable, last_winner="b").drafter(["a", "b"]) == 1


def test_a_step_speculates_only_while_the_load_is_at_most_max_requests():
    load = [1]
    d = Drafting("winner", lambda: ("a", "b"), load=lambda: load[0], max_requests=2)
    seen = []
    for n in (1, 2, 3, 8, 2):
        load[0] = n
        seen.append(d.on())
    assert seen == [True, True, False, False, True]
    assert Drafting("winner", lambda: ("a", "b"), load=lambda: 99).on()  # no limit
