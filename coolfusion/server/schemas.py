"""OpenAI request bodies (pydantic) and their translation into engine requests.

OpenAI fields that would change the output but are not implemented (tools, response_format,
logit_bias, penalties, best_of, suffix, ...) are refused with a 400 `unsupported_parameter`
naming the field; each one's no-op values (`tools: []`, `presence_penalty: 0`, ...) are
accepted. Fields that change nothing here (`user`, `metadata`, `store`, `service_tier`,
`parallel_tool_calls`, ...) are accepted, and so are fields OpenAI does not define
(`extra="allow"`), as clients send many. docs/api.md ("Request fields") lists them; a test
goes through that list. `logprobs` / `echo` (completions) and `logprobs` / `top_logprobs`
(chat) are passed to the engine, which checks what each model id can answer
(coolfusion.core.validation.check_logprobs). A completion prompt may be token ids (a list of ints, or
a list of such lists) in the reference tokenizer of the model id. Omitted sampling fields
keep the engine's defaults (greedy). Our
extension, the `fusion` object, is parsed into coolfusion.core.fusion_object.FusionOptions,
which declares its keys (docs/api.md, "The fusion object"); an unknown key in it is a 400
naming `fusion.<key>`, before any model work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from coolfusion.core import limits
from coolfusion.core.errors import InvalidRequest
from coolfusion.core.fusion_object import FusionOptions, check_keys
from coolfusion.core.types import COOL, GenerationRequest, Message

from coolfusion.server.errors import UNSUPPORTED_PARAMETER

_OPEN = ConfigDict(extra="allow")




class StreamOptions(BaseModel):
    model_config = _OPEN
    include_usage: bool | None = False


REFUSED_FIELDS: set[str] = set()  # every field some request model refuses (filled by _unsupported)


def _unsupported(name: str, *allowed: Any):
    """A validator refusing every value of `name` except None and the no-op `allowed` ones
    (compared by type and value, so `False` does not pass for `0`)."""
    REFUSED_FIELDS.add(name)

    def check(cls, v: Any) -> Any:
        if v is None or any(type(v) is type(a) and v == a for a in allowed):
            return v
        raise PydanticCustomError(UNSUPPORTED_PARAMETER, "'{name}' is not supported by this server", {"name": name})

    return field_validator(name, mode="before")(classmethod(check))


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _OPEN

    model: str = COOL
    temperature: float | None = Field(default=None, ge=limits.TEMPERATURE_MIN, le=limits.TEMPERATURE_MAX)
    top_p: float | None = Field(default=None, gt=limits.TOP_P_MIN, le=limits.TOP_P_MAX)
    seed: int | None = Field(default=None, ge=limits.SEED_MIN, le=limits.SEED_MAX)
    stop: str | list[str] | None = None
    n: int | None = Field(default=1, ge=1, le=limits.MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, changes nothing (as metadata, store, service_tier, ...)
    fusion: FusionOptions | None = None
    # not implemented, refused unless they are no-ops (docs/api.md "Request fields")
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    _no_logit_bias = _unsupported("logit_bias", {})
    _no_presence_penalty = _unsupported("presence_penalty", 0, 0.0)
    _no_frequency_penalty = _unsupported("frequency_penalty", 0, 0.0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None:
            return v
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("stop must be a string or a list of strings")
        return v  # their number, emptiness and text: coolfusion.core.validation, as for every request

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        """The one text the engine's checks never see as text (it names a model or is unknown):
        a lone surrogate in it is refused here, before it reaches an error message or a log."""
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("model is not valid Unicode text (lone surrogate)") from None
        return v

    @field_validator("fusion", mode="before")
    @classmethod
    def _fusion_keys(cls, v: Any) -> Any:
        if isinstance(v, dict):
            check_keys(v)  # an unknown key: InvalidRequest, which pydantic lets through to the handler
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def wants_trace(self) -> bool:
        return bool(self.fusion and self.fusion.trace)

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None) -> dict[str, Any]:
        """Keyword arguments for GenerationRequest; omitted fields keep the engine's defaults."""
        kw: dict[str, Any] = {"model": self.model, "stop": self.stop_tuple(), "trace": self.wants_trace,
                              "judge": bool(self.fusion and self.fusion.judge)}
        if self.fusion is not None:
            kw["selection"] = self.fusion.selection()
            if self.fusion.speculative is not None:
                kw["speculative"] = self.fusion.speculative
        for name in ("temperature", "top_p", "seed"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if max_tokens is not None:
            kw["max_tokens"] = max_tokens
        return kw


def _int(v: Any, name: str) -> Any:
    """An integer field that JSON `true`/`false` must not pass for (pydantic would take 1/0)."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, not a boolean")  # noqa: TRY004 (pydantic wants ValueError)
    return v


def _token_ids(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


class CompletionRequest(_Common):
    """POST /v1/completions: one choice per prompt x n, in that order."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo (the engine checks)
    logprobs: int | None = Field(default=None, ge=0, le=limits.MAX_LOGPROBS)  # per model id: engine.check
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    _no_best_of = _unsupported("best_of", 1)
    _no_suffix = _unsupported("suffix", "")

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v: Any) -> Any:
        return _int(v, "logprobs")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v  # its text is checked with the rest of the request (coolfusion.core.validation)
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and all(isinstance(p, str) for p in v):
            return v
        if _token_ids(v) or (isinstance(v, list) and all(_token_ids(p) for p in v)):
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers) "
                         "or a list of non-empty lists of token ids")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str) or _token_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)

    def prompt_labels(self) -> list[str]:
        """How errors name each prompt: `prompt`, or `prompt[i]` of a list of prompts."""
        one = isinstance(self.prompt, str) or _token_ids(self.prompt)
        return ["prompt"] if one else [f"prompt[{i}]" for i in range(len(self.prompt))]

    def base_requests(self, default_max_tokens: int | None) -> list[GenerationRequest]:
        """One engine request per prompt (choices are these repeated n times)."""
        kw = self._sampling(self.max_tokens if self.max_tokens is not None else default_max_tokens)
        kw.update(logprobs=self.logprobs, echo=bool(self.echo))
        return [GenerationRequest(prompt=p, **kw) if isinstance(p, str) else
                GenerationRequest(prompt_ids=tuple(p), **kw) for p in self.prompts()]

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None


class TextPart(BaseModel):
    model_config = _OPEN
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _OPEN
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("content is required (tool calls are not supported)")
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported (got type {kind!r})")
            return v
        raise ValueError("content must be a string or a list of text parts")

    def to_message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=text)


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions: n choices for one conversation."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=limits.MAX_TOP_LOGPROBS)  # per model id: engine.check
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    _no_tools = _unsupported("tools", [])
    _no_tool_choice = _unsupported("tool_choice", "none")
    _no_functions = _unsupported("functions", [])
    _no_function_call = _unsupported("function_call", "none")
    _no_response_format = _unsupported("response_format", {"type": "text"})
    _no_modalities = _unsupported("modalities", ["text"])
    _no_audio = _unsupported("audio")
    _no_reasoning_effort = _unsupported("reasoning_effort")
    _no_web_search_options = _unsupported("web_search_options")

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _top_logprobs(cls, v: Any) -> Any:
        return _int(v, "top_logprobs")

    def base_requests(self, default_max_tokens: int | None) -> list[GenerationRequest]:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        kw = self._sampling(limit if limit is not None else default_max_tokens)
        if self.top_logprobs and not self.logprobs:  # 0 without logprobs is accepted: it asks for nothing
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        kw["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return [GenerationRequest(messages=tuple(m.to_message() for m in self.messages), **kw)]

    def prompt_labels(self) -> list[str]:
        return ["messages"]

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)
