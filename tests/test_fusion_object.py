"""The `fusion` object's keys (issue 27): declared once, documented, and nothing else accepted.

docs/api.md ("The fusion object") lists exactly the declared keys
(coolfusion.core.fusion_object.KEYS), and every row's example is accepted. An unknown key, a
misspelt known key and a known key with a bad value are each a 400 naming `fusion.<key>` on
both endpoints, streamed or not; an unknown key's message lists the keys. Real uvicorn on
loopback around the real engine: the refusals come before any model work, and the accepted
examples ask for one token (the streamed requests are parsed by the same request models).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from coolfusion.config import ServerConfig
from coolfusion.core.fusion_object import KEYS
from coolfusion.server.app import create_app
from coolfusion.server.testing import serve_in_thread

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
BASE = {"completions": {"prompt": "The capital of France is", "max_tokens": 1},
        "chat": {"messages": [{"role": "user", "content": "The capital of France is"}], "max_tokens": 1}}
CASES = [(ep, stream) for ep in ROUTES for stream in (False, True)]
CASE_IDS = [f"{ep}{'-stream' if stream else ''}" for ep, stream in CASES]

# a bad value of every key: pydantic's type checks (trace, judge, weights, score_end's values) and the
# engine's value checks (select, end_scoring; coolfusion.core.selection.check)
BAD_VALUES = {
    "trace": {"trace": "maybe"},
    "speculative": {"speculative": "maybe"},
    "judge": {"judge": [1]},
    "select": {"select": "median"},
    "weights": {"select": "weighted", "weights": 5},  # neither a mapping nor "auto"
    "end_scoring": {"end_scoring": "never"},
    "score_end": {"score_end": {"gemma3-270m": "sometimes"}},
}


def _documented() -> dict[str, dict]:
    """{key: its example fusion object}, from the table under "## The fusion object"."""
    lines = API_DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index("## The fusion object")
    rows, in_table = {}, False
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("| `"):
            key, example = (cell.strip() for cell in line.strip("|").split("|")[:2])
            rows[key.strip("`")] = json.loads(example.strip("`"))
            in_table = True
        elif in_table:
            break
    return rows


DOCUMENTED = _documented()


@pytest.fixture(scope="module")
def http(engine):
    with serve_in_thread(create_app(engine, ServerConfig())) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


def _post(http, endpoint: str, stream: bool, fusion) -> httpx.Response:
    return http.post(ROUTES[endpoint], json={**BASE[endpoint], "stream": stream, "fusion": fusion})


def _refused(r: httpx.Response, param: str) -> dict:
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")  # not a stream that began
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", param), err
    return err


def test_the_docs_table_lists_exactly_the_declared_keys():
    assert list(DOCUMENTED) == list(KEYS)
    for key, example in DOCUMENTED.items():
        assert key in example, f"the example of {key} does not use it"


def test_every_key_has_a_bad_value_under_test():
    assert set(BAD_VALUES) == set(KEYS)


@pytest.mark.parametrize("endpoint", ROUTES)
def test_every_documented_key_is_accepted(http, endpoint):
    for key, example in DOCUMENTED.items():
        r = _post(http, endpoint, False, example)
        assert r.status_code == 200, (key, r.text)
    # the fusion object refuses unknown keys; the top level keeps accepting OpenAI's newer fields
    r = http.post(ROUTES[endpoint], json={**BASE[endpoint], "a_newer_openai_field": {"x": 1}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("endpoint", "stream"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("key", ["selct", "traces", "rule", "temperature"])
def test_an_unknown_or_misspelt_key_is_a_400_naming_it_and_listing_the_keys(http, endpoint, stream, key):
    err = _refused(_post(http, endpoint, stream, {"trace": True, key: "min_ppl"}), f"fusion.{key}")
    assert err["code"] == "unknown_parameter"
    assert all(known in err["message"] for known in KEYS), err["message"]
    assert f"fusion.{key}" in err["message"]


def test_a_misspelt_key_is_told_its_likely_spelling(http):
    err = _refused(_post(http, "completions", False, {"selct": "min_ppl"}), "fusion.selct")
    assert "did you mean 'select'" in err["message"]


@pytest.mark.parametrize(("endpoint", "stream"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("key", list(BAD_VALUES))
def test_a_bad_value_of_a_known_key_is_a_400_naming_the_key(http, endpoint, stream, key):
    _refused(_post(http, endpoint, stream, BAD_VALUES[key]), f"fusion.{key}")
