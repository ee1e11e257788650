"""The API page's tables of refused and accepted request fields, sent row by row (issue 15).

A refused field gets a 400 naming it (`param`) with code `unsupported_parameter`; its no-op
values, listed on that page, are accepted and change nothing; so do the accepted fields.
The tables are read from docs/api.md ("Request fields"), and their refused fields must be
exactly the ones the request models refuse (coolfusion.server.schemas.REFUSED_FIELDS), so the
docs and the code stay in step.
Real uvicorn on loopback around the fake engine (only HTTP and validation are under test).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from fakes import FakeEngine

from coolfusion.config import ServerConfig
from coolfusion.server.app import create_app
from coolfusion.server.schemas import REFUSED_FIELDS, ChatCompletionRequest, CompletionRequest
from coolfusion.server.testing import serve_in_thread

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
BASE = {"completions": {"prompt": "hello there", "max_tokens": 5},
        "chat": {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}}
MODELS = {"completions": CompletionRequest, "chat": ChatCompletionRequest}

# a value of each refused field that would change the output (docs/api.md lists the no-ops)
CHANGING = {
    "best_of": 3,
    "suffix": " the end",
    "logit_bias": {"50256": -100},
    "presence_penalty": 0.5,
    "frequency_penalty": -1,
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "functions": [{"name": "get_weather", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "reasoning_effort": "high",
    "web_search_options": {},
}


def _table(heading: str) -> list[list[str]]:
    """Rows of the docs/api.md table whose header row starts with `| heading |`."""
    lines = API_DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {heading} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _code_spans(cell: str) -> list:
    return [json.loads(v) for v in re.findall(r"`([^`]*)`", cell)]


def _endpoints(cell: str) -> list[str]:
    return list(ROUTES) if cell == "both" else [cell]


REFUSED = [(f.strip("`"), ep, _code_spans(noops)) for f, eps, noops in _table("refused field")
           for ep in _endpoints(eps)]
ACCEPTED = [(f.strip("`"), ep, _code_spans(example)[0]) for f, eps, example in _table("accepted field")
            for ep in _endpoints(eps)]


@pytest.fixture(scope="module")
def http():
    with serve_in_thread(create_app(FakeEngine(), ServerConfig())) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def _body(endpoint: str, **fields) -> dict:
    return {**BASE[endpoint], **fields}


def test_the_readme_lists_exactly_the_fields_the_code_refuses():
    assert {f for f, _, _ in REFUSED} == REFUSED_FIELDS == set(CHANGING)
    assert len(ACCEPTED) >= 6 and not {f for f, _, _ in ACCEPTED} & REFUSED_FIELDS


@pytest.mark.parametrize(("field", "endpoint", "noops"), REFUSED, ids=[f"{e}-{f}" for f, e, _ in REFUSED])
def test_a_refused_field_is_400_unsupported_parameter_naming_it(http, field, endpoint, noops):
    value = CHANGING[field]
    value = value[endpoint] if isinstance(value, dict) and endpoint in value else value
    r = http.post(ROUTES[endpoint], json=_body(endpoint, **{field: value}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (field, "unsupported_parameter", "invalid_request_error")
    assert field in err["message"]
    # also when it comes with other, valid fields and in a stream (checked before it starts)
    r = http.post(ROUTES[endpoint], json=_body(endpoint, stream=True, temperature=0.5, **{field: value}))
    assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.mark.parametrize(("field", "endpoint", "noops"), REFUSED, ids=[f"{e}-{f}" for f, e, _ in REFUSED])
def test_null_and_the_no_op_values_of_a_refused_field_change_nothing(http, field, endpoint, noops):
    plain = http.post(ROUTES[endpoint], json=_body(endpoint))
    assert plain.status_code == 200, plain.text
    for value in [None, *noops]:
        body = _body(endpoint, **{field: value})
        r = http.post(ROUTES[endpoint], json=body)
        assert r.status_code == 200, (value, r.text)
        assert r.json()["choices"] == plain.json()["choices"], value
        # the engine gets the very same request as without the field
        model = MODELS[endpoint]
        assert model.model_validate(body).base_requests(16) == model.model_validate(_body(endpoint)).base_requests(16)


@pytest.mark.parametrize(("field", "endpoint", "example"), ACCEPTED, ids=[f"{e}-{f}" for f, e, _ in ACCEPTED])
def test_an_accepted_field_gives_200_and_changes_nothing(http, field, endpoint, example):
    plain = http.post(ROUTES[endpoint], json=_body(endpoint)).json()
    r = http.post(ROUTES[endpoint], json=_body(endpoint, **{field: example}))
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == plain["choices"]
    model = MODELS[endpoint]
    assert (model.model_validate(_body(endpoint, **{field: example})).base_requests(16)
            == model.model_validate(_body(endpoint)).base_requests(16))


def test_a_refused_value_is_not_smuggled_past_as_a_look_alike(http):
    """No-op values compare by type: `false` is not the `0` of a penalty, `"none "` is not `"none"`."""
    for endpoint, field, value in [("chat", "presence_penalty", False), ("chat", "tool_choice", "none "),
                                   ("chat", "response_format", {"type": "text", "strict": True}),
                                   ("completions", "best_of", True), ("chat", "tools", [{}])]:
        r = http.post(ROUTES[endpoint], json=_body(endpoint, **{field: value}))
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
