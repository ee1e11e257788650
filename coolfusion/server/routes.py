"""HTTP routes: health, metrics, models, completions and chat completions.

Routes are thin: they get the AppState by dependency injection, hand the parsed body to
`request_lifecycle.prepare` (every 4xx happens there, before a response starts), then either stream
(sse-starlette, one chunk per selected segment) or wait for the whole result while watching
for the client to go away (then the generation is cancelled and 499 is logged).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette import EventSourceResponse

from coolfusion.core.errors import UnknownModel

from coolfusion.server.errors import dumps
from coolfusion.server.request_lifecycle import Job, collect, prepare, stream_events
from coolfusion.server.response_bodies import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    model_card,
    model_list,
    sse_event_schema,
)
from coolfusion.server.schemas import ChatCompletionRequest, CompletionRequest
from coolfusion.server.state import AppState, get_state

router = APIRouter()

# ---- documented responses (the OpenAPI schema; every error body is coolfusion.server.errors' shape) ----

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Client error (400 invalid request or context_length_exceeded, "
            "401 missing or wrong API key, 404 unknown model or route, 413 body too large)"},
    429: {"model": ErrorResponse, "description": "Overloaded: every slot and queue place is taken", "headers": _RETRY_AFTER},
    503: {"model": ErrorResponse, "description": "Engine loading or broken, queue timeout, or shutting down",
          "headers": _RETRY_AFTER},
}


def _errors(*codes: int | str) -> dict[int | str, dict[str, Any]]:
    return {c: _ERRORS[c] for c in codes}


def _generation_responses(body: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    stream = {"schema": sse_event_schema(chunk)}
    return {200: {"model": body, "description": "The completion; with `stream: true`, server-sent events "
                  "(one chunk per fused segment, then `[DONE]`; an error after the start comes in-band)",
                  "content": {"text/event-stream": stream}},
            **_errors("4XX", 429, 503)}


@router.get("/health", summary="200 when the engine is ready, 503 while loading, broken or stopping",
            responses={200: {"model": Health}, 503: {"model": Health, "description": "Not ready"}})
async def health(state: AppState = Depends(get_state)) -> JSONResponse:
    status, body = state.health()
    return JSONResponse(body, status_code=status)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses={"4XX": {"description": _ERRORS["4XX"]["description"],
                               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}})
async def metrics(state: AppState = Depends(get_state)) -> Response:
    if state.engine is not None:
        state.metrics.on_kv(state.engine.kv_report())
    return Response(state.metrics.render(), media_type=state.metrics.content_type)




@router.get("/v1/models", summary="The fused variants and every source model", response_model=None,
            responses={200: {"model": ModelList}, **_errors("4XX", 503)})
async def list_models(state: AppState = Depends(get_state)) -> dict[str, Any]:
    engine = state.require_engine()
    return model_list(engine.model_ids(), state.created)


@router.get("/v1/models/{model_id:path}", summary="One model", response_model=None,
            responses={200: {"model": ModelCard}, **_errors("4XX", 503)})
async def get_model(model_id: str, state: AppState = Depends(get_state)) -> dict[str, Any]:
    engine = state.require_engine()
    if model_id not in engine.model_ids():
        raise UnknownModel(f"The model '{model_id}' does not exist", param="model")
    return model_card(model_id, state.created)


@router.post("/v1/completions", summary="Text completion (OpenAI-compatible), streamed per fused segment",
             responses=_generation_responses(CompletionResponse, CompletionChunk))
async def completions(body: CompletionRequest, request: Request, state: AppState = Depends(get_state)) -> Response:
    return await _respond(state, body, request)


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible), streamed per fused segment",
             responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def chat_completions(body: ChatCompletionRequest, request: Request, state: AppState = Depends(get_state)) -> Response:
    return await _respond(state, body, request)


async def _respond(state: AppState, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
    fields = request.scope.setdefault("state", {}).setdefault("log", {})
    job = await prepare(state, body, fields)
    if body.stream:
        return _SegmentStream(state, job)
    try:
        result = await _until_disconnect(request, collect(state, job), lambda: job.cancel("disconnect"))
    except _ClientGone:
        fields["outcome"] = "client_disconnected"
        return Response(status_code=499)
    return Response(dumps(result), media_type="application/json")


class _SegmentStream(EventSourceResponse):
    """The SSE response of one job; however it ends, the job's slot is given back."""

    def __init__(self, state: AppState, job: Job):
        shutdown = anyio.Event()  # set by sse-starlette when it sees uvicorn stopping

        async def on_server_exit() -> None:  # uvicorn was told to stop without our drain()
            await shutdown.wait()
            state.begin_drain()

        super().__init__(
            stream_events(state, job),
            sep="\n",
            shutdown_event=shutdown,
            shutdown_grace_period=state.settings.shutdown_grace_s + 2,
            data_sender_callable=on_server_exit,
        )
        self._job = job

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel("disconnect")  # no-op when the generation already ended
            self._job.finish()  # idempotent; covers a stream that never started


class _ClientGone(Exception):
    pass


async def _until_disconnect(request: Request, work: Awaitable[Any], on_disconnect: Callable[[], None]) -> Any:
    """Await `work`; if the client disconnects first, call `on_disconnect`, cancel it, raise _ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    on_disconnect()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise _ClientGone


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
