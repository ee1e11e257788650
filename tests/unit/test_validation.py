"""Request checks without a model (coolfusion.core.validation), and the limits shared with the HTTP
schemas (coolfusion.core.limits): the engine and the API refuse the same values (fast tier)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

pytest.importorskip("fastapi")  # the server package; absent only on the bare GPU image of device_check.sh

from coolfusion.core import limits  # noqa: E402
from coolfusion.core.errors import ContextLengthExceeded, InvalidRequest  # noqa: E402
from coolfusion.core.types import GenerationRequest, Message  # noqa: E402
from coolfusion.core.validation import check_context, check_fields  # noqa: E402
from coolfusion.server.schemas import ChatCompletionRequest, CompletionRequest  # noqa: E402


@pytest.mark.parametrize("req, param", [
    (GenerationRequest(prompt="", max_tokens=4), "prompt"),
    (GenerationRequest(prompt="hi", max_tokens=0), "max_tokens"),
    (GenerationRequest(prompt="hi", max_tokens=4, temperature=limits.TEMPERATURE_MAX + 0.1), "temperature"),
    (GenerationRequest(prompt="hi", max_tokens=4, top_p=0.0), "top_p"),
    (GenerationRequest(prompt="hi", max_tokens=4, stop=("a",) * (limits.MAX_STOP + 1)), "stop"),
    (GenerationRequest(prompt="hi", max_tokens=4, stop=("",)), "stop"),
    (GenerationRequest(prompt="a\ud800", max_tokens=4), "prompt"),
    (GenerationRequest(messages=(Message("robot", "x"),), max_tokens=4), "messages.0.role"),
    (GenerationRequest(messages=(Message("system", "x"),), max_tokens=4), "messages"),
    (GenerationRequest(max_tokens=4), "prompt"),
])
def test_bad_fields_are_refused_naming_the_field(req, param):
    with pytest.raises(InvalidRequest) as err:
        check_fields(req)
    assert err.value.param == param


def test_good_fields_pass_at_the_limits():
    check_fields(GenerationRequest(prompt="hi", max_tokens=1, temperature=limits.TEMPERATURE_MAX, top_p=limits.TOP_P_MAX,
                                   stop=("x",) * limits.MAX_STOP))


def test_context_check_names_max_tokens_or_the_prompt():
    req = GenerationRequest(prompt="hi", max_tokens=10)
    check_context(req, "m", 90, 100)
    with pytest.raises(ContextLengthExceeded) as err:
        check_context(req, "m", 91, 100)
    assert err.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceeded) as err:
        check_context(req, "m", 100, 100)
    assert err.value.param == "prompt"


@pytest.mark.parametrize("field, bad, good", [
    ("temperature", limits.TEMPERATURE_MAX + 0.5, limits.TEMPERATURE_MAX),
    ("top_p", limits.TOP_P_MIN, limits.TOP_P_MAX),
    ("n", limits.MAX_N + 1, limits.MAX_N),
])  # stop strings' number, emptiness and text are checked once, by check_fields (above), for every request
def test_the_http_schemas_use_the_same_limits(field, bad, good):
    for model, base in ((CompletionRequest, {"prompt": "hi"}), (ChatCompletionRequest,
                                                               {"messages": [{"role": "user", "content": "hi"}]})):
        model.model_validate({**base, field: good})
        with pytest.raises(ValidationError):
            model.model_validate({**base, field: bad})
