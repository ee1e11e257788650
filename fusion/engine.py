"""The engine: loads the source models, validates requests, runs a variant, yields steps.

    engine = Engine.from_config(load_config("config.yaml"))
    for step in engine.generate(GenerationRequest(prompt="The capital of France is")):
        print(step.text, end="")

Token counts (`max_tokens`, `usage`) use a reference tokenizer: the model's own for a
source-model id, the first configured model's for the fused variants. A segment that
crosses `max_tokens` is cut at that token; a stop string ends the output before it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterator

from . import chat, loop
from .config import Config, FusionConfig
from .errors import Cancelled, ContextLengthExceeded, InvalidRequest, UnknownModel
from .loading import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source
from .types import COOL, COOL_NOALIGN, COOL_RERANK, RERANK, VARIANTS, Candidate, GenerationRequest, Step
from .worker import ModelWorker

log = logging.getLogger("coolfusion.engine")

ROLES = ("system", "user", "assistant")


class Engine:
    def __init__(self, workers: list[ModelWorker], fusion: FusionConfig | None = None,
                 templates: dict[str, str | None] | None = None):
        self.workers = workers
        self.fusion = fusion or FusionConfig()
        for w in workers:  # each worker knows every tokenizer's word rule (paper Table 1)
            w.all_words = [v.words for v in workers]
            w.fast = self.fusion.fast_paths
        self.templates = templates or {w.name: getattr(w.tokenizer, "chat_template", None) for w in workers}
        self.source_names = [w.name for w in workers]
        self._by_name = {w.name: w for w in workers}
        self._pool = ThreadPoolExecutor(max_workers=len(workers) * 2, thread_name_prefix="cf-worker") \
            if self.fusion.parallel and self.fusion.fast_paths and len(workers) > 1 else None
        self._active = 0
        self._active_lock = threading.Lock()

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Config) -> "Engine":
        if cfg.backend == "ray":  # one Ray actor per model (imports Ray only here)
            from .ray_backend import ray_workers

            workers, templates = ray_workers(cfg)
            return cls(workers, cfg.fusion, templates)
        workers, templates = [], {}
        for m in cfg.models:
            src = resolve_source(m)
            device = resolve_device(m.device)
            dtype = resolve_dtype(m.dtype, device, src.gguf_file is not None)
            log.info("loading %s from %s%s on %s (%s)", m.name, src.directory,
                     f"/{src.gguf_file}" if src.gguf_file else "", device, dtype)
            tok = load_tokenizer(src)
            model = load_model(src, device, dtype)
            workers.append(make_worker(m.name, model, tok, device, stop_tokens=m.stop_tokens,
                                       context_limit=m.context_limit))
            templates[m.name] = chat.resolve_template(m.chat_template, tok)
        return cls(workers, cfg.fusion, templates)

    def model_ids(self) -> list[str]:
        return list(VARIANTS) + self.source_names

    @property
    def active_requests(self) -> int:
        return self._active

    @property
    def ready(self) -> bool:
        """False while a worker is unavailable (a Ray actor being restarted): /health 503."""
        return all(getattr(w, "healthy", True) for w in self.workers)

    def close(self) -> None:
        """Release the thread pool and any remote workers (Ray actors)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if any(type(w).__module__.endswith("ray_backend") for w in self.workers):
            from .ray_backend import shutdown

            shutdown(self)

    # ---- validation --------------------------------------------------------------------------

    def _participants(self, model: str) -> list[ModelWorker]:
        if model in VARIANTS:
            return self.workers
        if model in self._by_name:
            return [self._by_name[model]]
        raise UnknownModel(f"The model {model!r} does not exist; available: {', '.join(self.model_ids())}",
                           param="model")

    def _prompt_ids(self, w: ModelWorker, req: GenerationRequest) -> list[int]:
        if req.messages is not None:
            text = chat.render(req.messages, self.templates.get(w.name), w.tokenizer, w.name)
            return w.encode(text, special=False)
        return w.encode(req.prompt, special=True)

    def check(self, req: GenerationRequest) -> int:
        """Validate a request before any work; return its prompt tokens (reference tokenizer)."""
        workers = self._participants(req.model)
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
                if m.role not in ROLES:
                    raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {m.role!r}",
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
        if len(req.stop) > 4:
            raise InvalidRequest("at most 4 stop sequences", param="stop")
        for param, t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"{param} is not valid Unicode text (lone surrogate)", param=param) from None
        if not isinstance(req.max_tokens, int) or req.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be a positive integer, not {req.max_tokens!r}", param="max_tokens")
        if not 0.0 <= req.temperature <= 2.0:
            raise InvalidRequest("temperature must be between 0 and 2", param="temperature")
        if not 0.0 < req.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        ref_len = None
        for w in workers:
            n = len(self._prompt_ids(w, req))
            if n == 0:
                raise InvalidRequest(f"prompt is empty for model {w.name!r} after tokenization", param="prompt")
            if w.context_limit and n + req.max_tokens > w.context_limit:
                raise ContextLengthExceeded(
                    f"This request needs {n} prompt tokens + max_tokens {req.max_tokens} = {n + req.max_tokens} "
                    f"tokens, but model {w.name!r} has a context limit of {w.context_limit} tokens.",
                    param="max_tokens" if n < w.context_limit else "messages" if req.messages else "prompt")
            ref_len = n if ref_len is None else ref_len
        return ref_len

    # ---- generation --------------------------------------------------------------------------

    def generate(self, req: GenerationRequest, cancel: threading.Event | None = None,
                 runs: list | None = None) -> Iterator[Step]:
        """Yield one Step per selected segment. Blocking; run it in a worker thread. Closing
        the generator (or setting `cancel`) frees every KV cache of the request. `runs`, if
        given, receives the request's loop.Run objects (timings, for the benchmark)."""
        prompt_tokens = self.check(req)
        with self._active_lock:
            self._active += 1
        runs = [] if runs is None else runs
        try:
            raw = self._raw_steps(req, cancel, runs)
            text = ""
            for step in _finish(raw, req, self._reference(req), prompt_tokens, cancel):
                text += step.text
                if step.finish_reason is not None and req.judge:
                    step = replace(step, judge=self.judge(req, text, step.eos, cancel, runs))
                yield step
        finally:
            for r in runs:
                for w, s in zip(r.workers, r.states):
                    w.close(s)
            with self._active_lock:
                self._active -= 1

    def _reference(self, req: GenerationRequest) -> ModelWorker:
        return self.workers[0] if req.model in VARIANTS else self._by_name[req.model]

    def _open(self, workers, req, cancel, runs, *, align=True) -> loop.Run:
        states, ends = [], []
        for i, w in enumerate(workers):
            seed = None if req.seed is None else req.seed + 1000 * i
            states.append(w.open(self._prompt_ids(w, req), temperature=req.temperature, top_p=req.top_p, seed=seed))
            ends.append(w.chat_end if req.messages is not None else w.primary_end)
        run = loop.Run(workers, states, ends, self._pool, cancel, self.fusion.max_segment_tokens,
                       self.fusion.score, align)
        runs.append(run)
        return run

    def _raw_steps(self, req, cancel, runs) -> Iterator[loop.RawStep]:
        workers = self._participants(req.model)
        if req.model in (RERANK, COOL_RERANK):
            yield self._rerank(req, cancel, runs)
            return
        run = self._open(workers, req, cancel, runs, align=req.model == COOL)  # else own boundaries
        limit = min((w.context_limit or 10**9) for w in workers)
        for step in loop.segments(run):
            yield step
            if max(len(s.ids) for s in run.states) + run.max_segment_tokens >= limit:
                yield loop.RawStep("", step.winner, False, (), )  # marker: context full
                return

    def complete_text(self, req: GenerationRequest, cancel=None) -> tuple[str, str]:
        """Run a request to the end; return (text, finish_reason)."""
        text, finish = [], None
        for step in self.generate(req, cancel):
            text.append(step.text)
            finish = step.finish_reason
        return "".join(text), finish

    def judge(self, req, text: str, eos: bool, cancel=None, runs=None) -> Candidate:
        """Every source model's PPL of a whole output after the prompt (paper Table 3, row 1)."""
        runs = [] if runs is None else runs
        run = self._open(self.workers, req, cancel, runs)
        return loop.rerank(run, [(text, eos, (req.model,))]).candidates[0]

    def _rerank(self, req, cancel, runs) -> loop.RawStep:
        """Each source model (and, for Cool+Rerank, Cool) writes a whole answer, then every
        model scores every answer. The answers are written concurrently on threads of their
        own: the shared pool serves only per-phase worker calls, which never nest."""
        single = replace(req, trace=False, judge=False)
        ids = list(self.source_names) + ([COOL] if req.model == COOL_RERANK else [])
        if self._pool is not None:
            with ThreadPoolExecutor(max_workers=len(self.source_names), thread_name_prefix="cf-rerank") as ex:
                futures = [ex.submit(self.complete_text, replace(single, model=m), cancel)
                           for m in self.source_names]
                outs = [f.result() for f in futures]
            if req.model == COOL_RERANK:  # uses every worker: after the single answers
                outs.append(self.complete_text(replace(single, model=COOL), cancel))
        else:
            outs = [self.complete_text(replace(single, model=m), cancel) for m in ids]
        conts = [(text, finish == "stop", (m,)) for m, (text, finish) in zip(ids, outs)]
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        run = self._open(self.workers, req, cancel, runs)
        return loop.rerank(run, conts)


def make_worker(name, model, tokenizer, device, *, stop_tokens=(), context_limit=None) -> ModelWorker:
    """A worker with its end tokens: EOS ids of the tokenizer and generation config, plus
    configured `stop_tokens` (e.g. Gemma's <end_of_turn>)."""
    ends = []
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    for e in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if e is not None and e not in ends:
            ends.append(e)
    chat_ends = []
    for t in stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or tid == tokenizer.unk_token_id:
            raise InvalidRequest(f"stop token {t!r} is not in the vocabulary of {name!r}")
        chat_ends.append(tid)
    limit = context_limit or getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return ModelWorker(name, model, tokenizer, end_ids=ends + chat_ends, chat_end_ids=chat_ends,
                       context_limit=limit, device=device)


def _finish(raw: Iterator[loop.RawStep], req: GenerationRequest, ref: ModelWorker, prompt_tokens: int,
            cancel) -> Iterator[Step]:
    """Apply stop strings and max_tokens to the raw segments; hold back text that could be
    the start of a stop string; count tokens with the reference tokenizer."""
    g = ""  # all text selected so far
    emitted = 0  # chars of g already yielded
    longest = max((len(s) for s in req.stop), default=0)
    for step in raw:
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        g += step.text
        finish = None
        end = len(g)
        # stop strings
        hit = None
        for s in req.stop:
            i = g.find(s, max(0, emitted - longest))
            if i >= 0 and (hit is None or i < hit):
                hit = i
        if hit is not None:
            end, finish = hit, "stop"
        # max_tokens in the reference tokenizer
        ids, starts = ref.encode_with_starts(g[:end])
        counted = end  # `ids` are the tokens of g[:counted]
        if len(ids) >= req.max_tokens:
            cut = starts[req.max_tokens] if len(ids) > req.max_tokens else end
            if cut <= end:
                end, finish = cut, "length" if finish is None or cut < end else finish
        if finish is None and (step.eos or not step.candidates):
            finish = "stop" if step.eos else "length"
        if finish is None and longest:
            end -= _held(g[:end], req.stop)
        text = g[emitted:end]
        emitted = max(emitted, end)
        n = len(ids) if emitted == counted else len(ref.encode(g[:emitted]))  # encode once per step
        yield Step(text, step.winner, step.eos and finish == "stop", step.candidates if req.trace else (),
                   finish, min(n, req.max_tokens), prompt_tokens)
        if finish is not None:
            return


def _held(text: str, stops) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
