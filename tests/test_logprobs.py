"""Log-likelihoods through the engine and the API (issue 16), on the real embedded pair.

Every value is checked against an independent recomputation: the model called directly on
the whole token sequence (no cache), the tokens from the Hugging Face tokenizer call. A
source-model id must give exactly its model's log-probs; a fused id, summed over a
continuation whose edges are word starts of both tokenizers, the mean over the models of
log P_v(continuation | context) in each model's own tokens.
"""

from __future__ import annotations

import json
import math
import threading

import httpx
import pytest
import torch

from coolfusion.config import ServerConfig
from coolfusion.core.errors import Cancelled, InvalidRequest
from coolfusion.core.selection import SelectionRequest
from coolfusion.core.types import COOL, GenerationRequest
from coolfusion.engine.alternatives import Alternatives
from coolfusion.server.app import create_app
from coolfusion.server.testing import serve_in_thread, sse_data

TOL = 1e-4  # float32 forwards of different lengths round differently, ~1e-6
CTX = "Question: Which phrase is true?\nAnswer:"
CONT = " Multi-tasking is hard"  # Multi|-|tas|king (SmolLM2) vs Multi|-|task|ing (Gemma 3)


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probs after each prefix of `ids`, from one forward without any cache."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def token_values(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1."""
    logp = forward_logprobs(model, ids)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


def fused_loglik(engine, context: str, continuation: str) -> float:
    """The definition: mean over source models of log P_v(T_v(cont) | T_v(context)), each model
    with the engine's convention (the context tokenized alone, with its special tokens)."""
    total = 0.0
    for w in engine.workers:
        ctx = w.text.tokenizer(context).input_ids
        cont = w.text.tokenizer(continuation, add_special_tokens=False).input_ids
        total += sum(token_values(w.runner.model, ctx + cont)[len(ctx) - 1:])
    return total / len(engine.workers)


def entries(engine, **kw):
    steps = list(engine.generate(GenerationRequest(**kw)))
    return steps, [e for s in steps for e in s.logprobs]


def test_echo_of_every_source_model_equals_a_full_forward_without_cache(engine):
    prompt = CTX + CONT
    for w in engine.workers:
        steps, got = entries(engine, prompt=prompt, model=w.name, max_tokens=0, echo=True, logprobs=3)
        enc = w.text.tokenizer(prompt, return_offsets_mapping=True)
        assert steps[0].echo == prompt and len(steps) == 1 and steps[0].text == ""
        assert [e.token_id for e in got] == enc.input_ids
        assert [e.offset for e in got] == [s for s, _ in enc.offset_mapping]
        assert got[0].logprob is None and got[0].top is None  # OpenAI: the first token has no context
        logp = forward_logprobs(w.runner.model, enc.input_ids)
        for i, e in enumerate(got[1:], start=1):
            assert abs(e.logprob - float(logp[i - 1, enc.input_ids[i]])) < TOL, (w.name, i)
            vals, idx = logp[i - 1].topk(3)
            assert [t for t, _ in e.top] == [w.text.tokenizer.decode([int(j)]) for j in idx]
            assert all(abs(v - float(x)) < TOL for (_, v), x in zip(e.top, vals))


def test_greedy_generated_tokens_carry_their_exact_log_probs_and_are_their_own_top_alternative(engine):
    smol = engine.workers[0]
    steps, got = entries(engine, prompt="The capital of France is", model=smol.name, max_tokens=6, logprobs=1)
    text = "".join(s.text for s in steps)
    prompt_ids = smol.text.tokenizer("The capital of France is").input_ids
    gen_ids = smol.text.tokenizer(text, add_special_tokens=False).input_ids
    assert [e.token_id for e in got] == gen_ids and "".join(e.token for e in got) == text
    want = token_values(smol.runner.model, prompt_ids + gen_ids)[len(prompt_ids) - 1:]
    assert all(abs(e.logprob - v) < TOL for e, v in zip(got, want))
    assert all(e.top[0] == (e.token, e.logprob) for e in got)  # greedy: each token is the argmax


def test_fused_echo_over_a_continuation_sums_to_the_mean_of_the_source_models(engine):
    # precondition: the continuation's edges are token boundaries of every model
    for w in engine.workers:
        tok = w.text.tokenizer
        assert tok(CTX + CONT).input_ids == tok(CTX).input_ids + tok(CONT, add_special_tokens=False).input_ids
    pieces = [[w.text.tokenizer.decode([t]) for t in w.text.tokenizer(CONT, add_special_tokens=False).input_ids]
              for w in engine.workers]
    assert pieces[0] != pieces[1], "the models must tokenize the continuation differently"
    _, got = entries(engine, prompt=CTX + CONT, model=COOL, max_tokens=0, echo=True, logprobs=0)
    span = sum(e.logprob for e in got if e.offset >= len(CTX))
    assert abs(span - fused_loglik(engine, CTX, CONT)) < TOL
    # the same prompt as the reference tokenizer's ids gives the same report
    ids = engine.workers[0].text.tokenizer(CTX + CONT).input_ids
    _, by_ids = entries(engine, prompt_ids=tuple(ids), model=COOL, max_tokens=0, echo=True, logprobs=0)
    assert [(e.token, e.offset) for e in by_ids] == [(e.token, e.offset) for e in got]
    assert all(abs(a.logprob - b.logprob) < TOL for a, b in zip(by_ids[1:], got[1:]))


def test_a_token_id_prompt_is_scored_on_exactly_those_ids(engine):
    gemma = engine.workers[1]
    ids = gemma.text.tokenizer(CTX, add_special_tokens=False).input_ids  # no BOS, as lm-eval sends
    steps, got = entries(engine, prompt_ids=tuple(ids), model=gemma.name, max_tokens=0, echo=True, logprobs=0)
    assert [e.token_id for e in got] == ids and steps[0].echo == CTX
    assert all(abs(e.logprob - v) < TOL for e, v in zip(got[1:], token_values(gemma.runner.model, ids)))


def test_out_of_range_token_ids_are_refused_naming_the_index(engine):
    req = GenerationRequest(prompt_ids=(1, 2, 10**6), model="smollm2-135m", max_tokens=1)
    with pytest.raises(InvalidRequest) as err:
        engine.check(req, where="prompt[1]")
    assert str(err.value) == ("prompt[1][2]: token id 1000000 is out of range for model 'smollm2-135m' "
                              "(vocabulary size 49152)") and err.value.param == "prompt"


# a text the models partly continue themselves (counting) and partly do not, so that both
# the known path and the fused step (matching the text and not) answer positions
ALT_TEXT = "The capital of France is Paris. One, two, three, four, five, six"


def definition(engine, prefix_ids: list[int], **kw) -> tuple[int, str]:
    """The fused model's next token after a token-id prefix: a real max_tokens-1 generation."""
    ref = engine.workers[0]
    text, _ = engine.complete_text(GenerationRequest(prompt_ids=tuple(prefix_ids), model=COOL, max_tokens=1, **kw))
    alt = ref.text.tokenizer(text, add_special_tokens=False).input_ids[0]
    return alt, ref.text.tokenizer.decode([alt])


@pytest.mark.parametrize("kw", [{}, {"selection": SelectionRequest(select="weighted", weights="auto")}],
                         ids=["walk", "auto-weights"])
def test_the_fused_alternative_is_the_token_the_fused_model_generates_after_the_prefix(engine, kw):
    ref = engine.workers[0]
    text = ALT_TEXT if not kw else "The capital of France is"  # auto weights: one request per position
    ids = ref.text.tokenizer(text).input_ids
    engine.alternatives = Alternatives()  # nothing kept from other tests: every path counted here
    _, got = entries(engine, prompt_ids=tuple(ids), model=COOL, max_tokens=0, echo=True, logprobs=1, **kw)
    assert got[0].top is None
    paths = engine.alternatives.paths
    if kw:
        assert set(paths) == {"request"}, paths
    else:  # the paths this test must cover: known, and the step both with the text's token and without
        assert paths["known"] > 0 and paths["step"] > 0 and set(paths) <= {"known", "step"}, paths
        assert engine.alternatives.most_walks > 1  # the step positions were walked in runs at once (batched)
        assert any(e.top[0][0] != e.token for e in got[1:]), "no position where the fused model leaves the text"
    for i in range(1, len(ids)):
        prefix = ref.text.tokenizer.decode(ids[:i])
        alt, token_text = definition(engine, ids[:i], **kw)
        (token, value), = got[i].top
        assert token == token_text, (i, token, token_text)
        want = got[i].logprob if alt == ids[i] else fused_loglik(engine, prefix, token)
        assert abs(value - want) < TOL, i


def test_the_walks_start_from_one_prefill_of_each_model(engine):
    """The runs' states at their first positions: the last run's opened, the others forked
    from it, so each model feeds the text's prefix once (as far as another run needs it), and
    every state is what a fresh prefill of its prompt gives."""
    from coolfusion.engine import alternatives as alt
    from coolfusion.workers.local import common_prefix

    ref = engine.workers[0]
    ids = ref.text.tokenizer(ALT_TEXT).input_ids
    req = GenerationRequest(prompt_ids=tuple(ids), model=COOL, max_tokens=0, echo=True, logprobs=1)
    request = alt._Request(engine.alternatives, engine, req, None)
    firsts = []
    for j in (4, 9, 13, len(ids) - 1):
        checked = engine.check(alt.definition(COOL, ids[:j], req.selection))
        firsts.append(alt._Pending(j, checked.request, [checked.prompt_ids[w.name] for w in engine.workers],
                                   [[] for _ in engine.workers]))
    fed = [w.forward_tokens for w in engine.workers]
    states = request.open_walks(firsts)
    try:
        for i, w in enumerate(engine.workers):
            prompts = [f.prompts[i] for f in firsts]
            assert w.forward_tokens - fed[i] == max(common_prefix(prompts[-1], p) for p in prompts[:-1]) > 10
            for run in states:
                cached, fresh = w.cached_logits(run[i]), w.fresh_logits(run[i])
                assert (cached - fresh).abs().max() < 2e-3 and int(cached.argmax()) == int(fresh.argmax())
    finally:
        for run in states:
            for w, st in zip(engine.workers, run):
                w.close(st)
    assert all(kv["slots_in_use"] == 0 for kv in engine.kv_report().values())


def test_alternatives_kept_by_prefix_serve_another_text_with_the_same_context(engine):
    """A multiple-choice question's choices share their context: the second choice's context
    positions are answered from the cache, and its first own position gets the value its
    token needs even when the first choice left only the token (the known path)."""
    ref = engine.workers[0]
    engine.alternatives = Alternatives()
    first = ref.text.tokenizer(ALT_TEXT).input_ids
    other = ref.text.tokenizer(ALT_TEXT.rsplit(",", 1)[0] + ", ten").input_ids
    n = next(i for i, (a, b) in enumerate(zip(first, other)) if a != b)
    entries(engine, prompt_ids=tuple(first), model=COOL, max_tokens=0, echo=True, logprobs=1)
    before = dict(engine.alternatives.paths)
    _, got = entries(engine, prompt_ids=tuple(other), model=COOL, max_tokens=0, echo=True, logprobs=1)
    assert engine.alternatives.paths["cached"] - before.get("cached", 0) >= n - 1
    alt, token_text = definition(engine, other[:n])
    (token, value), = got[n].top
    assert token == token_text
    want = got[n].logprob if alt == other[n] else fused_loglik(engine, ref.text.tokenizer.decode(other[:n]), token)
    assert abs(value - want) < TOL


class CancelAfter(threading.Event):
    """A cancel event that sets itself at its n-th look (a client disconnecting mid-request)."""

    def __init__(self, looks: int):
        super().__init__()
        self._left, self._count = looks, threading.Lock()

    def is_set(self) -> bool:
        with self._count:
            self._left -= 1
            if self._left <= 0:
                self.set()
        return super().is_set()


def test_a_cancelled_request_stops_every_walk_of_its_alternatives_and_frees_their_kv_slots(engine):
    ref = engine.workers[0]
    ids = tuple(ref.text.tokenizer(ALT_TEXT).input_ids)
    req = GenerationRequest(prompt_ids=ids, model=COOL, max_tokens=0, echo=True, logprobs=1)
    items = lambda: sum(w.runner_stats()["items"] for w in engine.workers)  # noqa: E731
    engine.alternatives = Alternatives()
    before = items()
    list(engine.generate(req))
    whole = items() - before
    engine.alternatives = Alternatives()
    before = items()
    with pytest.raises(Cancelled):  # cancelled after the known path's looks, once the walks run
        list(engine.generate(req, CancelAfter(len(ids) + 2)))
    assert engine.alternatives.most_walks > 1
    assert items() - before < whole  # the walks stopped: fewer model calls than the whole request's
    assert all(kv["slots_in_use"] == 0 for kv in engine.kv_report().values())  # every walk's states closed
    assert set(engine.alternatives.paths) == {"known"}  # no step answered (the known ones are kept: they are right)


@pytest.fixture(scope="module")
def http(engine):
    with serve_in_thread(create_app(engine, ServerConfig())) as url, httpx.Client(base_url=url, timeout=600) as c:
        yield c


def test_http_completions_echo_of_token_id_prompts_has_prompt_tokens_plus_the_generated_one(http, engine):
    smol = engine.workers[0]
    prompts = [smol.text.tokenizer(p).input_ids for p in ("Question: Is water wet?\nAnswer:", "Hi")]
    r = http.post("/v1/completions", json={"model": smol.name, "prompt": prompts, "max_tokens": 1,
                                           "logprobs": 1, "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    for choice, ids in zip(r.json()["choices"], prompts):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 == len(lp["token_logprobs"]) == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert choice["text"].startswith(smol.text.tokenizer.decode(ids)) and "".join(lp["tokens"]) == choice["text"]
        want = token_values(smol.runner.model, ids + smol.text.tokenizer(
            choice["text"][len(smol.text.tokenizer.decode(ids)):], add_special_tokens=False).input_ids)
        assert all(abs(a - b) < TOL for a, b in zip(lp["token_logprobs"][1:], want))
        assert all(len(t) == 1 for t in lp["top_logprobs"][1:])


def test_http_streamed_logprobs_are_the_chunks_own_and_add_up_to_the_whole_response(http, engine):
    body = {"model": engine.workers[0].name, "prompt": "The capital of France is", "max_tokens": 8,
            "logprobs": 2, "echo": True}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [c for c in (json.loads(d) for d in sse_data(r.iter_lines()) if d != "[DONE]")]
    first = chunks[0]["choices"][0]
    assert first["text"].startswith("The capital of France is")
    joined = {k: [v for c in chunks for v in c["choices"][0]["logprobs"][k]] for k in whole["logprobs"]}
    assert joined["tokens"] == whole["logprobs"]["tokens"] and joined["text_offset"] == whole["logprobs"]["text_offset"]
    assert all((a is None and b is None) or abs(a - b) < TOL
               for a, b in zip(joined["token_logprobs"], whole["logprobs"]["token_logprobs"]))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_http_chat_logprobs_for_a_source_model_and_a_fused_id(http, engine):
    msg = [{"role": "user", "content": "Name a colour."}]
    r = http.post("/v1/chat/completions", json={"model": engine.workers[0].name, "messages": msg, "max_tokens": 5,
                                                "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    assert all(len(t["top_logprobs"]) == 2 and t["bytes"] == list(t["token"].encode()) for t in content)
    r = http.post("/v1/chat/completions", json={"model": COOL, "messages": msg, "max_tokens": 3, "logprobs": True})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and all(math.isfinite(t["logprob"]) and t["top_logprobs"] == [] for t in content)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": COOL, "prompt": "Hi", "logprobs": 2}, "logprobs", "at most 1"),
    ({"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 0}, "max_tokens", "echo"),
    ({"model": "smollm2-135m", "prompt": [[5, 6], [7, 49152]]}, "prompt", "prompt[1][1]: token id 49152"),
    ({"model": COOL, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 1},
     "top_logprobs", "fused"),
])
def test_http_what_a_model_id_cannot_answer_is_a_400_saying_why(http, body, param, words):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"
