"""The life of one completion request: validate -> admit -> generate -> respond.

`prepare` does every check that can fail with a 4xx (schema, engine.check: model, inputs,
context length) and takes an admission ticket (429 when full) BEFORE any response starts.
Then `collect` (non-streamed) or `stream_events` (SSE) runs the choices one after another
in the request's single generation slot. Choice i of prompt p has index p*n + i; with a seed,
choice i samples with seed + i, so choice 0 equals the same request with n = 1.

Timeout: the deadline (request_timeout_s from arrival) covers queueing and generation.
Reached while queued: 503 `queue_timeout` (in-band in a stream). Reached while generating:
the engine is cancelled and the choice ends early with finish_reason "length" and the text
so far, like llama.cpp's time limit. A shutdown ends a stream with an in-band
`server_shutting_down` error.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

import anyio

from coolfusion.core import limits
from coolfusion.core.errors import Cancelled, FusionError, InvalidRequest
from coolfusion.engine.client import Checked

from coolfusion.server.admission import Ticket
from coolfusion.server.errors import InternalError, ShuttingDown, dumps, in_band
from coolfusion.server.engine_thread import EngineThread, GenerationTimeout
from coolfusion.server.response_bodies import ChoiceResult, JobInfo, content_chunk, response_body, role_chunk, usage_chunk
from coolfusion.server.schemas import ChatCompletionRequest, CompletionRequest
from coolfusion.server.state import AppState

log = logging.getLogger("coolfusion.server")



@dataclass
class Job:
    info: JobInfo
    choices: list[Checked]  # checked once, here; the engine does not check them again
    prompt_tokens: int
    include_usage: bool
    deadline: float
    ticket: Ticket
    log_fields: dict[str, Any]
    current: EngineThread | None = None
    results: list[ChoiceResult] = field(default_factory=list)

    def cancel(self, reason: str) -> None:
        if self.current is not None:
            self.current.cancel(reason)

    def finish(self) -> None:
        """Give the slot back once the last engine thread has exited (its caches are freed)."""
        if self.current is None:
            self.ticket.release()
        else:
            self.current.when_exited(self.ticket.release)


def _choice_seed(seed: int | None, i: int) -> int | None:
    if seed is None or i == 0:
        return seed
    return (seed + i + 2**63) % 2**64 - 2**63  # stay inside int64


async def prepare(
    state: AppState,
    body: CompletionRequest | ChatCompletionRequest,
    log_fields: dict[str, Any],
) -> Job:
    """Validate against the engine and take an admission ticket; raise FusionError (4xx/5xx)."""
    deadline = asyncio.get_running_loop().time() + state.settings.request_timeout_s
    kind = "text" if isinstance(body, CompletionRequest) else "chat"
    log_fields.update(model=body.model, stream=bool(body.stream), n=body.choices_per_prompt)
    engine = state.require_engine()
    bases = body.base_requests(engine.default_max_tokens)  # config fusion.default_max_tokens
    n = body.choices_per_prompt
    if len(bases) * n > limits.MAX_CHOICES:
        raise InvalidRequest(f"at most {limits.MAX_CHOICES} choices (prompts x n) per request", param="n")
    checked = [await anyio.to_thread.run_sync(engine.check, req, where) for req, where in zip(bases, body.prompt_labels())]
    prompt_tokens = sum(c.prompt_tokens for c in checked)
    choices = [replace(c, request=replace(c.request, seed=_choice_seed(c.request.seed, i))) for c in checked for i in range(n)]
    try:
        ticket = state.admission.reserve()
    except FusionError as err:
        state.metrics.rejected.labels(err.code or "refused").inc()
        raise
    state.metrics.prompt_tokens.labels(body.model).inc(prompt_tokens)
    prefix = "cmpl" if kind == "text" else "chatcmpl"
    info = JobInfo(kind=kind, id=f"{prefix}-{uuid.uuid4().hex}", created=state.created, model=body.model, trace=body.wants_trace,
                   logprobs=body.wants_logprobs)
    log_fields.update(id=info.id, prompt_tokens=prompt_tokens)
    return Job(info, choices, prompt_tokens, body.wants_usage_chunk, deadline, ticket, log_fields)


async def _run_choice(state: AppState, job: Job, index: int) -> AsyncIterator[Any]:
    """Yield the Steps of choice `index`, then its ChoiceResult (always last)."""
    result = ChoiceResult(index)
    job.results.append(result)
    if asyncio.get_running_loop().time() >= job.deadline:
        result.finish_reason = "length"
        job.log_fields["timed_out"] = True
        yield result
        return
    if job.current is not None:
        await job.current.wait_exited()  # one slot, one engine generation at a time
    job.current = state.start_generation(job.choices[index], name=job.info.id)
    try:
        async with aclosing(job.current.steps(job.deadline)) as steps:
            async for step in steps:
                result.steps.append(step)
                yield step
        last = result.steps[-1].finish_reason if result.steps else None
        result.finish_reason = last or "stop"
    except GenerationTimeout:
        result.finish_reason = "length"
        job.log_fields["timed_out"] = True
    except Cancelled as err:
        if err.code == "shutdown":
            raise ShuttingDown("the server is shutting down; the generation was stopped") from None
        raise
    yield result


def _as_fusion_error(err: Exception) -> FusionError:
    """FusionErrors pass through; anything else is a bug here: logged, sent as a plain 500."""
    if isinstance(err, FusionError):
        return err
    log.error("request failed: %s: %s", type(err).__name__, err, exc_info=err)
    return InternalError("internal error; see the server log")


async def collect(state: AppState, job: Job) -> dict[str, Any]:
    """Run every choice to the end; the OpenAI response body."""
    try:
        await job.ticket.acquire(job.deadline)
        for i in range(len(job.choices)):
            async with aclosing(_run_choice(state, job, i)) as items:
                async for _ in items:
                    pass
    except FusionError:
        raise
    except Exception as err:
        raise _as_fusion_error(err) from err
    finally:
        job.finish()
    _log_result(job)
    return response_body(job.info, job.results, job.prompt_tokens)


async def stream_events(state: AppState, job: Job) -> AsyncIterator[str]:
    """SSE `data:` payloads: one chunk per Step as soon as it is selected, then [DONE]."""
    info = job.info
    try:
        await job.ticket.acquire(job.deadline)
        for i in range(len(job.choices)):
            if info.kind == "chat":
                yield dumps(role_chunk(info, i))
            async with aclosing(_run_choice(state, job, i)) as items:
                async for item in items:
                    if not isinstance(item, ChoiceResult):
                        yield dumps(content_chunk(info, i, item.text, item.finish_reason, item))
                    elif not item.steps or item.steps[-1].finish_reason is None:
                        yield dumps(content_chunk(info, i, "", item.finish_reason, None))  # timeout
        if job.include_usage:
            completion = sum(r.completion_tokens for r in job.results)
            yield dumps(usage_chunk(info, job.prompt_tokens, completion))
        _log_result(job)
    except Exception as err:
        fe = _as_fusion_error(err)
        job.log_fields.update(error=fe.code or fe.type)
        state.metrics.stream_errors.labels(fe.code or fe.type).inc()
        yield in_band(fe)
    except BaseException:  # client gone (task cancelled / stream closed): stop the engine now
        job.log_fields["outcome"] = "client_disconnected"
        job.cancel("disconnect")
        raise
    finally:
        job.finish()
    yield "[DONE]"


def _log_result(job: Job) -> None:
    job.log_fields.update(
        completion_tokens=sum(r.completion_tokens for r in job.results),
        finish_reason=",".join(sorted({r.finish_reason for r in job.results})),
    )
