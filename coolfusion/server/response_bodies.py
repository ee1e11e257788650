"""OpenAI response bodies and stream chunks: the pydantic models that the OpenAPI document
shows, and the functions that build every body the server sends from them (so the schema
cannot drift from the wire). Field order is the wire order.

The fusion trace (request `"fusion": {"trace": true}`): a non-streamed response carries
`fusion_trace` at the top level, the steps of choice 0; when a response has more than one
choice (n > 1 or a list of prompts), every choice also carries its own `fusion_trace`.
In a stream every content chunk carries its step as `fusion_step`. A step is
`{"text", "winner", "eos", "candidates": [{"text", "proposed_by", "eos", "ppl": {model: value},
"mean_ppl", "score"}], "selection": {"rule", "weights"}}`: `ppl` holds the models that voted,
`score` the selection rule's combination of them (the winner has the lowest), `selection`
the rule (fused ids only; `weights` for `weighted`). A perplexity that is not finite is sent
as null (`coolfusion.server.errors.dumps`). With speculative proposals (docs/speculative.md) a
step that drafted also carries `"speculation": {"drafter", "checked": {model: n}, "accepted":
{model: n}}`: who drafted, and per other model the draft tokens its check fed and accepted (a
step under load, `fusion.speculative_max_requests`, proposes plainly and carries none).

Log-probs (request `logprobs`, and `echo` on completions) come from the engine's Steps
(coolfusion.engine.likelihood): completions carry OpenAI's legacy shape `{"tokens", "token_logprobs",
"top_logprobs", "text_offset"}`, chat the shape `{"content": [{"token", "logprob", "bytes",
"top_logprobs"}]}`; a stream chunk carries those of its own text. With `echo` the choice's
text (and a stream's first chunk) starts with the prompt.

With `"fusion": {"judge": true}` every source model scores the whole answer after the
prompt: each choice (and, in a stream, the chunk that carries finish_reason) gets
`fusion_judge = {"ppl": {model: value}, "mean_ppl", "score", "selection"}` (the paper's
Table 3, first row; `score` under the request's selection rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from coolfusion.core.types import FinishReason, Step, TokenLogprob

# ---- the models ---------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, before a response starts (HTTP status) or in-band in a stream."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class TraceCandidate(BaseModel):
    text: str
    proposed_by: list[str]
    eos: bool
    ppl: dict[str, float | None]  # a perplexity that is not finite is sent as null
    mean_ppl: float | None
    score: float | None = None  # the selection rule's combined score (lowest wins)


class SelectionTrace(BaseModel):
    """The rule that chose (coolfusion/core/selection.py): `weights` only for `weighted`."""

    rule: str
    weights: dict[str, float] | None = None


class Speculation(BaseModel):
    """Who drafted a step's proposals and how much of the draft each other model accepted."""

    drafter: str
    checked: dict[str, int]  # per other model: its tokens of the draft fed to its check forward
    accepted: dict[str, int]  # ... of them, its own greedy tokens up to the first disagreement


class TraceStep(BaseModel):
    text: str
    winner: str
    eos: bool
    candidates: list[TraceCandidate]
    selection: SelectionTrace | None = None  # fused ids: the rule and weights of every decision
    speculation: Speculation | None = None  # speculative proposals only


class Judge(BaseModel):
    ppl: dict[str, float | None]
    mean_ppl: float | None
    score: float | None = None  # under the request's selection rule
    selection: SelectionTrace | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token; the prompt's first token has nulls."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # null when the token is part of a character (its text is U+FFFD)


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason
    fusion_trace: list[TraceStep] | None = None  # per choice when n > 1 and trace is on
    fusion_judge: Judge | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason
    fusion_trace: list[TraceStep] | None = None
    fusion_judge: Judge | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    fusion_trace: list[TraceStep] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    fusion_trace: list[TraceStep] | None = None


class CompletionChunkChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None  # only in the last chunk, with stream_options.include_usage
    fusion_step: TraceStep | None = None
    fusion_judge: Judge | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    fusion_step: TraceStep | None = None
    fusion_judge: Judge | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "error", "shutting_down"]
    error: str | None = None


# ---- building bodies ------------------------------------------------------------------------------


@dataclass
class JobInfo:
    """What every body of one response shares."""

    kind: Literal["text", "chat"]
    id: str
    created: int
    model: str
    trace: bool
    logprobs: bool = False  # the request asked for log-probs


@dataclass
class ChoiceResult:
    index: int
    steps: list[Step] = field(default_factory=list)
    finish_reason: str = "stop"

    @property
    def text(self) -> str:
        return "".join(s.echo + s.text for s in self.steps)

    @property
    def completion_tokens(self) -> int:
        return self.steps[-1].completion_tokens if self.steps else 0


def _wire(m: BaseModel) -> dict[str, Any]:
    """The body as sent: the fields that were set (optional extensions only when present)."""
    return m.model_dump(exclude_unset=True)


def trace_step(step: Step) -> TraceStep:
    extra = {"selection": SelectionTrace(**step.selection)} if step.selection is not None else {}
    if step.speculation is not None:
        extra["speculation"] = Speculation(**step.speculation)
    return TraceStep(text=step.text, winner=step.winner, eos=step.eos, candidates=[
        TraceCandidate(text=c.text, proposed_by=list(c.proposed_by), eos=c.eos, ppl=dict(c.ppl), mean_ppl=c.mean_ppl,
                       score=c.score)
        for c in step.candidates], **extra)


def judge_of(steps) -> Judge | None:
    last = steps[-1] if steps else None
    j = getattr(last, "judge", None)
    if j is None:
        return None
    extra = {"selection": SelectionTrace(**last.selection)} if last.selection is not None else {}
    return Judge(ppl={k: _finite(v) for k, v in j.ppl.items()}, mean_ppl=_finite(j.mean_ppl),
                 score=_finite(j.score), **extra)


def _finite(v):
    return v if v is not None and math.isfinite(v) else None


def logprobs_of(job: JobInfo, steps) -> CompletionLogprobs | ChatLogprobs | None:
    """The log-probs of these steps' tokens in the job's shape (None unless asked for)."""
    if not job.logprobs:
        return None
    entries: list[TokenLogprob] = [e for s in steps for e in s.logprobs]
    if job.kind == "text":
        tops = [None if e.top is None else _top_dict(e.top) for e in entries]
        return CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                                  top_logprobs=tops, text_offset=[e.offset for e in entries])
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=_bytes(e.token),
                         top_logprobs=[TopLogprob(token=t, logprob=v, bytes=_bytes(t)) for t, v in e.top or ()])
        for e in entries])


def _top_dict(top) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, value in top:  # most likely first; two ids with one text keep the likelier
        out.setdefault(token, value)
    return out


def _bytes(token: str) -> list[int] | None:
    return None if "\ufffd" in token else list(token.encode("utf-8"))


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _head(job: JobInfo, chunk: bool) -> dict[str, Any]:
    if job.kind == "text":
        obj = "text_completion"
    else:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model}


def response_body(job: JobInfo, results: list[ChoiceResult], prompt_tokens: int) -> dict[str, Any]:
    choices = []
    for r in results:
        extras: dict[str, Any] = {}
        if job.trace and len(results) > 1:
            extras["fusion_trace"] = [trace_step(s) for s in r.steps]
        judge = judge_of(r.steps)
        if judge is not None:
            extras["fusion_judge"] = judge
        lp = logprobs_of(job, r.steps)
        if job.kind == "text":
            choices.append(CompletionChoice(index=r.index, text=r.text, logprobs=lp, finish_reason=r.finish_reason,
                                            **extras))
        else:
            message = AssistantMessage(role="assistant", content=r.text)
            choices.append(ChatChoice(index=r.index, message=message, logprobs=lp, finish_reason=r.finish_reason,
                                      **extras))
    top: dict[str, Any] = {}
    if job.trace:
        top["fusion_trace"] = [trace_step(s) for s in results[0].steps] if results else []
    model = CompletionResponse if job.kind == "text" else ChatCompletionResponse
    return _wire(model(**_head(job, chunk=False), choices=choices,
                       usage=usage(prompt_tokens, sum(r.completion_tokens for r in results)), **top))


def _chunk(job: JobInfo, choices: list, **extras) -> dict[str, Any]:
    model = CompletionChunk if job.kind == "text" else ChatCompletionChunk
    return _wire(model(**_head(job, chunk=True), choices=choices, **extras))


def role_chunk(job: JobInfo, index: int) -> dict[str, Any]:
    """Chat streams open each choice with the assistant role (and empty content)."""
    delta = ChatDelta(role="assistant", content="")
    return _chunk(job, [ChatChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=None)])


def content_chunk(job: JobInfo, index: int, text: str, finish_reason: str | None, step: Step | None) -> dict[str, Any]:
    """One selected segment (or, with step=None, a bare finish) of choice `index`; with echo,
    the first one starts with the prompt."""
    lp = logprobs_of(job, [step] if step is not None else [])
    if job.kind == "text":
        text = (step.echo if step is not None else "") + text
        choice: Any = CompletionChunkChoice(index=index, text=text, logprobs=lp, finish_reason=finish_reason)
    else:
        delta = ChatDelta(content=text) if text or step is not None else ChatDelta()
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish_reason)
    extras: dict[str, Any] = {}
    if job.trace and step is not None:
        extras["fusion_step"] = trace_step(step)
    judge = judge_of([step]) if step is not None else None
    if judge is not None:
        extras["fusion_judge"] = judge
    return _chunk(job, [choice], **extras)


def usage_chunk(job: JobInfo, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return _chunk(job, [], usage=usage(prompt_tokens, completion_tokens))


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return _wire(ModelCard(id=model_id, object="model", created=created, owned_by="coolfusion"))


def model_list(model_ids: list[str], created: int) -> dict[str, Any]:
    return _wire(ModelList(object="list", data=[ModelCard(id=m, object="model", created=created, owned_by="coolfusion")
                                                for m in model_ids]))


def health_body(status: str, error: str | None = None) -> dict[str, Any]:
    return _wire(Health(status=status) if error is None else Health(status=status, error=error))


def sse_event_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of one server-sent event of a stream (as OpenAPI tools read an event:
    an object whose `data` is the payload): a JSON `chunk`, an in-band error, or `[DONE]`."""
    payload = {"anyOf": [_inline(chunk.model_json_schema()), _inline(ErrorResponse.model_json_schema())]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
        ]}},
    }


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its local `$defs` references substituted (no cycles here)."""
    defs = schema.pop("$defs", {})

    def sub(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return sub(dict(defs[ref.removeprefix("#/$defs/")]))
            return {k: sub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v) for v in node]
        return node

    return sub(schema)
