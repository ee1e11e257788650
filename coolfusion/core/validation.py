"""Checking a `GenerationRequest` before any model work (limits from `coolfusion.core.limits`).

`check_fields` looks at the request alone (shape, text, sampling values, log-probs);
`check_token_ids` at a token-id prompt against the vocabulary it is in; `check_context`
at its prompt's token counts against each participating model's context limit. All raise
`InvalidRequest` / `ContextLengthExceeded` naming the offending field (`param`), so the
server can answer 400 before a stream starts.
"""

from __future__ import annotations

from coolfusion.core import limits
from coolfusion.core.errors import ContextLengthExceeded, InvalidRequest
from coolfusion.core.types import GenerationRequest


def check_fields(req: GenerationRequest, fused: bool = False) -> None:
    """Everything that can be checked without a tokenizer; `req.max_tokens` is resolved.
    `fused`: the model id is a fused variant (fewer log-prob alternatives, see limits)."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("give exactly one of prompt or messages", param="prompt")
    texts = []
    if req.prompt is not None:
        if not isinstance(req.prompt, str) or (req.prompt == "" and req.prompt_ids is None):
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
    if not isinstance(req.max_tokens, int) or req.max_tokens < 0 or (req.max_tokens == 0 and not req.echo):
        hint = " (0, to score the prompt only, needs echo: true)" if req.max_tokens == 0 else ""
        raise InvalidRequest(f"max_tokens must be a positive integer, not {req.max_tokens!r}{hint}", param="max_tokens")
    check_logprobs(req, fused)
    if not limits.TEMPERATURE_MIN <= req.temperature <= limits.TEMPERATURE_MAX:
        raise InvalidRequest(f"temperature must be between {limits.TEMPERATURE_MIN:g} and {limits.TEMPERATURE_MAX:g}",
                             param="temperature")
    if not limits.TOP_P_MIN < req.top_p <= limits.TOP_P_MAX:
        raise InvalidRequest(f"top_p must be in ({limits.TOP_P_MIN:g}, {limits.TOP_P_MAX:g}]", param="top_p")


def check_logprobs(req: GenerationRequest, fused: bool) -> None:
    """`logprobs` within its endpoint's range (chat: `top_logprobs`), `echo` on completions only,
    and what the fused ids cannot answer: more than one alternative per token, and alternatives
    on chat (an alternative is the fused id's own next token after a prefix of the text, which
    needs a completion prompt: a chat turn cannot be continued from inside)."""
    if req.echo and req.messages is not None:
        raise InvalidRequest("echo is only available on /v1/completions", param="echo")
    k = req.logprobs
    if k is None:
        return
    chat = req.messages is not None
    param, most = ("top_logprobs", limits.MAX_TOP_LOGPROBS) if chat else ("logprobs", limits.MAX_LOGPROBS)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= most:
        raise InvalidRequest(f"{param} must be an integer from 0 to {most}, not {k!r}", param=param)
    if fused and chat and k > 0:
        raise InvalidRequest(f"top_logprobs must be 0 for the fused model {req.model!r}: an alternative token is "
                             "the fused model's own next token after a prefix of the text, which a chat turn cannot "
                             "be continued from; use a source model id, or /v1/completions", param=param)
    if fused and k > limits.MAX_FUSED_LOGPROBS:
        raise InvalidRequest(f"logprobs must be at most {limits.MAX_FUSED_LOGPROBS} for the fused model "
                             f"{req.model!r}: its one alternative per token is the token the fused model itself "
                             "generates after the text before it (one fused generation per token); it has no "
                             "ranking of further alternatives. Source-model ids allow up to "
                             f"{limits.MAX_LOGPROBS}", param=param)


def check_token_ids(ids, vocab_size: int, name: str, where: str = "prompt") -> None:
    """Every id of a token-id prompt is a token of model `name` (0 <= id < vocab_size)."""
    if not ids:
        raise InvalidRequest(f"{where} must not be an empty list of token ids", param="prompt")
    for j, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidRequest(f"{where}[{j}]: token id {t!r} is out of range for model {name!r} "
                                 f"(vocabulary size {vocab_size})", param="prompt")


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
