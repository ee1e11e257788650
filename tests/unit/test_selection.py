"""The selection rules of coolfusion.core.selection, their checks, and the loop applying them (fast tier).

The rules are checked against their formulas on hand-made perplexities; the loop part runs
two scripted models (tests/fakes.py) that disagree at every step and checks, for every rule,
that each traced winner is the argmin of that rule's score over its step's candidates and
that the score recorded is the rule's combination of the recorded perplexities."""

from __future__ import annotations

import math

import pytest
from fakes import scripted_engine as engine

from coolfusion.core.errors import InvalidRequest
from coolfusion.core.selection import RULES, Selection, SelectionRequest, auto_weights, check
from coolfusion.core.types import GenerationRequest

PPL = {"a": 2.0, "b": 8.0}


def test_each_rule_combines_the_perplexities_by_its_formula():
    assert Selection("mean_ppl").combine(PPL) == 5.0
    assert math.isclose(Selection("geo_mean_ppl").combine(PPL), 4.0)  # sqrt(2 * 8)
    assert Selection("max_ppl").combine(PPL) == 8.0
    assert Selection("min_ppl").combine(PPL) == 2.0
    assert Selection("weighted", {"a": 3.0, "b": 1.0}).combine(PPL) == (3 * 2 + 8) / 4
    assert Selection("weighted", {"a": 1.0}).combine(PPL) == 5.0  # unlisted models weigh 1
    assert Selection("weighted", {"a": 0.0}).combine({"a": math.inf, "b": 8.0}) == 8.0  # weight 0: left out
    assert Selection("mean_ppl").combine({}) == math.inf  # nobody voted: never chosen


def test_the_rules_disagree_where_they_should():
    steady, spiky = {"a": 3.0, "b": 3.0}, {"a": 1.0, "b": 6.0}  # mean 3 vs 3.5; geo 3 vs 2.45
    assert Selection("mean_ppl").combine(steady) < Selection("mean_ppl").combine(spiky)
    assert Selection("geo_mean_ppl").combine(spiky) < Selection("geo_mean_ppl").combine(steady)
    assert Selection("min_ppl").combine(spiky) < Selection("min_ppl").combine(steady)
    assert Selection("max_ppl").combine(steady) < Selection("max_ppl").combine(spiky)


def test_end_scoring_decides_what_each_model_scores_of_an_ending():
    with_end, text_only = Selection(end_scoring="end_token"), Selection(end_scoring="text")
    assert with_end.scores_end("a", " Paris.") is True
    assert text_only.scores_end("a", " Paris.") is False
    assert text_only.scores_end("a", "") is True  # an ending with no text: its end token is all there is
    deaf = Selection(end_scoring="end_token", no_end=frozenset({"b"}))
    assert deaf.scores_end("a", " Paris.") is True
    assert deaf.scores_end("b", " Paris.") is False
    assert deaf.scores_end("b", "") is None  # does not vote


def test_auto_weights_are_a_softmax_of_minus_the_prompt_nll_per_token_over_t():
    w = auto_weights({"a": 10.0, "b": 20.0}, n_tokens=10, temperature=1.0)
    assert math.isclose(w["a"] + w["b"], 1.0)
    assert math.isclose(w["a"] / w["b"], math.exp(1.0))  # (20 - 10) / 10 / T
    hot = auto_weights({"a": 10.0, "b": 20.0}, n_tokens=10, temperature=10.0)
    assert 0.5 < hot["a"] < w["a"]  # a higher temperature flattens the weights


@pytest.mark.parametrize("req, param", [
    (SelectionRequest(select="median"), "fusion.select"),
    (SelectionRequest(end_scoring="never"), "fusion.end_scoring"),
    (SelectionRequest(select="weighted", weights={"nope": 1.0}), "fusion.weights"),
    (SelectionRequest(select="weighted", weights={"a": -1.0}), "fusion.weights"),
    (SelectionRequest(select="weighted", weights={"a": 0.0, "b": 0.0}), "fusion.weights"),
    (SelectionRequest(select="weighted", weights="sometimes"), "fusion.weights"),
    (SelectionRequest(select="mean_ppl", weights={"a": 1.0}), "fusion.weights"),  # would be ignored
    (SelectionRequest(weights={"a": 1.0}), "fusion.weights"),  # the config's rule is mean_ppl
    (SelectionRequest(score_end={"nope": False}), "fusion.score_end"),
])
def test_bad_selection_settings_are_refused_naming_the_field(req, param):
    with pytest.raises(InvalidRequest) as err:
        check(req, ["a", "b"])
    assert err.value.param == param


def test_good_selection_settings_pass():
    check(SelectionRequest(select="weighted", weights={"a": 2.0, "b": 0.0}), ["a", "b"])
    check(SelectionRequest(weights="auto"), ["a", "b"], default_rule="weighted")
    check(SelectionRequest(select="geo_mean_ppl", end_scoring="text", score_end={"b": False}), ["a", "b"])


def _request(**sel) -> GenerationRequest:
    return GenerationRequest(prompt="Say:", max_tokens=64, trace=True, selection=SelectionRequest(**sel))


@pytest.mark.parametrize("rule", [r for r in RULES if r != "weighted"] + ["weighted"])
def test_every_traced_winner_is_the_argmin_of_the_rules_score(rule):
    eng = engine(" aaaa b cc dddd", " x yyyy zz w")  # different word lengths: unequal scores
    weights = {"m0": 1.0, "m1": 3.0} if rule == "weighted" else None
    steps = list(eng.generate(_request(select=rule, weights=weights)))
    sel = Selection(rule, weights or {})
    scored = [s for s in steps if len(s.candidates) > 1]
    assert scored
    for s in steps:
        assert s.selection == sel.describe()
    for s in scored:
        for c in s.candidates:
            assert c.score == sel.combine(c.ppl)
        best = min(s.candidates, key=lambda c: c.score)
        assert s.winner == best.proposed_by[0] and s.text.startswith(best.text[: len(s.text)])


def test_all_weight_on_one_model_picks_its_candidate_at_every_step():
    for favourite, script in (("m0", " aaaa b cc dddd"), ("m1", " x yyyy zz w")):
        eng = engine(" aaaa b cc dddd", " x yyyy zz w")
        steps = list(eng.generate(_request(select="weighted", weights={favourite: 1.0,
                                                                        ({"m0", "m1"} - {favourite}).pop(): 0.0})))
        assert "".join(s.text for s in steps) == script
        assert all(s.winner == favourite for s in steps if len(s.candidates) > 1)


@pytest.mark.parametrize("end, score_end, ends", [
    ("end_token", None, False),  # m1 never predicts the end after " Paris.": it vetoes the ending
    ("text", None, True),  # same text, same score: the tie goes to m0, which ends
    ("end_token", {"m1": False}, True),  # m1's end predictions do not count
])
def test_how_an_ending_is_scored_decides_whether_the_turn_ends_with_its_text(end, score_end, ends):
    eng = engine(" Paris.", " Paris. What next?")  # m0 ends after " Paris.", m1 goes on
    steps = list(eng.generate(_request(end_scoring=end, score_end=score_end)))
    (step,) = [s for s in steps if any(c.eos and c.text for c in s.candidates)]  # m0: "." and the end
    mine, theirs = step.candidates
    assert (mine.proposed_by, mine.eos, theirs.proposed_by, theirs.eos) == (("m0",), True, ("m1",), False)
    assert set(mine.ppl) == {"m0", "m1"}
    if end == "end_token" and not score_end:
        assert mine.ppl["m1"] > 10 * theirs.ppl["m1"]  # m1 scored m0's end token
    else:
        assert math.isclose(mine.ppl["m1"], theirs.ppl["m1"], rel_tol=1e-5)  # the text alone
    assert step.eos is ends and (step.finish_reason == "stop") is ends
    assert (steps[-1] is step) is ends  # else the turn goes on past "."


def test_the_configs_selection_settings_are_checked_at_start_up():
    from coolfusion.config import parse_config
    from coolfusion.core.errors import ConfigError

    models = [{"name": "a", "path": "x/a"}, {"name": "b", "path": "x/b"}]

    def cfg(**fusion):
        return {"models": models, "fusion": fusion}

    cases = [({"select": "median"}, "fusion.select"), ({"weights": {"c": 1.0}}, "fusion.weights.c"),
             ({"weights": {"a": -1.0}}, "fusion.weights.a"), ({"weights": {"a": 0, "b": 0}}, "fusion.weights"),
             ({"score_end": {"c": False}}, "fusion.score_end.c"), ({"end_scoring": "never"}, "fusion.end_scoring"),
             ({"weights": "sometimes"}, "fusion.weights")]
    for fusion, key in cases:
        with pytest.raises(ConfigError) as err:
            parse_config(cfg(**fusion))
        assert key in str(err.value), (fusion, str(err.value))
