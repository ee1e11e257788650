"""OpenAI response and stream-chunk bodies, built from engine Steps (pure functions).

The fusion trace (request `"fusion": {"trace": true}`): a non-streamed response carries
`fusion_trace` at the top level, the steps of choice 0; when a response has more than one
choice (n > 1 or a list of prompts), every choice also carries its own `fusion_trace`.
In a stream every content chunk carries its step as `fusion_step`. A step is
`{"text", "winner", "eos", "candidates": [{"text", "proposed_by", "eos", "ppl": {model: value},
"mean_ppl"}]}`; a perplexity that is not finite is sent as null.

With `"fusion": {"judge": true}` every source model scores the whole answer after the
prompt: each choice (and, in a stream, the chunk that carries finish_reason) gets
`fusion_judge = {"ppl": {model: value}, "mean_ppl"}` (the paper's Table 3, first row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fusion.types import Step


@dataclass
class JobInfo:
    """What every body of one response shares."""

    kind: Literal["text", "chat"]
    id: str
    created: int
    model: str
    trace: bool


@dataclass
class ChoiceResult:
    index: int
    steps: list[Step] = field(default_factory=list)
    finish_reason: str = "stop"

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def completion_tokens(self) -> int:
        return self.steps[-1].completion_tokens if self.steps else 0


def trace_step(step: Step) -> dict[str, Any]:
    return {
        "text": step.text,
        "winner": step.winner,
        "eos": step.eos,
        "candidates": [
            {
                "text": c.text,
                "proposed_by": list(c.proposed_by),
                "eos": c.eos,
                "ppl": dict(c.ppl),
                "mean_ppl": c.mean_ppl,
            }
            for c in step.candidates
        ],
    }


def judge_of(steps) -> dict[str, Any] | None:
    last = steps[-1] if steps else None
    j = getattr(last, "judge", None)
    if j is None:
        return None
    return {"ppl": {k: _finite(v) for k, v in j.ppl.items()}, "mean_ppl": _finite(j.mean_ppl)}


def _finite(v):
    import math

    return v if v is not None and math.isfinite(v) else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _object(job: JobInfo, chunk: bool) -> str:
    if job.kind == "text":
        return "text_completion"
    return "chat.completion.chunk" if chunk else "chat.completion"


def _head(job: JobInfo, chunk: bool) -> dict[str, Any]:
    return {"id": job.id, "object": _object(job, chunk), "created": job.created, "model": job.model}


def response_body(job: JobInfo, results: list[ChoiceResult], prompt_tokens: int) -> dict[str, Any]:
    choices = []
    for r in results:
        choice: dict[str, Any] = {"index": r.index}
        if job.kind == "text":
            choice["text"] = r.text
        else:
            choice["message"] = {"role": "assistant", "content": r.text}
        choice["logprobs"] = None
        choice["finish_reason"] = r.finish_reason
        if job.trace and len(results) > 1:
            choice["fusion_trace"] = [trace_step(s) for s in r.steps]
        if judge_of(r.steps) is not None:
            choice["fusion_judge"] = judge_of(r.steps)
        choices.append(choice)
    body = _head(job, chunk=False)
    body["choices"] = choices
    body["usage"] = usage(prompt_tokens, sum(r.completion_tokens for r in results))
    if job.trace:
        body["fusion_trace"] = [trace_step(s) for s in results[0].steps] if results else []
    return body


def role_chunk(job: JobInfo, index: int) -> dict[str, Any]:
    """Chat streams open each choice with the assistant role (and empty content)."""
    body = _head(job, chunk=True)
    body["choices"] = [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    return body


def content_chunk(job: JobInfo, index: int, text: str, finish_reason: str | None, step: Step | None) -> dict[str, Any]:
    """One selected segment (or, with step=None, a bare finish) of choice `index`."""
    choice: dict[str, Any] = {"index": index}
    if job.kind == "text":
        choice["text"] = text
    else:
        choice["delta"] = {"content": text} if text or step is not None else {}
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    body = _head(job, chunk=True)
    body["choices"] = [choice]
    if job.trace and step is not None:
        body["fusion_step"] = trace_step(step)
    if step is not None and judge_of([step]) is not None:
        body["fusion_judge"] = judge_of([step])
    return body


def usage_chunk(job: JobInfo, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    body = _head(job, chunk=True)
    body["choices"] = []
    body["usage"] = usage(prompt_tokens, completion_tokens)
    return body
