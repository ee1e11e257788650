"""Every error the server sends: status, OpenAI error JSON, and checks made before a stream.

Real uvicorn on loopback around the fake engine; raw HTTP so the status and body are seen
exactly as a client sees them.
"""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
from fakes import FakeEngine

from coolfusion.config import ServerConfig
from coolfusion.server.app import app_state, create_app
from coolfusion.server.testing import serve_in_thread, sse_data

KEY = "sk-test-0123456789-secret"


@pytest.fixture(scope="module")
def engine():
    return FakeEngine(context_limit=100)


@pytest.fixture(scope="module")
def base_url(engine):
    with serve_in_thread(create_app(engine, ServerConfig(max_body_bytes=4096))) as url:
        yield url


@pytest.fixture()
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def assert_error(r: httpx.Response, status: int, *, code=..., param=..., type_=...) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not ...:
        assert err["code"] == code
    if param is not ...:
        assert err["param"] == param
    if type_ is not ...:
        assert err["type"] == type_
    return err


# ---- 400 --------------------------------------------------------------------------------------

BAD_COMPLETIONS = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "temperature": 5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "stop": 7}, "stop"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
    ({"prompt": "hi", "echo": [1]}, "echo"),
    ({"prompt": [1, True, 3]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [[1, 2], "text"]}, "prompt"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "stream": "yes please"}, "stream"),
    ({"prompt": "hi", "fusion": "trace"}, "fusion"),
    ({"prompt": "hi", "fusion": {"trace": "maybe"}}, "fusion.trace"),
    ({"prompt": "hi", "seed": 2**70}, "seed"),
    ({"prompt": "   "}, "prompt"),  # the engine's own check
]


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETIONS, ids=[p for _, p in BAD_COMPLETIONS])
def test_invalid_completion_is_400_naming_the_field(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param=param, type_="invalid_request_error")


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "ok"}, {"role": "user"}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": "maybe"}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHATS, ids=[p for _, p in BAD_CHATS])
def test_invalid_chat_is_400_naming_the_field(http, body, param):
    assert_error(http.post("/v1/chat/completions", json=body), 400, param=param, type_="invalid_request_error")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"a string"', b""])
def test_a_body_that_is_not_a_json_object_is_400(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, param=None)


def test_lone_surrogate_in_the_prompt_is_400_not_500(http):
    raw = b'{"prompt": "bad \\ud800 text"}'
    assert_error(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400,
                 param="prompt")


def test_context_overflow_is_400_context_length_exceeded_before_a_stream_starts(http):
    r = http.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 98, "stream": True})
    err = assert_error(r, 400, code="context_length_exceeded")
    assert "100" in err["message"]  # names the limit


def test_openai_client_sees_a_bad_request_error(base_url):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="cool-fusion", messages=[{"role": "user", "content": "x"}], temperature=9)
    assert info.value.body["param"] == "temperature"


# ---- 404, 405 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_model_not_found(http, stream):
    r = http.post("/v1/chat/completions", json={
        "model": "gpt-7", "messages": [{"role": "user", "content": "x"}], "stream": stream})
    assert_error(r, 404, code="model_not_found", param="model")


def test_retrieving_an_unknown_model_is_404(http):
    assert_error(http.get("/v1/models/gpt-7"), 404, code="model_not_found")


def test_unknown_route_is_404_and_wrong_method_405_in_openai_shape(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)


# ---- 413 --------------------------------------------------------------------------------------


def test_body_over_the_limit_is_413(http):
    r = http.post("/v1/completions", json={"prompt": "x" * 5000})
    assert_error(r, 413, code="request_too_large")


def test_chunked_body_over_the_limit_is_413_without_content_length(http):
    def body():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = http.post("/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, code="request_too_large")


def test_body_under_the_limit_is_served(http):
    assert http.post("/v1/completions", json={"prompt": "x " * 1000, "max_tokens": 1}).status_code == 400  # context
    assert http.post("/v1/completions", json={"prompt": "x " * 20, "max_tokens": 1}).status_code == 200


# ---- errors from the engine -------------------------------------------------------------------


def test_engine_bug_mid_stream_goes_in_band_then_done(http):
    with http.stream("POST", "/v1/completions", json={"prompt": "please EXPLODE", "stream": True}) as r:
        assert r.status_code == 200
        events = list(sse_data(r.iter_lines()))
    assert events[-1] == "[DONE]"
    first, error = json.loads(events[0]), json.loads(events[-2])
    assert first["choices"][0]["text"]  # one segment arrived before the failure
    assert error == {"error": {"message": error["error"]["message"], "type": "server_error",
                               "param": None, "code": "internal_error"}}
    assert "exploded" not in error["error"]["message"]  # internals stay in the log


def test_engine_error_without_streaming_keeps_its_status_and_code(http):
    assert_error(http.post("/v1/completions", json={"prompt": "WORKERFAIL now"}), 500, code="worker_failed")
    assert_error(http.post("/v1/completions", json={"prompt": "EXPLODE now"}), 500, code="internal_error")


# ---- 401 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_url():
    with serve_in_thread(create_app(FakeEngine(), ServerConfig(api_key=KEY))) as url:
        yield url


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}])
@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/v1/completions"])
def test_wrong_or_missing_api_key_is_401_on_every_route(keyed_url, headers, path):
    method = "POST" if path == "/v1/completions" else "GET"
    r = httpx.request(method, keyed_url + path, headers=headers, json={"prompt": "x"})
    assert_error(r, 401, code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"


def test_right_api_key_is_accepted_and_health_needs_none(keyed_url):
    assert httpx.get(keyed_url + "/health").status_code == 200
    client = openai.OpenAI(base_url=keyed_url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="cool-fusion", prompt="hi").choices[0].text
    assert httpx.get(keyed_url + "/metrics", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def test_the_api_key_never_reaches_the_logs(keyed_url, caplog):
    caplog.set_level(logging.DEBUG)
    httpx.get(keyed_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    httpx.get(keyed_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}-wrong"})
    assert any(getattr(r, "fields", {}).get("path") == "/v1/models" for r in caplog.records)
    assert KEY not in caplog.text
    assert all(KEY not in json.dumps(getattr(r, "fields", {})) for r in caplog.records)


# ---- 503 --------------------------------------------------------------------------------------


def test_not_ready_is_503_until_the_engine_is_set_then_200():
    app = create_app(None, ServerConfig())
    with serve_in_thread(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        assert_error(httpx.get(url + "/v1/models"), 503, code="engine_not_ready")
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
        assert_error(r, 503, code="engine_not_ready")
        assert int(r.headers["retry-after"]) >= 1
        app_state(app).set_engine(FakeEngine())
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 200


def test_failed_engine_load_keeps_health_503_with_the_reason():
    app = create_app(None, ServerConfig())
    app_state(app).set_failed(RuntimeError("weights missing"))
    with serve_in_thread(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "error", "error": "RuntimeError: weights missing"}
        assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 503)


def test_an_engine_reporting_not_ready_makes_health_503():
    engine = FakeEngine()
    engine.unavailable = "source model 'alpha' is restarting"
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        assert httpx.get(url + "/health").status_code == 503
        engine.unavailable = None
        assert httpx.get(url + "/health").status_code == 200


def test_an_engine_saying_why_it_is_unavailable_gives_that_reason_in_health_and_the_503s():
    """A lost Ray cluster (coolfusion/workers/ray_cluster.py) reaches clients this way."""
    engine = FakeEngine()
    engine.unavailable = "the Ray cluster is lost: Ray's gcs_server (pid 7), started by this server, was killed by SIGKILL"
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "error", "error": engine.unavailable}
        err = assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 503, code="engine_not_ready")
        assert engine.unavailable in err["message"]
