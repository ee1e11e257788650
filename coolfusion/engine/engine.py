"""The engine: builds the workers, checks requests, runs a variant, yields steps.

    engine = Engine.from_config(load_config("config.yaml"))
    for step in engine.generate(GenerationRequest(prompt="The capital of France is")):
        print(step.text, end="")

`engine.start(request)` returns the running `Generation` (iterate it for the steps; its
`stats` say where the time went). Token counts (`max_tokens`, `usage`) use a reference
tokenizer: the model's own for a source-model id, the first configured model's for the
fused variants. Checks live in `coolfusion.core.validation`, stop strings and `max_tokens` in
`coolfusion.core.output`, the loop in `coolfusion.core.loop`, log-probs (`logprobs`, `echo`) in
`coolfusion.engine.likelihood`; this module only orchestrates them.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterator, Sequence

from coolfusion.core import chat
from coolfusion.engine import alternatives, likelihood
from coolfusion.core import loop
from coolfusion.core import output
from coolfusion.core import selection
from coolfusion.core import speculation
from coolfusion.core import validation
from coolfusion.config import Config, FusionConfig
from coolfusion.core.errors import Cancelled, UnknownModel
from coolfusion.runtime.loading import LoadedModel
from coolfusion.core.types import COOL, COOL_RERANK, RERANK, VARIANTS, Candidate, GenerationRequest, Stats, Step
from coolfusion.engine.client import Checked
from coolfusion.workers.protocol import Sampling, Worker


class Generation:
    """One request running in the engine. Iterate it for its `Step`s (blocking: run it in a
    worker thread); `stats` grows as it runs; `close()` (or the end) frees its KV storage."""

    def __init__(self, steps: Iterator[Step], stats: Stats):
        self._steps = steps
        self.stats = stats

    def __iter__(self) -> Iterator[Step]:
        return self._steps

    def __next__(self) -> Step:
        return next(self._steps)

    def close(self) -> None:
        self._steps.close()


class Engine:
    def __init__(self, workers: Sequence[Worker], fusion: FusionConfig | None = None,
                 templates: dict[str, str | None] | None = None):
        self.fusion = fusion or FusionConfig()
        for w in workers:
            if not isinstance(w, Worker):
                raise TypeError(f"{w!r} does not implement coolfusion.workers.protocol.Worker")
            if w.options.fast != self.fusion.fast_paths:
                raise ValueError(f"worker {w.name!r} was built with fast={w.options.fast}, "
                                 f"but fusion.fast_paths is {self.fusion.fast_paths}")
        self.workers = list(workers)
        self.templates = templates or {w.name: getattr(w.text.tokenizer, "chat_template", None) for w in workers}
        self.source_names = [w.name for w in workers]
        self._by_name = {w.name: w for w in workers}
        # one thread per worker call of every request that may run at once: a call blocks on its
        # model (a lock, or its batch), so a smaller pool would cap how many requests batch
        calls = len(workers) * 2 * (self.fusion.kv_slots if self.fusion.batching else 1)
        self._pool = ThreadPoolExecutor(max_workers=calls, thread_name_prefix="cf-worker") \
            if self.fusion.parallel and self.fusion.fast_paths and len(workers) > 1 else None
        self._active = 0
        self._active_lock = threading.Lock()
        self.alternatives = alternatives.Alternatives()  # the fused ids' top alternatives, by prefix
        self._fastest_first: tuple[str, ...] | None = None  # drafter order (coolfusion.core.speculation)
        self._fastest_lock = threading.Lock()

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Config) -> "Engine":
        """Load every configured model: in this process (`backend: local`) or one Ray actor
        each (`backend: ray`, imported only then). Tokenizers load first: every worker is
        built knowing every model's word rule."""
        from coolfusion.runtime.loading import check_devices, load, load_tokenizer, resolve_source
        from coolfusion.workers.local import LocalWorker
        from coolfusion.workers.protocol import WorkerOptions

        check_devices(cfg)
        tokenizers = [load_tokenizer(resolve_source(m)) for m in cfg.models]
        options = WorkerOptions.for_tokenizers(tokenizers, cfg.fusion.fast_paths)
        templates = {m.name: chat.resolve_template(m.chat_template, t) for m, t in zip(cfg.models, tokenizers)}
        if cfg.backend == "ray":
            from coolfusion.workers.ray_proxy import ray_workers

            return cls(ray_workers(cfg, options, tokenizers), cfg.fusion, templates)
        workers = [LocalWorker.from_loaded(load(m, tokenizer=t), options, cfg.fusion)
                   for m, t in zip(cfg.models, tokenizers)]
        return cls(workers, cfg.fusion, templates)

    @classmethod
    def from_models(cls, models: Sequence[LoadedModel], fusion: FusionConfig | None = None,
                    templates: dict[str, str | None] | None = None) -> "Engine":
        """An engine over models already in memory (tests, the benchmark's random weights)."""
        from coolfusion.workers.local import local_workers

        fusion = fusion or FusionConfig()
        return cls(local_workers(models, fusion), fusion, templates)

    def model_ids(self) -> list[str]:
        return list(VARIANTS) + self.source_names

    def with_fusion(self, fusion: FusionConfig) -> "Engine":
        """An engine over the same loaded models (no second load) with other fusion settings,
        e.g. `batching` on (tests, the concurrency benchmark). Local workers only."""
        from coolfusion.workers.local import LocalWorker

        loaded = [w.loaded if isinstance(w, LocalWorker) else None for w in self.workers]
        if any(m is None for m in loaded):
            raise TypeError("with_fusion needs workers built from loaded models (LocalWorker.from_loaded)")
        engine = Engine.from_models(loaded, fusion, dict(self.templates))
        engine._fastest_first = self._fastest_first  # the same models: their measured speed order
        return engine

    @property
    def default_max_tokens(self) -> int:
        return self.fusion.default_max_tokens

    def kv_report(self) -> dict[str, dict[str, int]]:
        """Per source model whose runner holds KV slots (`fusion.batching`): slots, slots in
        use, tokens per slot, bytes preallocated."""
        return {w.name: kv for w in self.workers if (kv := w.kv_report())}

    @property
    def active_requests(self) -> int:
        return self._active

    @property
    def ready(self) -> bool:
        """False while a worker is unavailable (a Ray actor being restarted, a lost Ray
        cluster): /health 503 with `unavailable` as the reason."""
        return self.unavailable is None

    @property
    def unavailable(self) -> str | None:
        """Why the first unavailable worker is so; None when every worker can serve."""
        return next((w.unavailable for w in self.workers if w.unavailable is not None), None)

    def close(self) -> None:
        """Release the thread pool and every worker's resources (Ray actors)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for w in self.workers:
            w.shutdown()

    # ---- checks ----------------------------------------------------------------------------

    def _auto_weights(self, checked: Checked) -> dict[str, float]:
        """`weights: auto`: each model's total NLL of its own prompt tokens (after the first),
        from an exact full forward, per reference-tokenizer prompt token (coolfusion.core.selection)."""
        ids = self._all_prompt_ids(checked)

        def nll(w: Worker) -> float:
            return -sum(lp for lp, _ in w.sequence_logprobs(ids[w.name])) if len(ids[w.name]) > 1 else 0.0

        per = self.each_worker(nll, self.workers)
        n = len(ids[self.workers[0].name])
        return selection.auto_weights(dict(zip(self.source_names, per)), n, self.fusion.auto_temperature)

    def participants(self, model: str) -> list[Worker]:
        """The source models that model id `model` runs (UnknownModel if there is none)."""
        if model in VARIANTS:
            return self.workers
        if model in self._by_name:
            return [self._by_name[model]]
        raise UnknownModel(f"The model {model!r} does not exist; available: {', '.join(self.model_ids())}",
                           param="model")

    def reference(self, model: str) -> Worker:
        """The model whose tokens count `max_tokens` and `usage`, whose ids a token-id prompt
        holds, and on whose tokens log-probs are reported: the first configured model for the
        fused ids, the model itself for a source-model id."""
        return self.participants(model)[0]

    def _resolved(self, req: GenerationRequest, where: str = "prompt") -> GenerationRequest:
        """`max_tokens` defaulted, and a token-id prompt checked and given its text."""
        if req.max_tokens is None:
            req = replace(req, max_tokens=self.default_max_tokens)
        if req.prompt_ids is not None and req.prompt is None:
            ref = self.reference(req.model)
            validation.check_token_ids(req.prompt_ids, len(ref.text.tokenizer), ref.name, where)
            req = replace(req, prompt=ref.text.decode(list(req.prompt_ids), skip_special=True))
        return req

    def prompt_ids(self, w: Worker, req: GenerationRequest) -> list[int]:
        """Model `w`'s tokens of the request's prompt (its own chat template for messages; the
        client's ids themselves for the reference model of a token-id prompt)."""
        if req.prompt_ids is not None and w is self.reference(req.model):
            return list(req.prompt_ids)
        if req.messages is not None:
            text = chat.render(req.messages, self.templates.get(w.name), w.text.tokenizer, w.name)
            return w.text.encode(text, special=False)
        return w.text.encode(req.prompt, special=True)

    def check(self, req: GenerationRequest | Checked, where: str = "prompt") -> Checked:
        """Validate a request before any work: the typed 4xx error now, else the request with
        each participating model's prompt tokens (rendered and tokenized here, once).
        `where` names a token-id prompt in errors (e.g. "prompt[2]" of a list of prompts)."""
        if isinstance(req, Checked):
            return req
        workers = self.participants(req.model)
        req = self._resolved(req, where)
        validation.check_fields(req, fused=req.model in VARIANTS)
        selection.check(req.selection, self.source_names, self.fusion.select)
        ids = {}
        for w in workers:
            ids[w.name] = self.prompt_ids(w, req)
            validation.check_context(req, w.name, len(ids[w.name]), w.context_limit)
        return Checked(req, ids, len(ids[workers[0].name]))

    def _all_prompt_ids(self, checked: Checked) -> dict[str, list[int]]:
        """Every source model's prompt tokens (a single-model request holds only its own; its
        judge and `auto` weights need all)."""
        return {w.name: checked.prompt_ids.get(w.name) or self.prompt_ids(w, checked.request) for w in self.workers}

    # ---- generation --------------------------------------------------------------------------

    def start(self, req: GenerationRequest | Checked, cancel: threading.Event | None = None) -> Generation:
        """Check the request (raising its typed error now; a `Checked` one is not checked
        again) and return it running lazily."""
        checked = self.check(req)
        stats = Stats()
        return Generation(self._steps(checked, cancel, stats), stats)

    def generate(self, req: GenerationRequest | Checked, cancel: threading.Event | None = None) -> Iterator[Step]:
        """Yield one Step per selected segment. Closing the generator (or setting `cancel`)
        frees every KV cache of the request."""
        running = self.start(req, cancel)
        try:
            yield from running
        finally:
            running.close()

    def _steps(self, checked: Checked, cancel, stats) -> Iterator[Step]:
        req, prompt_tokens = checked.request, checked.prompt_tokens
        with self._active_lock:
            self._active += 1
        runs: list[loop.Run] = []
        try:
            scores = likelihood.Likelihood(self, req, cancel) if req.logprobs is not None else None
            echo = req.prompt if req.echo else ""
            if req.max_tokens == 0:  # echo only: the prompt scored, nothing generated
                yield Step("", req.model, False, (), "length", 0, prompt_tokens,
                           logprobs=scores.step("") if scores else (), echo=echo)
                return
            fused = req.model in VARIANTS
            # a single model never selects: its rule (and `auto` weights' forwards) only for its judge
            sel = self.selection_for(checked) if fused or req.judge else selection.Selection()
            rule = sel.describe() if fused else None
            raw = self._raw_steps(checked, cancel, stats, runs, sel)
            text = ""
            for step in output.finish(raw, req, self.reference(req.model).text, prompt_tokens, cancel):
                text += step.text
                if step.finish_reason is not None and req.judge:
                    step = replace(step, judge=self._judge(checked, text, step.eos, cancel, stats, runs, sel))
                if scores is not None:
                    step = replace(step, logprobs=scores.step(text, step.eos, step.end_id,
                                                              final=step.finish_reason is not None))
                if echo:
                    step, echo = replace(step, echo=echo), ""
                yield replace(step, selection=rule) if rule is not None else step
        finally:
            for r in runs:
                r.close()
            with self._active_lock:
                self._active -= 1

    def open_run(self, req: GenerationRequest, cancel: threading.Event | None = None) -> loop.Run:
        """The request's states on every participating worker, for driving the fusion loop
        step by step (`loop.segments(run)`, or propose / assess / select / commit) in tests
        and tools. The caller closes it: `run.close()` frees every KV cache."""
        checked = self.check(req)
        return self._open(self.participants(checked.request.model), checked, cancel, Stats(), [],
                          self.selection_for(checked), align=checked.request.model == COOL)

    def selection_for(self, checked: Checked) -> selection.Selection:
        """The request's selection rule: its `fusion` settings over the config's, with `auto`
        weights computed from the prompt (coolfusion.core.selection)."""
        r, f = checked.request.selection, self.fusion
        rule = r.select or f.select
        weights = r.weights if r.weights is not None else f.weights
        if rule != "weighted":
            weights = {}
        elif weights == selection.AUTO:
            weights = self._auto_weights(checked)
        score_end = {**f.score_end, **(r.score_end or {})}
        return selection.Selection(rule, dict(weights), r.end_scoring or f.end_scoring,
                                   frozenset(m for m, counts in score_end.items() if not counts))

    def each_worker(self, fn, workers: Sequence[Worker]) -> list:
        """fn(worker) for each of `workers`, in parallel on the engine's pool when it has one."""
        return loop.map_on(self._pool, fn, list(workers))

    def _open(self, workers, checked: Checked, cancel, stats, runs, sel, *, align=True) -> loop.Run:
        req = checked.request
        ids = checked.prompt_ids if all(w.name in checked.prompt_ids for w in workers) else self._all_prompt_ids(checked)
        states = []
        for i, w in enumerate(workers):
            seed = None if req.seed is None else req.seed + 1000 * i
            states.append(w.open(ids[w.name], Sampling(req.temperature, req.top_p, seed)))
        run = self.run_over(workers, states, cancel, stats, sel, align=align, chat=req.messages is not None,
                            drafting=self._drafting(req, workers))
        runs.append(run)
        return run

    def run_over(self, workers, states, cancel, stats, sel, *, align=True, chat=False,
                 drafting: speculation.Drafting | None = None) -> loop.Run:
        """The fusion loop's view of opened states (one per worker), with this engine's settings."""
        ends = [w.text.chat_end if chat else w.text.primary_end for w in workers]
        return loop.Run(workers, states, ends, self._pool, cancel, self.fusion.max_segment_tokens, stats,
                        score_mode=self.fusion.score, selection=sel, align=align, fast=self.fusion.fast_paths,
                        drafting=drafting)

    def _drafting(self, req: GenerationRequest, workers) -> speculation.Drafting | None:
        """Speculative proposals for this request (coolfusion.core.speculation), or None: only
        greedy, only with every fast path, and only where more than one model proposes."""
        on = self.fusion.speculative if req.speculative is None else req.speculative
        if not on or req.temperature > 0 or not self.fusion.fast_paths or len(workers) < 2:
            return None
        return speculation.Drafting(self.fusion.drafter, self.fastest_first, load=lambda: self._active,
                                    max_requests=self.fusion.speculative_max_requests)

    def fastest_first(self) -> tuple[str, ...]:
        """The source models by the measured time of a two-token forward (min of 5: a
        decode's cost, with the head over the vocabulary), cheapest first; measured once, when
        the first speculative step needs it (requests arriving meanwhile wait for it)."""
        with self._fastest_lock:
            if self._fastest_first is None:
                self._fastest_first = self._measure_fastest_first()
        return self._fastest_first

    def _measure_fastest_first(self) -> tuple[str, ...]:
        ids = [1, 2]

        def cost(w: Worker) -> float:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                w.sequence_logprobs(ids)
                times.append(time.perf_counter() - t)
            return min(times)

        costs = [cost(w) for w in self.workers]  # one at a time: no contention between them
        return tuple(n for _, n in sorted(zip(costs, self.source_names)))

    def _raw_steps(self, checked: Checked, cancel, stats, runs, sel) -> Iterator[loop.RawStep]:
        model = checked.request.model
        if model in (RERANK, COOL_RERANK):
            yield self._rerank(checked, cancel, stats, runs, sel)
            return
        run = self._open(self.participants(model), checked, cancel, stats, runs, sel,
                         align=model == COOL)  # else each proposer's own boundaries
        yield from loop.segments(run)

    def complete_text(self, req: GenerationRequest | Checked, cancel=None) -> tuple[str, str]:
        """Run a request to the end; return (text, finish_reason)."""
        text, finish = [], None
        for step in self.generate(req, cancel):
            text.append(step.text)
            finish = step.finish_reason
        return "".join(text), finish

    def _judge(self, checked: Checked, text, eos, cancel, stats, runs, sel) -> Candidate:
        """Every source model's PPL of a whole output after the prompt (paper Table 3, row 1),
        and its score under the request's selection rule."""
        run = self._open(self.workers, checked, cancel, stats, runs, sel)
        return loop.rerank(run, [(text, eos, (checked.request.model,))]).candidates[0]

    def _rerank(self, checked: Checked, cancel, stats, runs, sel) -> loop.RawStep:
        """Each source model (and, for Cool+Rerank, Cool) writes a whole answer, then every
        model scores every answer. The answers are written concurrently on threads of their
        own: the shared pool serves only per-phase worker calls, which never nest."""
        req, ids_of = checked.request, self._all_prompt_ids(checked)
        single = replace(req, trace=False, judge=False, logprobs=None, echo=False,
                         selection=sel.as_request())  # resolved: `auto` weights are not computed again

        def answer(m: str) -> Checked:  # checked with the whole request; the prompts as tokenized then
            same_ids = self.reference(m) is self.reference(req.model)  # a token-id prompt: the reference's ids
            names = [w.name for w in self.participants(m)]
            return Checked(replace(single, model=m, prompt_ids=req.prompt_ids if same_ids else None),
                           {n: ids_of[n] for n in names}, len(ids_of[names[0]]))

        ids = list(self.source_names) + ([COOL] if req.model == COOL_RERANK else [])
        if self._pool is not None:
            with ThreadPoolExecutor(max_workers=len(self.source_names), thread_name_prefix="cf-rerank") as ex:
                futures = [ex.submit(self.complete_text, answer(m), cancel) for m in self.source_names]
                outs = [f.result() for f in futures]
            if req.model == COOL_RERANK:  # uses every worker: after the single answers
                outs.append(self.complete_text(answer(COOL), cancel))
        else:
            outs = [self.complete_text(answer(m), cancel) for m in ids]
        conts = [(text, finish == "stop", (m,)) for m, (text, finish) in zip(ids, outs)]
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
        run = self._open(self.workers, checked, cancel, stats, runs, sel)
        return loop.rerank(run, conts)
