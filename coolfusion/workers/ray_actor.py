"""The Ray actor side of `backend: ray`: one source model in its own process (or node).

`ModelActor` loads its model itself, on its node, through the same path as the engine
(`coolfusion.runtime.loading.load`, then `LocalWorker.from_loaded` with the `WorkerOptions` the master
sent at construction), and holds the states of the requests it serves, by request id. The
options (every model's tokenizer rules: megabytes) travel as an object ref that the master
keeps alive, boxed in a list so that Ray passes the ref itself: an actor that Ray restarts
runs its constructor again with the same arguments and fetches them again. Every call answers with a typed message: `Reply` for the
Table 1 calls, `ActorInfo` once at start. The master's proxy is `coolfusion.workers.ray_proxy`.

Concurrency: the actor is a *threaded* actor (`max_concurrency`, `actor_concurrency`): Ray runs
up to that many calls at once, each on a thread of the actor, so the calls of concurrent
requests reach the worker together and, with `fusion.batching`, meet in the model's batched
runner exactly as the request threads of the local backend do. A threaded actor rather than
an async one because the worker is blocking code (a call waits on its batch's future):
an async actor would only hand every call to a thread pool itself. Calls of one request
never overlap (its loop waits for each reply), so Ray's unordered execution of a threaded
actor's calls changes nothing; the states dict is only read and written under the GIL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from coolfusion.config import ModelConfig
from coolfusion.workers.protocol import Sampling, WorkerOptions

PROBE = "Multi-tasking is hard: 12 x 3 = 36. 多任务 ☕\n"  # tokenizer check, master vs actor


class StateLost(Exception):
    """The actor has no state for this request id: it was restarted since `open`."""


@dataclass(frozen=True)
class ActorInfo:
    """What the master needs of the actor's model, sent once after it loaded."""

    end_ids: tuple[int, ...]  # in the worker's order: the first is the primary end
    chat_end: int
    context_limit: int | None
    device: str
    node: str
    vocab: int  # tokenizer size and PROBE's ids: the master checks its own tokenizer against them
    probe: tuple[int, ...]
    fast: bool  # the options the actor's worker runs with


@dataclass(frozen=True)
class Reply:
    """The answer to one Table 1 call: its value, the request's sequence length after it
    (`Worker.seq_len`), and the seconds the actor spent (the rest of a round trip is Ray's)."""

    value: Any
    seq_len: int
    actor_s: float


class ModelActor:
    """Runs in a Ray worker process: one source model and its requests' states."""

    def __init__(self, m: ModelConfig, options_box: list, fusion):
        from coolfusion.runtime.loading import load, resolve_device
        from coolfusion.workers.local import LocalWorker

        options: WorkerOptions = ray.get(options_box[0])
        self.name = m.name
        # "auto": the GPU Ray gave this actor (num_gpus), else the CPU, never an unrequested GPU
        device = resolve_device("cpu" if m.device == "auto" and not ray.get_gpu_ids() else m.device)
        self.worker = LocalWorker.from_loaded(load(m, device=device), options, fusion)
        self.states: dict[int, Any] = {}

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return f"ModelActor({self.name})"

    def ping(self) -> bool:
        return True

    def info(self) -> ActorInfo:
        w, text = self.worker, self.worker.text
        ends = (text.primary_end,) + tuple(sorted(text.end_ids - {text.primary_end}))
        return ActorInfo(ends, text.chat_end, w.context_limit, str(w.device), ray.util.get_node_ip_address(),
                         len(text.tokenizer), tuple(text.encode(PROBE)), w.options.fast)

    def _state(self, rid: int):
        st = self.states.get(rid)
        if st is None:
            raise StateLost(f"no request {rid} on {self.name}: the actor was restarted")
        return st

    def _reply(self, rid: int, value, t0: float) -> Reply:
        return Reply(value, self.worker.seq_len(self.states[rid]), time.perf_counter() - t0)

    def open(self, rid: int, prompt_ids: list[int], sampling: Sampling) -> Reply:
        t0 = time.perf_counter()
        self.states[rid] = self.worker.open(prompt_ids, sampling)
        return self._reply(rid, None, t0)

    def propose(self, rid: int, align: bool, max_tokens: int) -> Reply:
        t0 = time.perf_counter()
        return self._reply(rid, self.worker.propose(self._state(rid), align, max_tokens), t0)

    def check_draft(self, rid: int, draft: str, align: bool, max_tokens: int) -> Reply:
        t0 = time.perf_counter()
        return self._reply(rid, self.worker.check_draft(self._state(rid), draft, align, max_tokens), t0)

    def score(self, rid: int, candidates: list[tuple[str, bool]], end_id: int | None, mode: str) -> Reply:
        t0 = time.perf_counter()
        return self._reply(rid, self.worker.score(self._state(rid), candidates, end_id=end_id, mode=mode), t0)

    def commit(self, rid: int, text: str, eos: bool) -> Reply:
        t0 = time.perf_counter()
        self.worker.commit(self._state(rid), text, eos)
        return self._reply(rid, None, t0)

    def rewind(self, rid: int, prompt_ids: list[int], greedy: list[tuple[int, float]]) -> Reply:
        t0 = time.perf_counter()
        self.worker.rewind(self._state(rid), prompt_ids, greedy)
        return self._reply(rid, None, t0)

    def fork(self, rid: int, new_rid: int, prompt_ids: list[int], greedy: list[tuple[int, float]]) -> Reply:
        t0 = time.perf_counter()
        self.states[new_rid] = self.worker.fork(self._state(rid), prompt_ids, greedy)
        return self._reply(new_rid, None, t0)

    def close(self, rid: int) -> None:
        st = self.states.pop(rid, None)
        if st is not None:
            self.worker.close(st)

    def logits(self, rid: int, fresh: bool) -> Reply:
        t0 = time.perf_counter()
        st = self._state(rid)
        out = (self.worker.fresh_logits if fresh else self.worker.cached_logits)(st)
        return self._reply(rid, out.detach().cpu(), t0)

    def sequence_logprobs(self, ids: list[int], top: int) -> list:
        return self.worker.sequence_logprobs(ids, top)

    def open_requests(self) -> int:
        return len(self.states)

    def counters(self) -> dict[str, float]:
        return {"forward_tokens": self.worker.forward_tokens, "tok_seconds": self.worker.tok_seconds}

    def runner_stats(self) -> dict[str, Any]:
        return self.worker.runner_stats()


def actor_concurrency(fusion) -> int:
    """Calls an actor runs at once: one per KV slot (a request has one call in flight per
    model at a time), plus two for the master's health and counter calls."""
    return fusion.kv_slots + 2


def start_actor(m: ModelConfig, options_ref, fusion, rc):
    """Ask Ray for the model's actor; returns at once (the model loads in the background).
    `options_ref` is `ray.put(WorkerOptions)`, kept alive by the caller."""
    res = rc.resources(m.name)
    return ray.remote(ModelActor).options(
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=rc.max_restarts,
        max_task_retries=0,  # a request's state lives in the actor: never replay a call
        max_concurrency=actor_concurrency(fusion),  # a threaded actor: concurrent requests batch
    ).remote(m, [options_ref], fusion)
