"""The master's side of `backend: ray`: a proxy per source model (docs/architecture.md).

One Ray actor per source model (`coolfusion.workers.ray_actor`), placed by Ray with the model's resource
request (`ray.num_gpus`, `ray.num_cpus`, overridable per model under `ray.models.NAME`).
On the master, `RayWorker` implements the same `Worker` contract as `LocalWorker`: its
`text` is the same `TokenizerSide` class over the locally loaded tokenizer (prompt
encoding, token counts), `open` returns a small handle (`RemoteState`), and propose /
score / commit / close are remote calls answered by typed `Reply` messages. The fusion
loop calls every worker from its own thread, and each thread blocks on `ray.get`, so the
actors compute concurrently; each actor is threaded (`ray_actor.actor_concurrency`), so the
calls of concurrent requests run at once in it and meet in its model's batched runner.

Failures: an actor that dies fails the calls in flight, and later calls of the requests it
held, with `NotReady` (HTTP 503). Ray restarts it (`ray.max_restarts`), or, when Ray will
not (restarts used up, killed for good), the proxy starts a new one; a new request waits
for the replacement to load and then runs normally. A lost cluster (its head gone: see
`coolfusion.workers.ray_cluster`, which also owns `ray.init`) fails every call with
`NotReady` naming the cause, and no actor is replaced.

    engine = Engine.from_config(ray_config(load_config("config.yaml"), address="auto"))

This module and `coolfusion.workers.ray_actor` import Ray; nothing else in `fusion` does, so Ray stays
an optional extra.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from coolfusion.config import Config, ModelConfig, RayConfig
from coolfusion.core.errors import ConfigError, NotReady
from coolfusion.workers.ray_cluster import RayCluster, connect
from coolfusion.workers.ray_actor import PROBE, ActorInfo, Reply, StateLost, start_actor
from coolfusion.workers.tokenizer_side import TokenizerSide
from coolfusion.workers.protocol import Proposal, Sampling, WorkerOptions

log = logging.getLogger("coolfusion.ray")


@dataclass
class RemoteState:
    """The master's handle of one request on one actor; the KV cache stays on the actor."""

    rid: int
    seq_len: int = 0  # the actor's sequence length for the request, from its last Reply
    closed: bool = False
    lost: str | None = None  # why the actor no longer holds this request


class RayWorker:
    """A source model in a Ray actor, behind the `Worker` contract (see the module docstring)."""

    def __init__(self, m: ModelConfig, rc: RayConfig, options: WorkerOptions, options_ref, fusion, actor, tokenizer,
                 cluster: RayCluster):
        self.name = m.name
        self.cluster = cluster
        self.config, self.ray_config, self.options, self.fusion = m, rc, options, fusion
        self._options_ref = options_ref  # kept alive here: a restarted actor fetches it again
        self._actor = actor
        self._lock = threading.Lock()
        self._recovery: threading.Thread | None = None
        self._rids = itertools.count(1)
        self._closing: list = []  # refs of close calls not yet known to have run (see `close`)
        self._stats: dict[str, list[float]] = {}  # method -> [calls, round-trip s, actor s]
        info = self._start_info(actor)
        self.text = TokenizerSide(m.name, tokenizer, info.end_ids, (info.chat_end,))
        if info.vocab != len(tokenizer) or list(info.probe) != self.text.encode(PROBE):
            raise ConfigError(f"models: the tokenizer of {m.name!r} on the Ray node {info.node} differs "
                              "from the master's (different transformers/tokenizers versions or files?)")
        self.context_limit = info.context_limit
        self.device = torch.device(info.device)
        self.node = info.node

    def __repr__(self) -> str:
        return f"RayWorker({self.name})"

    def _start_info(self, actor) -> ActorInfo:
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

    # ---- remote calls ----------------------------------------------------------------------

    def _call(self, method: str, *args, st: RemoteState | None = None):
        if st is not None and st.lost:
            raise NotReady(st.lost)
        if self.cluster.lost:
            raise NotReady(self.cluster.lost)
        actor = self._actor
        if actor is None:
            raise NotReady(f"source model {self.name!r} was shut down")
        t0 = time.perf_counter()
        try:
            out = self.cluster.get(getattr(actor, method).remote(*args))
        except RayActorError as err:
            if self.cluster.lost:  # the actor went with the cluster: nothing to restart
                raise NotReady(self.cluster.lost) from None
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
        if isinstance(out, Reply):
            if st is not None:
                st.seq_len = out.seq_len
            self._account(method, time.perf_counter() - t0, out.actor_s)
            return out.value
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
                if self.cluster.lost:
                    log.warning("not restarting the Ray actor of %s: %s", self.name, self.cluster.lost)
                    return
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
            new = start_actor(self.config, self._options_ref, self.fusion, self.ray_config)
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
    def unavailable(self) -> str | None:
        """Why this model cannot serve now (None when it can): /health reports it."""
        if self.cluster.lost:
            return self.cluster.lost
        if self._recovery is not None:
            return f"source model {self.name!r} is restarting (its Ray actor is loading)"
        return None

    @property
    def actor(self):
        """The current actor handle (it changes when the proxy replaces a dead actor)."""
        return self._actor

    def kv_report(self) -> dict[str, int]:
        return {}  # the actor's KV storage is not reported to the master

    def shutdown(self) -> None:
        """Kill the actor for good (the master is stopping)."""
        with self._lock:
            actor, self._actor = self._actor, None
        if actor is not None:
            ray.kill(actor, no_restart=True)

    # ---- Table 1 -----------------------------------------------------------------------------

    def open(self, prompt_ids: list[int], sampling: Sampling = Sampling()) -> RemoteState:
        st = RemoteState(next(self._rids))
        self._wait_recovery()
        try:
            self._call("open", st.rid, list(prompt_ids), sampling, st=st)
        except NotReady:  # the actor died while idle (nobody had noticed): once more, on its successor
            self._wait_recovery()
            st.lost = None
            self._call("open", st.rid, list(prompt_ids), sampling, st=st)
        return st

    def propose(self, st: RemoteState, align: bool, max_tokens: int) -> Proposal:
        return self._call("propose", st.rid, align, max_tokens, st=st)

    def check_draft(self, st: RemoteState, draft: str, align: bool, max_tokens: int) -> Proposal:
        return self._call("check_draft", st.rid, draft, align, max_tokens, st=st)

    def score(self, st: RemoteState, candidates: Sequence[tuple[str, bool]], *, end_id: int | None = None,
              mode: str = "mean_nll") -> list[float]:
        return self._call("score", st.rid, list(candidates), end_id, mode, st=st)

    def commit(self, st: RemoteState, text: str, eos: bool = False) -> None:
        self._call("commit", st.rid, text, eos, st=st)

    def rewind(self, st: RemoteState, prompt_ids: list[int], greedy: Sequence[tuple[int, float]] = ()) -> None:
        self._call("rewind", st.rid, list(prompt_ids), list(greedy), st=st)

    def fork(self, st: RemoteState, prompt_ids: list[int], greedy: Sequence[tuple[int, float]] = ()) -> RemoteState:
        if st.lost is not None:
            raise NotReady(st.lost)
        new = RemoteState(next(self._rids))
        self._call("fork", st.rid, new.rid, list(prompt_ids), list(greedy), st=new)  # the reply is new's
        return new

    def close(self, st: RemoteState) -> None:
        """Free the request's KV cache on the actor. Never raises (it runs in `finally`)."""
        if st.closed:
            return
        st.closed = True
        actor = self._actor
        if st.lost is None and actor is not None:
            # No reply awaited. A threaded actor runs one caller's calls in no set order, so
            # the ref is kept until it is known to have run: `open_requests` waits for them.
            ref = actor.close.remote(st.rid)
            with self._lock:
                self._closing.append(ref)
                if len(self._closing) > 64:  # forget the closes that have run
                    _, self._closing = ray.wait(self._closing, num_returns=len(self._closing), timeout=0)

    def seq_len(self, st: RemoteState) -> int:
        return st.seq_len

    def cached_logits(self, st: RemoteState) -> torch.Tensor:
        return self._call("logits", st.rid, False, st=st)

    def fresh_logits(self, st: RemoteState) -> torch.Tensor:
        return self._call("logits", st.rid, True, st=st)

    def sequence_logprobs(self, ids: list[int], top: int = 0) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
        """Exact log-probs of `ids`, computed in the actor (a full forward there, no cache)."""
        return self._call("sequence_logprobs", list(ids), top)

    # ---- counters for the benchmark (each read is a remote call) ------------------------------

    @property
    def forward_tokens(self) -> int:
        """Tokens the actor fed through its model (since it last started)."""
        return self._call("counters")["forward_tokens"]

    @property
    def tok_seconds(self) -> float:
        """Tokenizer time: the actor's (propose, score, commit) plus the master's."""
        return self._call("counters")["tok_seconds"] + self.text.tok_seconds

    def runner_stats(self) -> dict:
        """The actor's batched-runner counters (`LocalWorker.runner_stats`), asked again."""
        return self._call("runner_stats")

    def open_requests(self) -> int:
        """Requests whose state the actor holds (0 when every request was closed), counted
        after every close sent so far has run."""
        with self._lock:
            closing, self._closing = self._closing, []
        try:
            self.cluster.get(closing)
        except (RayActorError, RayTaskError):
            pass  # a close on a dead actor: its states went with it
        return self._call("open_requests")

    def actor_info(self) -> ActorInfo:
        """The actor's own account of its model and options (asked again, not cached)."""
        return self._call("info")


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


def ray_workers(cfg: Config, options: WorkerOptions, tokenizers: Sequence[Any]) -> list[RayWorker]:
    """One actor per configured model, all loading at once, each built with `options`."""
    cluster = connect(cfg.ray)
    options_ref = ray.put(options)
    actors = [start_actor(m, options_ref, cfg.fusion, cfg.ray) for m in cfg.models]  # they load in parallel
    try:
        workers = []
        for m, actor, tok in zip(cfg.models, actors, tokenizers):
            workers.append(RayWorker(m, cfg.ray, options, options_ref, cfg.fusion, actor, tok, cluster))
            log.info("model %s runs in a Ray actor on %s (%s)", m.name, workers[-1].node, workers[-1].device)
    except BaseException:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise
    return workers


def ray_config(cfg: Config, **ray_settings) -> Config:
    """A validated copy of `cfg` with `backend: ray` (and `ray:` keys overridden), e.g. for the
    benchmark: `Engine.from_config(ray_config(cfg, address="local"))`."""
    from coolfusion.config import parse_config

    data = cfg.model_dump()
    data["backend"] = "ray"
    data["ray"] = {**data.get("ray", {}), **ray_settings}
    return parse_config(data)

