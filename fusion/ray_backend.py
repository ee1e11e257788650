"""Source-model workers as Ray actors (config `backend: ray`; DESIGN.md section 2).

One actor per source model, placed by Ray with the model's resource request
(`ray.num_gpus`, `ray.num_cpus`, overridable per model under `ray.models.NAME`). The actor
loads its model itself, on its own node, from the ModelConfig, and holds a `ModelWorker`
plus the states of the requests it serves, by request id. On the master, `RayWorker` stands
in for a `ModelWorker`: the same methods and attributes, the tokenizer loaded locally for
the text-side work (encode, word starts, token counts), while `open` returns a small handle
(`RemoteState`) and propose / score / commit / close are remote calls. The fusion loop is
unchanged: it already calls every worker from its own thread, and each thread blocks on
`ray.get`, so the actors compute concurrently. Only text and numbers cross the boundary.

Failures: an actor that dies fails the calls in flight, and later calls of the requests it
held, with `NotReady` (HTTP 503). Ray restarts it (`ray.max_restarts`), or, when Ray will
not (restarts used up, killed for good), the proxy starts a new one; a new request waits
for the replacement to load and then runs normally.

    engine = Engine.from_config(ray_config(load_config("config.yaml"), address="auto"))

This module imports Ray; nothing else in `fusion` does, so Ray stays an optional extra.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from .config import Config, ModelConfig, RayConfig
from .errors import ConfigError, NotReady
from .loading import load_tokenizer, resolve_source
from .worker import Proposal, common_prefix

log = logging.getLogger("coolfusion.ray")

_PROBE = "Multi-tasking is hard: 12 x 3 = 36. 多任务 ☕\n"  # tokenizer check, master vs actor


class StateLost(Exception):
    """The actor has no state for this request id: it was restarted since `open`."""


@dataclass
class _Session:
    state: Any  # the worker's State
    sent: list[int]  # the state's `ids` as the master last saw them


# ---- the actor ------------------------------------------------------------------------------


class ModelActor:
    """Runs in a Ray worker process: one source model and its requests' states."""

    def __init__(self, m: ModelConfig):
        from .engine import make_worker
        from .loading import load_model, resolve_device, resolve_dtype

        self.name = m.name
        src = resolve_source(m)
        # "auto": the GPU Ray gave this actor (num_gpus), else the CPU, never an unrequested GPU
        device = resolve_device("cpu" if m.device == "auto" and not ray.get_gpu_ids() else m.device)
        dtype = resolve_dtype(m.dtype, device, src.gguf_file is not None)
        log.info("actor loading %s from %s on %s (%s)", m.name, src.directory, device, dtype)
        tok = load_tokenizer(src)
        model = load_model(src, device, dtype)
        self.worker = make_worker(m.name, model, tok, device, stop_tokens=m.stop_tokens,
                                  context_limit=m.context_limit)
        self.sessions: dict[int, _Session] = {}
        self.words_key: bytes | None = None

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return f"ModelActor({self.name})"

    def ping(self) -> bool:
        return True

    def info(self) -> dict:
        w = self.worker
        return {
            "end_ids": sorted(w.end_ids), "primary_end": w.primary_end, "chat_end": w.chat_end,
            "context_limit": w.context_limit, "device": str(w.device), "vocab": len(w.tokenizer),
            "probe": w.encode(_PROBE), "node": ray.util.get_node_ip_address(),
        }

    def set_words(self, ref_box: list) -> None:
        """Every source model's word rule (`all_words`), sent by the master as an object ref."""
        ref = ref_box[0]
        if ref.binary() != self.words_key:
            self.worker.all_words = ray.get(ref)
            self.words_key = ref.binary()

    def _reply(self, rid: int, value, t0: float):
        """(value, keep, tail, committed_len, seconds): the change of `ids` since the last reply."""
        s = self.sessions[rid]
        ids, n = s.state.ids, len(s.sent)
        keep = n if ids[:n] == s.sent else common_prefix(s.sent, ids)
        tail = ids[keep:]
        s.sent = list(ids)
        return value, keep, tail, s.state.committed_len, time.perf_counter() - t0

    def _session(self, rid: int) -> _Session:
        s = self.sessions.get(rid)
        if s is None:
            raise StateLost(f"no request {rid} on {self.name}: the actor was restarted")
        return s

    def open(self, rid, prompt_ids, temperature, top_p, seed, words_box):
        t0 = time.perf_counter()
        self.set_words(words_box)  # a restarted actor learns the word rules again here
        st = self.worker.open(prompt_ids, temperature=temperature, top_p=top_p, seed=seed)
        self.sessions[rid] = _Session(st, [])
        return self._reply(rid, None, t0)

    def propose(self, rid, align, max_tokens):
        t0 = time.perf_counter()
        return self._reply(rid, self.worker.propose(self._session(rid).state, align, max_tokens), t0)

    def score(self, rid, candidates, end_id, mode):
        t0 = time.perf_counter()
        st = self._session(rid).state
        return self._reply(rid, self.worker.score(st, candidates, end_id=end_id, mode=mode), t0)

    def commit(self, rid, text, eos):
        t0 = time.perf_counter()
        self.worker.commit(self._session(rid).state, text, eos)
        return self._reply(rid, None, t0)

    def close(self, rid) -> None:
        s = self.sessions.pop(rid, None)
        if s is not None:
            self.worker.close(s.state)

    def logits(self, rid, fresh: bool):
        t0 = time.perf_counter()
        st = self._session(rid).state
        out = (self.worker.fresh_logits if fresh else self.worker.cached_logits)(st)
        return self._reply(rid, out.detach().cpu(), t0)

    def open_requests(self) -> int:
        return len(self.sessions)

    def counters(self) -> dict:
        w = self.worker
        return {"forward_tokens": w.forward_tokens, "tok_seconds": getattr(w, "tok_seconds", 0.0)}


def start_actor(m: ModelConfig, rc: RayConfig):
    """Ask Ray for the model's actor; returns at once (the model loads in the background)."""
    res = rc.resources(m.name)
    return ray.remote(ModelActor).options(
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=rc.max_restarts,
        max_task_retries=0,  # a request's state lives in the actor: never replay a call
    ).remote(m)


# ---- the master's proxy ---------------------------------------------------------------------


@dataclass
class RemoteState:
    """The master's handle of one request on one actor. `ids` mirrors the actor's token
    sequence (prompt + T(G) + lookahead), `g_text` is G; the KV cache stays on the actor."""

    rid: int
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    g_text: str = ""
    committed_len: int = 0
    closed: bool = False
    lost: str | None = None  # why the actor no longer holds this request


class RayWorker:
    """A `ModelWorker` whose model lives in a Ray actor (see the module docstring)."""

    def __init__(self, m: ModelConfig, rc: RayConfig, actor, tokenizer):
        from .words import WordStarts

        self.name = m.name
        self.config, self.ray_config = m, rc
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._tok_seconds = 0.0  # tokenizer work on the master (the actor counts its own)
        self.words = WordStarts(tokenizer)
        self._actor = actor
        self._lock = threading.Lock()
        self._recovery: threading.Thread | None = None
        self._rids = itertools.count(1)
        self._stats: dict[str, list[float]] = {}  # method -> [calls, round-trip s, actor s]
        info = self._start_info(actor)
        if info["vocab"] != len(tokenizer) or info["probe"] != self.encode(_PROBE):
            raise ConfigError(f"models: the tokenizer of {m.name!r} on the Ray node {info['node']} differs "
                              "from the master's (different transformers/tokenizers versions or files?)")
        self.end_ids = frozenset(info["end_ids"])
        self.primary_end, self.chat_end = info["primary_end"], info["chat_end"]
        self.context_limit = info["context_limit"]
        self.device = torch.device(info["device"])
        self.node = info["node"]
        self._words_ref = None
        self.all_words = [self.words]

    def __repr__(self) -> str:
        return f"RayWorker({self.name})"

    # ---- tokenizer helpers, on the master (as ModelWorker's) ----------------------------------

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        t = time.perf_counter()
        ids = self._backend.encode(text, add_special_tokens=special).ids
        self._tok_seconds += time.perf_counter() - t
        return ids

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        t = time.perf_counter()
        enc = self._backend.encode(text, add_special_tokens=False)
        self._tok_seconds += time.perf_counter() - t
        return enc.ids, [s for s, _ in enc.offsets]

    def decode(self, ids: list[int]) -> str:
        t = time.perf_counter()
        text = self._backend.decode(ids, skip_special_tokens=False)
        self._tok_seconds += time.perf_counter() - t
        return text

    def _start_info(self, actor) -> dict:
        timeout = self.ray_config.start_timeout_s
        try:
            return ray.get(actor.info.remote(), timeout=timeout)
        except GetTimeoutError:
            res = self.ray_config.resources(self.name)
            raise NotReady(f"the Ray actor of model {self.name!r} did not start within {timeout:g} s "
                           f"(ray.start_timeout_s); does the cluster have num_cpus={res.num_cpus:g}, "
                           f"num_gpus={res.num_gpus:g} free for it?") from None
        except RayActorError as err:
            raise NotReady(f"the Ray actor of model {self.name!r} failed to start: {_summary(err)}") from None

    # ---- word rules of every source model (set by the engine) ----------------------------

    @property
    def all_words(self) -> list:
        return self._all_words

    @all_words.setter
    def all_words(self, words) -> None:
        self._all_words = list(words)
        self._words_ref = ray.put(self._all_words)  # kept alive here: restarted actors fetch it
        self._call("set_words", [self._words_ref])

    # ---- remote calls ----------------------------------------------------------------------

    def _call(self, method: str, *args, st: RemoteState | None = None):
        if st is not None and st.lost:
            raise NotReady(st.lost)
        actor = self._actor
        if actor is None:
            raise NotReady(f"source model {self.name!r} was shut down")
        t0 = time.perf_counter()
        try:
            out = ray.get(getattr(actor, method).remote(*args))
        except RayActorError as err:
            self._failed(actor)
            msg = (f"source model {self.name!r} is unavailable: its Ray actor died during {method} "
                   f"({_summary(err)}); it is being restarted, retry the request")
            if st is not None:
                st.lost = msg
            raise NotReady(msg) from None
        except RayTaskError as err:
            if isinstance(err.cause, StateLost):
                msg = (f"source model {self.name!r} lost this request's state: its Ray actor was "
                       "restarted; retry the request")
                if st is not None:
                    st.lost = msg
                raise NotReady(msg) from None
            raise
        if st is not None:  # (value, keep, tail, committed_len, actor seconds)
            value, keep, tail, st.committed_len, spent = out
            del st.ids[keep:]
            st.ids.extend(tail)
            self._account(method, time.perf_counter() - t0, spent)
            return value
        return out

    def _account(self, method: str, wall: float, spent: float) -> None:
        with self._lock:
            s = self._stats.setdefault(method, [0, 0.0, 0.0])
            s[0] += 1
            s[1] += wall
            s[2] += spent

    def call_stats(self) -> dict[str, dict[str, float]]:
        """Per method: calls, round-trip seconds on the master, seconds spent in the actor.
        Their difference is the Ray overhead (serialisation, scheduling, transport)."""
        with self._lock:
            return {k: {"calls": int(c), "wall_s": w, "actor_s": a, "overhead_s": w - a}
                    for k, (c, w, a) in self._stats.items()}

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()

    # ---- failure and recovery ----------------------------------------------------------------

    def _failed(self, actor) -> None:
        """An actor call failed: watch the actor come back, or replace it (one watcher)."""
        with self._lock:
            if actor is not self._actor or self._recovery is not None:
                return
            self._recovery = threading.Thread(target=self._recover, args=(actor,), daemon=True,
                                              name=f"cf-ray-recover-{self.name}")
            self._recovery.start()

    def _recover(self, actor) -> None:
        deadline = time.monotonic() + self.ray_config.start_timeout_s
        try:
            while True:
                try:
                    ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    log.warning("Ray actor of %s was restarted by Ray", self.name)
                    return
                except ActorUnavailableError:  # restarting (max_restarts): ask again
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                except (RayActorError, GetTimeoutError) as err:  # dead for good, or stuck
                    log.warning("Ray actor of %s is dead (%s)", self.name, _summary(err))
                    break
            log.warning("starting a new Ray actor for %s", self.name)
            try:
                ray.kill(actor, no_restart=True)  # frees its resources for the successor
            except Exception as err:  # noqa: BLE001  (already gone)
                log.debug("ray.kill: %s", err)
            new = start_actor(self.config, self.ray_config)
            with self._lock:
                self._actor = new
            try:
                ray.get(new.ping.remote(), timeout=self.ray_config.start_timeout_s)
                log.warning("Ray actor of %s replaced", self.name)
            except (RayActorError, GetTimeoutError) as err:
                log.error("replacement Ray actor of %s did not come up: %s", self.name, _summary(err))
        finally:
            with self._lock:
                self._recovery = None

    def _wait_recovery(self) -> bool:
        """Wait for a running recovery (a new request needs a live actor); True if there was one."""
        t = self._recovery
        if t is None:
            return False
        t.join(self.ray_config.start_timeout_s)
        if t.is_alive():
            raise NotReady(f"source model {self.name!r} is restarting (its Ray actor is loading); retry shortly")
        return True

    @property
    def healthy(self) -> bool:
        """False while the actor is being restarted or replaced."""
        return self._recovery is None

    @property
    def actor(self):
        """The current actor handle (it changes when the proxy replaces a dead actor)."""
        return self._actor

    def shutdown(self) -> None:
        """Kill the actor for good (the master is stopping)."""
        with self._lock:
            actor, self._actor = self._actor, None
        if actor is not None:
            ray.kill(actor, no_restart=True)

    # ---- Table 1 -----------------------------------------------------------------------------

    def open(self, prompt_ids: list[int], *, temperature=0.0, top_p=1.0, seed=None) -> RemoteState:
        st = RemoteState(next(self._rids), list(prompt_ids))
        self._wait_recovery()
        args = ("open", st.rid, st.prompt_ids, temperature, top_p, seed, [self._words_ref])
        try:
            self._call(*args, st=st)
        except NotReady:  # the actor died while idle (nobody had noticed): once more, on its successor
            self._wait_recovery()
            st.lost = None
            self._call(*args, st=st)
        return st

    def propose(self, st: RemoteState, align: bool, max_tokens: int) -> Proposal:
        return self._call("propose", st.rid, align, max_tokens, st=st)

    def score(self, st: RemoteState, candidates: list[tuple[str, bool]], *, end_id: int | None = None,
              mode: str = "mean_nll") -> list[float]:
        return self._call("score", st.rid, list(candidates), end_id, mode, st=st)

    def commit(self, st: RemoteState, text: str, eos: bool = False) -> None:
        self._call("commit", st.rid, text, eos, st=st)
        st.g_text += text

    def close(self, st: RemoteState) -> None:
        """Free the request's KV cache on the actor. Never raises (it runs in `finally`)."""
        if st.closed:
            return
        st.closed = True
        actor = self._actor
        if st.lost is None and actor is not None:
            actor.close.remote(st.rid)  # no reply awaited; calls of one caller run in order

    def cached_logits(self, st: RemoteState) -> torch.Tensor:
        return self._call("logits", st.rid, False, st=st)

    def fresh_logits(self, st: RemoteState) -> torch.Tensor:
        return self._call("logits", st.rid, True, st=st)

    # ---- counters for the benchmark (as ModelWorker's; each read is a remote call) ----------

    @property
    def forward_tokens(self) -> int:
        """Tokens the actor fed through its model (since it last started)."""
        return self._call("counters")["forward_tokens"]

    @property
    def tok_seconds(self) -> float:
        """Tokenizer time: the actor's (propose, score, commit) plus the master's."""
        return self._call("counters")["tok_seconds"] + self._tok_seconds

    def open_requests(self) -> int:
        """Requests whose state the actor holds (0 when every request was closed)."""
        return self._call("open_requests")


def _summary(err: BaseException) -> str:
    """A one-line account of a Ray error: what happened, why the actor is dead, and the
    exception that killed it (Ray's own text spans a traceback)."""
    lines = [x.strip() for x in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if x.strip()]
    if not lines:
        return type(err).__name__
    parts = [lines[0].split(" (pid=")[0]]
    parts += [x for x in lines[1:] if x.startswith("The actor is dead because")][:1]
    if len(lines) > 1 and re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", lines[-1]) and lines[-1] not in parts:
        parts.append(lines[-1])
    return "; ".join(parts)


# ---- building the workers -------------------------------------------------------------------


def connect(rc: RayConfig) -> None:
    """Join (or start) the Ray cluster named by `ray.address`, unless this process already has."""
    if ray.is_initialized():
        log.info("using this process's Ray connection (ray.address is not used)")
        return
    kwargs: dict[str, Any] = {"address": rc.address}
    if rc.runtime_env is not None:
        kwargs["runtime_env"] = dict(rc.runtime_env)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"ray.address: cannot connect to a Ray cluster at {rc.address!r}: {err}") from None


def ray_workers(cfg: Config) -> tuple[list[RayWorker], dict[str, str | None]]:
    """One actor per configured model, all loading at once; returns (workers, chat templates)."""
    from . import chat

    connect(cfg.ray)
    actors = [start_actor(m, cfg.ray) for m in cfg.models]  # they load while the master works
    try:
        workers, templates = [], {}
        for m, actor in zip(cfg.models, actors):
            tok = load_tokenizer(resolve_source(m))
            workers.append(RayWorker(m, cfg.ray, actor, tok))
            templates[m.name] = chat.resolve_template(m.chat_template, tok)
            log.info("model %s runs in a Ray actor on %s (%s)", m.name, workers[-1].node, workers[-1].device)
    except BaseException:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise
    return workers, templates


def ray_config(cfg: Config, **ray_settings) -> Config:
    """A validated copy of `cfg` with `backend: ray` (and `ray:` keys overridden), e.g. for the
    benchmark: `Engine.from_config(ray_config(cfg, address="local"))`."""
    from .config import parse_config

    data = cfg.model_dump()
    data["backend"] = "ray"
    data["ray"] = {**data.get("ray", {}), **ray_settings}
    return parse_config(data)


def shutdown(engine) -> None:
    """Kill every actor of an engine built with `backend: ray`."""
    for w in engine.workers:
        if isinstance(w, RayWorker):
            w.shutdown()
