"""CORS (server.cors_*): preflights, the headers on real answers, and the API key, over real HTTP.

A browser page on another origin may call the API only if the server answers its preflight
(OPTIONS with Origin and Access-Control-Request-Method) and marks every answer, errors
included, with Access-Control-Allow-Origin. Around the fake engine: only HTTP is under test
here (tests/test_browser_clients.py runs a real JavaScript client in Chromium on the real models).
"""

from __future__ import annotations

import json

import httpx
import pytest
from fakes import FakeEngine

from coolfusion.config import ServerConfig
from coolfusion.server.app import create_app
from coolfusion.server.cli import build_parser, server_settings
from coolfusion.server.testing import serve_in_thread, sse_data

FRONT_END = "http://localhost:3000"
ELSEWHERE = "http://evil.example"
KEY = "sesame"
# What the openai npm package's preflight asks for (Chromium lowercases and sorts the names).
CLIENT_HEADERS = "authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-retry-count"
CHAT = {"model": "cool-fusion", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def cors_url():
    settings = ServerConfig(cors_allowed_origins=(FRONT_END,), max_body_bytes=4096)
    with serve_in_thread(create_app(FakeEngine(), settings)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url():
    with serve_in_thread(create_app(FakeEngine(), ServerConfig(cors_allowed_origins=(FRONT_END,), api_key=KEY))) as url:
        yield url


def preflight(url: str, origin: str, method: str = "POST", headers: str = CLIENT_HEADERS) -> httpx.Response:
    return httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                       "Access-Control-Request-Headers": headers})


def listed(value: str | None) -> set[str]:
    return {v.strip().lower() for v in (value or "").split(",") if v.strip()}


# ---- preflights -------------------------------------------------------------------------------


@pytest.mark.parametrize("path, method", [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"),
                                          ("/v1/models", "GET"), ("/health", "GET"), ("/metrics", "GET")])
def test_a_preflight_from_an_allowed_origin_allows_the_method_and_the_clients_headers(cors_url, path, method):
    r = preflight(cors_url + path, FRONT_END, method)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == FRONT_END
    assert method.lower() in listed(r.headers["access-control-allow-methods"])
    assert listed(CLIENT_HEADERS) <= listed(r.headers["access-control-allow-headers"])  # Authorization too
    assert "access-control-allow-credentials" not in r.headers
    assert "origin" in listed(r.headers["vary"])  # caches must not hand this answer to another origin


def test_a_preflight_from_another_origin_is_refused_without_allow_headers(cors_url):
    r = preflight(cors_url + "/v1/chat/completions", ELSEWHERE)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "cors_not_allowed"
    assert ELSEWHERE in error["message"] and "server.cors_allowed_origins" in error["message"]


def test_a_preflight_for_a_method_not_allowed_is_refused_naming_the_setting(cors_url):
    r = preflight(cors_url + "/v1/models", FRONT_END, "DELETE")
    assert r.status_code == 400
    assert "server.cors_allowed_methods" in r.json()["error"]["message"]


def test_without_allowed_origins_there_is_no_cors_and_a_preflight_is_405():
    with serve_in_thread(create_app(FakeEngine(), ServerConfig())) as url:
        r = preflight(url + "/v1/chat/completions", FRONT_END)
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert not [h for h in r.headers if h.startswith("access-control-")]
        r = httpx.get(url + "/v1/models", headers={"Origin": FRONT_END})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_any_origin_with_a_star():
    with serve_in_thread(create_app(FakeEngine(), ServerConfig(cors_allowed_origins=("*",)))) as url:
        r = preflight(url + "/v1/chat/completions", ELSEWHERE)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert "authorization" in listed(r.headers["access-control-allow-headers"])  # mirrored, not a bare '*'
        r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers={"Origin": ELSEWHERE})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


# ---- real requests ----------------------------------------------------------------------------


def test_an_answer_to_an_allowed_origin_carries_its_allow_origin_and_exposes_the_request_id(cors_url):
    r = httpx.post(cors_url + "/v1/chat/completions", json=CHAT, headers={"Origin": FRONT_END})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert r.headers["access-control-allow-origin"] == FRONT_END
    assert {"x-request-id", "retry-after"} <= listed(r.headers["access-control-expose-headers"])
    assert r.headers["x-request-id"]
    other = httpx.post(cors_url + "/v1/chat/completions", json=CHAT, headers={"Origin": ELSEWHERE})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers  # the browser hides it


def test_a_stream_to_an_allowed_origin_carries_the_headers_and_streams_every_event(cors_url):
    with httpx.stream("POST", cors_url + "/v1/chat/completions", json={**CHAT, "stream": True},
                      headers={"Origin": FRONT_END}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == FRONT_END
        events = list(sse_data(r.iter_lines()))
    assert events[-1] == "[DONE]" and len(events) > 2
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])
    plain = httpx.post(cors_url + "/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
    assert text == plain


@pytest.mark.parametrize("request_kw, status", [
    ({"json": {**CHAT, "max_tokens": -1}}, 400),
    ({"content": b"x" * 5000, "headers": {"Content-Type": "application/json"}}, 413),
])
def test_errors_carry_the_allow_origin_so_the_page_can_read_them(cors_url, request_kw, status):
    headers = {"Origin": FRONT_END, **request_kw.pop("headers", {})}
    r = httpx.post(cors_url + "/v1/chat/completions", headers=headers, **request_kw)
    assert r.status_code == status and r.json()["error"]["message"]
    assert r.headers["access-control-allow-origin"] == FRONT_END


def test_even_the_last_resort_500_carries_the_allow_origin():
    app = create_app(FakeEngine(), ServerConfig(cors_allowed_origins=(FRONT_END,)))

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("a bug below every handler")

    with serve_in_thread(app) as url:
        r = httpx.get(url + "/v1/boom", headers={"Origin": FRONT_END})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers["access-control-allow-origin"] == FRONT_END


# ---- with an API key --------------------------------------------------------------------------


def test_with_an_api_key_the_preflight_passes_and_the_request_needs_the_key(keyed_url):
    r = preflight(keyed_url + "/v1/chat/completions", FRONT_END)  # a browser sends no key with it
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == FRONT_END
    assert "authorization" in listed(r.headers["access-control-allow-headers"])

    without = httpx.post(keyed_url + "/v1/chat/completions", json=CHAT, headers={"Origin": FRONT_END})
    assert without.status_code == 401 and without.json()["error"]["code"] == "invalid_api_key"
    assert without.headers["access-control-allow-origin"] == FRONT_END  # readable: the page can ask for a key

    with_key = httpx.post(keyed_url + "/v1/chat/completions", json=CHAT,
                          headers={"Origin": FRONT_END, "Authorization": f"Bearer {KEY}"})
    assert with_key.status_code == 200 and with_key.headers["access-control-allow-origin"] == FRONT_END


def test_an_options_request_that_is_no_preflight_still_needs_the_key(keyed_url):
    r = httpx.options(keyed_url + "/v1/models", headers={"Origin": FRONT_END})  # no Access-Control-Request-Method
    assert r.status_code == 401


# ---- configuration ----------------------------------------------------------------------------


def test_serve_flags_set_the_cors_settings_over_the_config():
    cfg = ServerConfig(cors_allowed_origins=("http://a.example",), cors_allow_credentials=True)
    args = build_parser().parse_args(["serve", "--cors-allowed-origins", FRONT_END, "http://127.0.0.1:5173",
                                      "--cors-allowed-methods", "post", "--cors-allowed-headers", "Authorization",
                                      "Content-Type", "--no-cors-allow-credentials"])
    s = server_settings(cfg, args, environ={})
    assert s.cors_allowed_origins == (FRONT_END, "http://127.0.0.1:5173")
    assert (s.cors_allowed_methods, s.cors_allowed_headers) == (("POST",), ("Authorization", "Content-Type"))
    assert s.cors_allow_credentials is False
    unset = server_settings(cfg, build_parser().parse_args(["serve"]), environ={})
    assert unset.cors_allowed_origins == ("http://a.example",) and unset.cors_allow_credentials is True


@pytest.mark.parametrize("bad, names", [
    ({"cors_allowed_origins": ["http://localhost:3000/"]}, "server.cors_allowed_origins"),
    ({"cors_allowed_origins": ["localhost:3000"]}, "server.cors_allowed_origins"),
    ({"cors_allowed_methods": ["FETCH"]}, "server.cors_allowed_methods"),
    ({"cors_allowed_origins": ["*"], "cors_allow_credentials": True}, "cors_allow_credentials"),
])
def test_a_bad_cors_setting_fails_at_start_naming_the_key(bad, names):
    from coolfusion.config import parse_config
    from coolfusion.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "m", "path": "HuggingFaceTB/SmolLM2-135M-Instruct"}], "server": bad})
    assert names in str(info.value)
