"""The OpenAI-compatible protocol over a real uvicorn on loopback, around the fake engine.

Talks through the official `openai` client where it can, and raw HTTP + SSE parsing where
the wire format itself is the property (chunk order, [DONE], usage chunk, trace fields).
"""

from __future__ import annotations

import json
import math
import threading

import httpx
import openai
import pytest
from fakes import FakeEngine, words

from coolfusion.config import ServerConfig
from coolfusion.core.types import VARIANTS, GenerationRequest, Message
from coolfusion.server.app import create_app
from coolfusion.server.testing import serve_in_thread, sse_data


@pytest.fixture(scope="module")
def engine():
    return FakeEngine()


@pytest.fixture(scope="module")
def base_url(engine):
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        yield url


@pytest.fixture()
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture()
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def stream_events(http: httpx.Client, path: str, body: dict) -> list:
    """POST a streaming request; every SSE data payload, JSON-decoded except [DONE]."""
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [d if d == "[DONE]" else json.loads(d) for d in sse_data(r.iter_lines())]


def prompt_request(prompt: str, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=kw.pop("max_tokens", 64), **kw)


# ---- models and health ------------------------------------------------------------------------


def test_models_lists_every_fused_variant_then_each_source_in_openai_shape(client, engine):
    models = client.models.list()
    assert [m.id for m in models.data] == [*VARIANTS, *engine.source_names]
    assert all(m.object == "model" and m.owned_by and isinstance(m.created, int) for m in models.data)
    assert client.models.retrieve("alpha").id == "alpha"


def test_health_is_200_when_the_engine_is_ready(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# ---- non-streamed -----------------------------------------------------------------------------


def test_completion_returns_the_engine_text_with_usage_and_stop(client, engine):
    resp = client.completions.create(model="cool-fusion", prompt="one two three", max_tokens=20)
    expected = engine.expected_text(prompt_request("one two three", max_tokens=20))
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.model == "cool-fusion"
    assert [c.text for c in resp.choices] == [expected]
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].index == 0
    assert resp.usage.prompt_tokens == 3
    assert resp.usage.completion_tokens == len(words(expected))
    assert resp.usage.total_tokens == 3 + len(words(expected))


def test_max_tokens_cuts_the_output_with_finish_reason_length(client, engine):
    resp = client.completions.create(model="alpha", prompt="a b c d e f", max_tokens=3)
    assert resp.choices[0].text == "".join(words(engine.reply(prompt_request("a b c d e f", model="alpha")))[:3])
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3


def test_stop_string_ends_the_output_before_it(client):
    resp = client.completions.create(model="cool-fusion", prompt="x y zebra", stop=["zeb"])
    assert resp.choices[0].text == "cool-fusion heard: "
    assert resp.choices[0].finish_reason == "stop"


def test_omitted_max_tokens_uses_the_engine_default():
    engine = FakeEngine(filler_words=100, default_max_tokens=5)
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        body = httpx.post(url + "/v1/completions", json={"prompt": "p"}, timeout=30).json()
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"


def test_list_of_prompts_gives_n_choices_per_prompt_in_prompt_order(client, engine):
    resp = client.completions.create(model="cool-fusion", prompt=["red green", "blue"], n=2, max_tokens=10)
    texts = [engine.expected_text(prompt_request(p, max_tokens=10)) for p in ("red green", "blue")]
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert resp.usage.prompt_tokens == 3  # each prompt counted once, not n times
    assert resp.usage.completion_tokens == 2 * sum(len(words(t)) for t in texts)


def test_chat_returns_one_assistant_message_from_text_parts_and_system_turns(client, engine):
    resp = client.chat.completions.create(
        model="cool-fusion",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
        ],
        max_completion_tokens=50,
    )
    req = GenerationRequest(messages=(Message("system", "be brief"), Message("user", "hello\nthere")), max_tokens=50)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == engine.expected_text(req)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == engine.prompt_tokens(req)


def test_request_fields_reach_the_engine_and_seeds_differ_per_choice(http, engine, monkeypatch):
    seen: list[GenerationRequest] = []
    original = engine.generate

    def spy(request, cancel=None):
        seen.append(request.request)  # the HTTP layer hands the engine a Checked request
        return original(request, cancel)

    monkeypatch.setattr(engine, "generate", spy)
    r = http.post("/v1/chat/completions", json={
        "model": "beta", "messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": "hi"}],
        "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0.7, "top_p": 0.9, "seed": 41,
        "stop": "zz", "n": 2, "user": "someone", "fusion": {"trace": True},
    })
    assert r.status_code == 200, r.text
    assert len(seen) == 2
    first = seen[0]
    assert first.messages == (Message("system", "sys"), Message("user", "hi"))
    assert (first.model, first.max_tokens, first.temperature, first.top_p, first.stop, first.trace) == (
        "beta", 7, 0.7, 0.9, ("zz",), True)
    assert [s.seed for s in seen] == [41, 42]


def test_unknown_request_fields_are_accepted_and_ignored(http):
    r = http.post("/v1/completions", json={
        "prompt": "hi", "frequency_penalty": 0, "logit_bias": {}, "metadata": {"a": 1}, "not_an_openai_field": [1],
        "stream_options": None, "echo": False, "best_of": 1, "fusion": {"trace": False},
    })
    assert r.status_code == 200, r.text
    assert "fusion_trace" not in r.json()


# ---- streaming --------------------------------------------------------------------------------


def test_streamed_completion_deltas_concatenate_to_the_non_streamed_text(client, engine):
    kw = dict(model="cool-fusion", prompt="alpha beta gamma delta", max_tokens=30)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    # one chunk per selected segment, finish_reason only on the last
    assert len(chunks) == len(words(full.choices[0].text))
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert len({c.id for c in chunks}) == 1


def test_streamed_chat_opens_with_the_assistant_role_and_deltas_match_non_streamed(client):
    kw = dict(model="cool-fusion", messages=[{"role": "user", "content": "how are you"}], max_tokens=30)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stream_ends_with_done_and_has_no_usage_chunk_unless_asked(http):
    events = stream_events(http, "/v1/completions", {"prompt": "one two", "stream": True})
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    assert all(e["choices"] and "usage" not in e for e in events[:-1])


def test_include_usage_adds_one_final_usage_chunk_with_empty_choices(http, engine):
    events = stream_events(http, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "tell me"}], "stream": True,
        "stream_options": {"include_usage": True}, "n": 2,
    })
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    content = [e for e in events[:-2] if e["choices"][0]["delta"].get("content")]
    per_choice = len(content) // 2
    assert usage_chunk["usage"] == {"prompt_tokens": 4, "completion_tokens": 2 * per_choice,
                                    "total_tokens": 4 + 2 * per_choice}
    assert all("usage" not in e for e in events[:-2])
    # each of the two choices opens with its own role chunk
    assert [e["choices"][0]["index"] for e in events[:-2] if "role" in e["choices"][0]["delta"]] == [0, 1]


# ---- the fusion trace -------------------------------------------------------------------------


def _check_step(step: dict, sources: list[str]) -> None:
    assert set(step) == {"text", "winner", "eos", "candidates", "selection"}
    assert step["selection"] == {"rule": "mean_ppl"}
    assert step["winner"] in sources
    for cand in step["candidates"]:
        assert set(cand) == {"text", "proposed_by", "eos", "ppl", "mean_ppl", "score"}
        assert set(cand["ppl"]) <= set(sources)
        assert all(v is None or math.isfinite(v) for v in cand["ppl"].values())
    assert step["text"] in [c["text"] for c in step["candidates"]]


def test_trace_lists_each_step_with_candidates_and_the_steps_spell_the_text(http, engine):
    r = http.post("/v1/completions", json={"prompt": "trace me", "fusion": {"trace": True}})
    body = r.json()
    trace = body["fusion_trace"]
    assert "".join(s["text"] for s in trace) == body["choices"][0]["text"]
    assert [s["winner"] for s in trace[:2]] == engine.source_names[:2]  # the fake alternates
    assert trace[-1]["eos"] is True
    for step in trace:
        _check_step(step, engine.source_names)
    # a non-finite perplexity is sent as null, keeping the JSON valid
    assert trace[0]["candidates"][1]["mean_ppl"] is None
    assert trace[0]["candidates"][1]["score"] is None


def test_trace_is_absent_unless_asked(http):
    assert "fusion_trace" not in http.post("/v1/completions", json={"prompt": "no trace"}).json()


def test_streamed_trace_puts_its_step_on_every_content_chunk(http, engine):
    events = stream_events(http, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "stream trace"}], "stream": True, "fusion": {"trace": True},
    })[:-1]
    role, content = events[0], events[1:]
    assert "fusion_step" not in role
    for e in content:
        _check_step(e["fusion_step"], engine.source_names)
        assert e["fusion_step"]["text"] == e["choices"][0]["delta"]["content"]


def test_trace_with_several_choices_is_on_each_choice(http):
    body = http.post("/v1/completions", json={"prompt": ["p one", "p two"], "fusion": {"trace": True}}).json()
    for choice in body["choices"]:
        assert "".join(s["text"] for s in choice["fusion_trace"]) == choice["text"]
    assert body["fusion_trace"] == body["choices"][0]["fusion_trace"]


# ---- isolation --------------------------------------------------------------------------------


def test_concurrent_requests_each_get_their_own_correct_output(base_url, engine):
    prompts = [f"request number {i} says {'x ' * i}" for i in range(12)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
            if i % 2:
                chunks = c.completions.create(model="cool-fusion", prompt=prompts[i], max_tokens=40, stream=True)
                results[i] = "".join(ch.choices[0].text for ch in chunks)
            else:
                results[i] = c.completions.create(model="cool-fusion", prompt=prompts[i], max_tokens=40).choices[0].text
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for i, p in enumerate(prompts):
        assert results[i] == engine.expected_text(prompt_request(p, max_tokens=40)), i
