"""The real server (uvicorn on a loopback port) around the real engine, through the official
`openai` client: streaming and not, completions and chat, fused and single-model."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from coolfusion.server.app import create_app
from coolfusion.server.testing import serve_in_thread, sse_data


@pytest.fixture(scope="module")
def base_url(engine):
    with serve_in_thread(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_lists_the_variants_and_every_source_model(client, engine):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "cool-fusion"
    assert set(ids) == {"cool-fusion", "cool-fusion-rerank", "rerank", "cool-fusion-noalign", *engine.source_names}


@pytest.mark.parametrize("model", ["cool-fusion", "smollm2-135m"])
def test_streamed_completion_deltas_concatenate_to_the_non_streamed_text(client, model):
    kw = dict(model=model, prompt="The capital of France is", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # one chunk per segment
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1] if c.choices)
    assert whole.usage.completion_tokens <= 16 and whole.usage.prompt_tokens > 0


def test_streamed_chat_starts_with_the_role_and_equals_the_non_streamed_reply(client):
    kw = dict(model="cool-fusion", max_tokens=16, temperature=0,
              messages=[{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}])
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text


def test_sse_chunks_carry_their_fusion_step_and_end_with_done(base_url):
    body = {"model": "cool-fusion", "prompt": "Multi-tasking is hard because", "max_tokens": 16,
            "stream": True, "fusion": {"trace": True}}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        events = list(sse_data(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    steps = [c["fusion_step"] for c in chunks if "fusion_step" in c]
    assert steps and all(s["text"] == c["choices"][0]["text"] for s, c in zip(steps, chunks))
    contested = [s for s in steps if len(s["candidates"]) > 1]
    for s in contested:
        best = min(s["candidates"], key=lambda c: c["mean_ppl"])
        assert s["winner"] in best["proposed_by"]
        assert set(best["ppl"]) == {"smollm2-135m", "gemma3-270m"}


def test_judge_reports_every_source_models_ppl_of_the_answer(client):
    r = client.completions.create(model="smollm2-135m", prompt="2 + 2 =", max_tokens=6,
                                  extra_body={"fusion": {"judge": True}})
    judge = r.model_dump()["choices"][0]["fusion_judge"]
    assert set(judge["ppl"]) == {"smollm2-135m", "gemma3-270m"}
    assert judge["mean_ppl"] == pytest.approx(sum(judge["ppl"].values()) / 2)


def test_errors_before_the_stream_are_openai_shaped(client, base_url):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    r = httpx.post(base_url + "/v1/completions", json={"model": "cool-fusion", "prompt": "hi",
                                                       "max_tokens": 100000, "stream": True}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "gemma3-270m" in r.json()["error"]["message"] or "smollm2-135m" in r.json()["error"]["message"]


def test_a_client_that_disconnects_stops_the_engine_and_frees_the_request(base_url, engine):
    body = {"model": "cool-fusion", "prompt": "Write a long story about a dragon:", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=300) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                break  # the first segment arrived: hang up
        assert engine.active_requests == 1
    deadline = time.monotonic() + 60
    while engine.active_requests and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.active_requests == 0
