"""Checking a `GenerationRequest` before any model work (limits from `fusion.limits`).

`check_fields` looks at the request alone (shape, text, sampling values); `check_context`
at its prompt's token counts against each participating model's context limit. Both raise
`InvalidRequest` / `ContextLengthExceeded` naming the offending field (`param`), so the
server can answer 400 before a stream starts.
"""

from __future__ import annotations

from . import limits
from .errors import ContextLengthExceeded, InvalidRequest
from .types import GenerationRequest


def check_fields(req: GenerationRequest) -> None:
    """Everything that can be checked without a tokenizer; `req.max_tokens` is resolved."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("give exactly one of prompt or messages", param="prompt")
    texts = []
    if req.prompt is not None:
        if not isinstance(req.prompt, str) or req.prompt == "":
            raise InvalidRequest("prompt must be a non-empty string", param="prompt")
        texts.append(("prompt", req.prompt))
    else:
        if not req.messages:
            raise InvalidRequest("messages must be a non-empty list", param="messages")
        for i, m in enumerate(req.messages):
            if m.role not in limits.ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(limits.ROLES)}, not {m.role!r}",
                                     param=f"messages.{i}.role")
            if not isinstance(m.content, str):
                raise InvalidRequest(f"messages[{i}].content must be text", param=f"messages.{i}.content")
            texts.append((f"messages.{i}.content", m.content))
        if all(m.role == "system" for m in req.messages):
            raise InvalidRequest("messages need at least one user or assistant turn", param="messages")
    for i, s in enumerate(req.stop):
        if not isinstance(s, str) or s == "":
            raise InvalidRequest("stop strings must be non-empty", param="stop")
        texts.append((f"stop.{i}", s))
    if len(req.stop) > limits.MAX_STOP:
        raise InvalidRequest(f"at most {limits.MAX_STOP} stop sequences", param="stop")
    for param, t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"{param} is not valid Unicode text (lone surrogate)", param=param) from None
    if not isinstance(req.max_tokens, int) or req.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be a positive integer, not {req.max_tokens!r}", param="max_tokens")
    if not limits.TEMPERATURE_MIN <= req.temperature <= limits.TEMPERATURE_MAX:
        raise InvalidRequest(f"temperature must be between {limits.TEMPERATURE_MIN:g} and {limits.TEMPERATURE_MAX:g}",
                             param="temperature")
    if not limits.TOP_P_MIN < req.top_p <= limits.TOP_P_MAX:
        raise InvalidRequest(f"top_p must be in ({limits.TOP_P_MIN:g}, {limits.TOP_P_MAX:g}]", param="top_p")


def check_context(req: GenerationRequest, name: str, prompt_tokens: int, context_limit: int | None) -> None:
    """The prompt of model `name` is not empty and, with max_tokens, fits its context."""
    if prompt_tokens == 0:
        raise InvalidRequest(f"prompt is empty for model {name!r} after tokenization", param="prompt")
    if context_limit and prompt_tokens + req.max_tokens > context_limit:
        raise ContextLengthExceeded(
            f"This request needs {prompt_tokens} prompt tokens + max_tokens {req.max_tokens} = "
            f"{prompt_tokens + req.max_tokens} tokens, but model {name!r} has a context limit of "
            f"{context_limit} tokens.",
            param="max_tokens" if prompt_tokens < context_limit else "messages" if req.messages else "prompt")
