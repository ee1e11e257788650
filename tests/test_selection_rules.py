"""Selection rules beyond the paper (coolfusion/core/selection.py) on the real embedded pair.

For every rule: each traced winner is the argmin of the rule's combined score over its
step's candidates, and the score recorded is the rule's combination of the per-model
perplexities recorded beside it. `weighted` with all weight on one model follows that
model's preference at every step; weights given per request override the config's; the
rules reach Rerank (whole answers) and the judge; bad settings are 400s over HTTP.
"""

from __future__ import annotations

import httpx
import pytest

from coolfusion.config import FusionConfig, ServerConfig
from coolfusion.core.selection import RULES, Selection, SelectionRequest
from coolfusion.core.types import GenerationRequest
from coolfusion.server.app import create_app
from coolfusion.server.testing import serve_in_thread

PROMPT = "The three primary colors are"
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


def traced(engine, model="cool-fusion", max_tokens=24, **sel):
    req = GenerationRequest(prompt=PROMPT, model=model, max_tokens=max_tokens, trace=True,
                            selection=SelectionRequest(**sel))
    return list(engine.generate(req))


def scored(steps):
    return [s for s in steps if len(s.candidates) > 1]


@pytest.mark.parametrize("rule", RULES)
def test_every_winner_is_the_argmin_of_the_rules_score(engine, rule):
    weights = {SMOL: 1.0, GEMMA: 2.5} if rule == "weighted" else None
    steps = traced(engine, select=rule, weights=weights)
    sel = Selection(rule, weights or {})
    assert scored(steps), "the pair should disagree somewhere on this prompt"
    for s in steps:
        assert s.selection == sel.describe()
    for s in scored(steps):
        for c in s.candidates:
            assert set(c.ppl) == {SMOL, GEMMA}
            assert c.score == pytest.approx(sel.combine(c.ppl), rel=1e-12)
        best = min(s.candidates, key=lambda c: c.score)
        assert s.winner == best.proposed_by[0]
        assert best.text.startswith(s.text)  # the last step may be cut at max_tokens


def test_the_rules_choose_differently_somewhere(engine):
    texts = {rule: "".join(s.text for s in traced(engine, select=rule)) for rule in ("max_ppl", "min_ppl")}
    assert texts["max_ppl"] != texts["min_ppl"]


@pytest.mark.parametrize("favourite", [SMOL, GEMMA])
def test_all_weight_on_one_model_picks_its_preferred_candidate_at_every_step(engine, favourite):
    other = GEMMA if favourite == SMOL else SMOL
    steps = traced(engine, select="weighted", weights={favourite: 1.0, other: 0.0})
    assert scored(steps)
    for s in scored(steps):
        best = min(s.candidates, key=lambda c: c.ppl[favourite])
        assert s.winner == best.proposed_by[0]


def test_weights_given_per_request_override_the_configs(engine):
    eng = engine.with_fusion(FusionConfig(select="weighted", weights={SMOL: 1.0, GEMMA: 0.0}))
    by_config = traced(eng)
    by_request = traced(eng, weights={SMOL: 0.0, GEMMA: 1.0})
    assert by_config[0].selection == {"rule": "weighted", "weights": {SMOL: 1.0, GEMMA: 0.0}}
    assert by_request[0].selection == {"rule": "weighted", "weights": {SMOL: 0.0, GEMMA: 1.0}}
    for steps, favourite in ((by_config, SMOL), (by_request, GEMMA)):
        for s in scored(steps):
            assert s.winner == min(s.candidates, key=lambda c: c.ppl[favourite]).proposed_by[0]


def test_rerank_and_the_judge_use_the_requests_rule(engine):
    sel = Selection("max_ppl")
    (step,) = traced(engine, model="rerank", max_tokens=10, select="max_ppl")
    assert step.selection == sel.describe()
    for c in step.candidates:
        assert c.score == sel.combine(c.ppl)
    assert step.winner in min(step.candidates, key=lambda c: c.score).proposed_by
    req = GenerationRequest(prompt=PROMPT, max_tokens=10, judge=True, selection=SelectionRequest(select="max_ppl"))
    last = list(engine.generate(req))[-1]
    assert last.judge.score == max(last.judge.ppl.values())


@pytest.fixture(scope="module")
def base_url(engine):
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        yield url


@pytest.mark.parametrize("fusion, param", [
    ({"select": "median"}, "fusion.select"),
    ({"select": "weighted", "weights": {"nope": 1}}, "fusion.weights"),
    ({"weights": {SMOL: 2}}, "fusion.weights"),  # the config's rule is mean_ppl: weights would do nothing
    ({"end_scoring": "never"}, "fusion.end_scoring"),
    ({"score_end": {"nope": False}}, "fusion.score_end"),
])
def test_bad_selection_settings_are_400s_naming_the_field(base_url, fusion, param):
    r = httpx.post(base_url + "/v1/completions", json={"model": "cool-fusion", "prompt": PROMPT, "max_tokens": 4,
                                                       "fusion": fusion}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_http_trace_records_the_rule_weights_and_scores(base_url):
    body = {"model": "cool-fusion", "prompt": PROMPT, "max_tokens": 16,
            "fusion": {"trace": True, "select": "weighted", "weights": {SMOL: 1, GEMMA: 3}}}
    r = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    trace = r.json()["fusion_trace"]
    sel = Selection("weighted", {SMOL: 1.0, GEMMA: 3.0})
    assert all(s["selection"] == {"rule": "weighted", "weights": {SMOL: 1.0, GEMMA: 3.0}} for s in trace)
    steps = [s for s in trace if len(s["candidates"]) > 1]
    assert steps
    for s in steps:
        for c in s["candidates"]:
            assert c["score"] == pytest.approx(sel.combine(c["ppl"]))


def test_auto_weights_follow_packllm_sim_from_an_independent_full_forward_of_the_prompt(engine):
    import math

    import torch

    req = GenerationRequest(prompt=PROMPT, max_tokens=16, trace=True,
                            selection=SelectionRequest(select="weighted", weights="auto"))
    steps = list(engine.generate(req))
    got = steps[0].selection["weights"]
    nll = {}
    for w in engine.workers:
        ids = engine.prompt_ids(w, req)
        with torch.inference_mode():
            logits = w.loaded.model(input_ids=torch.tensor([ids])).logits[0].float()  # no cache
        logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
        nll[w.name] = -float(logp.sum())
    n = len(engine.prompt_ids(engine.workers[0], req))
    t = engine.fusion.auto_temperature
    z = sum(math.exp(-v / n / t) for v in nll.values())
    for name, v in nll.items():
        assert got[name] == pytest.approx(math.exp(-v / n / t) / z, rel=1e-4)
    sel = Selection("weighted", got)
    for s in scored(steps):
        assert s.winner == min(s.candidates, key=lambda c: sel.combine(c.ppl)).proposed_by[0]
