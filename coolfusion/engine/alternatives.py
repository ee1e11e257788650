"""The fused top alternative of each reported position (`logprobs: 1` on a fused id).

The alternative at position j of a request's reference tokens `ids` is, by definition, the
first reference token of the segment that the same fused id, with the request's selection
settings, selects greedily after ids[:j] as a token-id prompt (a `max_tokens: 1`
generation), with the value such a request reports for it (coolfusion.engine.likelihood).
The request's prompt for model v is then P_v(j) = T_v(decode(ids[:j])) (the reference's:
ids[:j] itself). `Alternatives.at` answers every position of one Step at once, each by the
cheapest of four paths, all giving that same token:

- **cached**: kept by (model id, selection, prefix), so the choices of a multiple-choice
  question share their context's alternatives (an entry known by its token only gets its
  value when a later request needs it).
- **known** (no model work): the request's values come from one full forward of each model
  over its tokens W_v of the whole text; its rows hold each model's argmax after every
  prefix of W_v. Where P_v(j) is a prefix of W_v, model v's greedy decoding from there is
  read off the rows as long as its argmaxes follow W_v; the first argmax that leaves W_v is
  still known (its row is that of a prefix of W_v: the bonus token of speculative decoding),
  what would follow it is not. Each argmax must lead its row by `MARGIN` (a near tie in a
  many-token forward may go the other way in step-by-step decoding) and not be an end token.
  The proposer's own cut (`TokenizerSide.first_cut`, the boundary rule) applied to these
  tokens gives its proposal, when it cuts before the knowledge ends. When every model's
  proposal is known and each one's first reference token, as `output.finish` cuts it at
  `max_tokens` 1, is the text's token at j, that is the alternative whichever is selected.
- **step**: one fused step (`loop.step`) from one state per model that walks the sequence
  (`Worker.rewind`: only the tokens after the longest common prefix are fed), its
  proposals' tokens dropped at the next position. When the selected token is not the one at
  j, its value is each model's log-prob of its own tokens of that text, scored from the same
  state (`score`, `nll_sum`), averaged: the request's definition, from a cached forward
  (float rounding: ~1e-6 off the full forward that the request would use).
- **request**: the `max_tokens: 1` generation itself, for what the others do not cover:
  the rerank ids, `weights: auto` (its weights depend on the prompt), and an odd cut (a
  segment of no text that does not end the turn, a first token that is not the whole cut).

The positions left to a step (or a request) are split into `walks(...)` contiguous runs,
up to `MAX_WALKS` and at most half the models' free KV slots; each run is walked in order by
its own states in its own thread, so the decoding and scoring forwards of the runs meet in
each model's batched forward (coolfusion.runtime.batched_runner) instead of following one
another. The runs' states are made first (`_Request.open_walks`): the last run's opened at
its first position, the others forked from it (`Worker.fork`: the KV of the common prefix
copied), so each model prefills the text once, not once per run. A run's answers do not
depend on which run walks them: a step's state holds exactly its prompt (and the greedy
tokens known to follow it) whatever it held before. The states
of every walk are closed before the Step is returned; `cancel` (the request timeout, a
disconnect) is checked before each position of every run, and a failed run stops the others
at their next position. `paths` counts how many positions each path answered (the
benchmark prints the shares).
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

from coolfusion.core import loop, output, selection
from coolfusion.core.errors import Cancelled
from coolfusion.core.selection import SelectionRequest
from coolfusion.core.types import COOL, COOL_NOALIGN, GenerationRequest, Stats
from coolfusion.engine.client import Checked
from coolfusion.workers.protocol import Sampling, Worker

MARGIN = 0.05  # nats between the top two log-probs below which a full forward's argmax is not trusted
MAX_WALKS = 16  # runs of positions walked at once (each holds a KV slot of every model)
LOOP_IDS = (COOL, COOL_NOALIGN)  # the fused ids whose answer is the fusion loop's first segment

Alt = tuple[int, str, float | None]  # token id, its text, its value (None: not computed yet)


@dataclass
class Forward:
    """One model's tokens of the whole scored text and its full forward's rows over them
    (`sequence_logprobs(ids, 2)`: row i is log p(ids[i+1]) and the top two after ids[:i+1])."""

    ids: list[int]
    rows: list


@dataclass
class _Pending:
    """A position the full forwards do not answer: its `max_tokens: 1` request (resolved),
    each model's prompt, and the greedy (token, log p) its rows show after it (a fused step
    starts its decoding from those)."""

    j: int
    sub: GenerationRequest
    prompts: list[list[int]]
    greedy: list[list[tuple[int, float]]]


class Alternatives:
    """The fused alternatives, kept by (model id, selection settings, prefix ids): greedy
    decoding gives the same token for the same prefix. Bounded (LRU)."""

    def __init__(self, size: int = 4096, max_walks: int = MAX_WALKS):
        self._size = size
        self.max_walks = max_walks  # runs of positions walked at once, at most (1: one walk after another)
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple, Alt | None] = OrderedDict()
        self.paths: Counter = Counter()  # positions answered per path: cached, known, step, request
        self.most_walks = 0  # the most runs of positions one request walked at once (tests, benchmark)

    def _key(self, model: str, sel: SelectionRequest, prefix) -> tuple:
        return (model, repr(sel), tuple(prefix))

    def _lookup(self, key) -> tuple[bool, Alt | None]:
        with self._lock:
            if key not in self._kept:
                return False, None
            self._kept.move_to_end(key)
            return True, self._kept[key]

    def _keep(self, key, alt: Alt | None) -> None:
        with self._lock:
            self._kept[key] = alt
            self._kept.move_to_end(key)
            while len(self._kept) > self._size:
                self._kept.popitem(last=False)

    def _count(self, path: str) -> None:
        with self._lock:
            self.paths[path] += 1

    def get(self, engine, model: str, prefix: tuple[int, ...], cancel,
            selection: SelectionRequest = SelectionRequest()) -> Alt | None:
        """The alternative after `prefix` from a `max_tokens: 1` generation (the definition)."""
        key = self._key(model, selection, prefix)
        found, alt = self._lookup(key)
        if found and (alt is None or alt[2] is not None):
            return alt
        sub = definition(model, prefix, selection)
        first = next((e for step in engine.generate(sub, cancel) for e in step.logprobs), None)
        alt = None if first is None else (first.token_id, first.token, first.logprob)
        self._keep(key, alt)
        return alt

    def at(self, engine, req: GenerationRequest, ids: list[int], positions: list[int],
           forwards: dict[str, Forward], cancel) -> dict[int, Alt | None]:
        """The alternative at each of `positions` (>= 1) of the reference tokens `ids`;
        `forwards`: each model's full forward over the whole text (for the known path). The
        positions left to a fused step are walked in `walks(...)` contiguous runs at once,
        each by its own states in its own thread (their forwards meet in each model's batch)."""
        out: dict[int, Alt | None] = {}
        request = _Request(self, engine, req, cancel)
        pending: list[_Pending] = []
        for j in positions:
            found, alt = self._lookup(self._key(req.model, req.selection, ids[:j]))
            if found and (alt is None or alt[0] == ids[j] or alt[2] is not None):
                out[j] = alt
                self._count("cached")
                continue
            known = request.known(ids, j, forwards)
            if isinstance(known, _Pending):
                pending.append(known)
            else:
                out[j] = known
                self._count("known")
                self._keep(self._key(req.model, req.selection, ids[:j]), known)
        k = walks(engine, len(pending), self.max_walks)
        with self._lock:
            self.most_walks = max(self.most_walks, k if pending else 0)
        stop = threading.Event()  # a walk failed: the others stop at their next position
        runs = [pending[i * len(pending) // k: (i + 1) * len(pending) // k] for i in range(k)]
        starts = request.open_walks([run[0] for run in runs]) if pending else []

        def walk(run_and_states) -> list[tuple[int, str, Alt | None]]:
            run_of, states = run_and_states
            w = _Walk(request, states)
            try:
                answers = []
                for pos in run_of:
                    if stop.is_set():
                        break
                    answers.append((pos.j, *w.alternative(ids, pos)))
                return answers
            except BaseException:
                stop.set()
                raise
            finally:
                w.close()

        with ThreadPoolExecutor(max_workers=k, thread_name_prefix="cf-alternatives") if k > 1 else nullcontext() as pool:
            answered = loop.map_on(pool, walk, list(zip(runs, starts)))
        for j, path, alt in (a for answers in answered for a in answers):
            self._count(path)
            out[j] = alt
            if path != "request":  # `get` keeps its own
                self._keep(self._key(req.model, req.selection, ids[:j]), alt)
        return out


def definition(model: str, prefix, selection: SelectionRequest) -> GenerationRequest:
    """The `max_tokens: 1` generation that defines the alternative after `prefix` (the
    request's own selection rule chooses, as it would)."""
    return GenerationRequest(prompt_ids=tuple(prefix), model=model, max_tokens=1, temperature=0.0, logprobs=0,
                             selection=selection)


def walks(engine, n: int, most: int = MAX_WALKS) -> int:
    """How many runs of positions to walk at once: one per position up to `most`, each
    holding a KV slot of every model for as long as it walks, so at most half the slots free
    now (the rest is left to other requests, which would wait for a slot); one without
    batching (the forwards could not meet)."""
    if n <= 1 or not engine.fusion.batching:
        return 1
    free = [kv["slots"] - kv["slots_in_use"] for kv in engine.kv_report().values()]
    room = min(free) if free else engine.fusion.kv_slots  # Ray actors do not report theirs
    return max(1, min(most, n, room // 2))


class _Request:
    """What every walk of one request shares: its settings, the definition's requests, and
    the known path's check."""

    def __init__(self, kept: Alternatives, engine, req: GenerationRequest, cancel):
        self.kept, self.engine, self.req, self.cancel = kept, engine, req, cancel
        self.sel = _fixed_selection(engine, req)
        self.workers: list[Worker] = engine.participants(req.model)
        self.ref = self.workers[0]
        self.align = req.model == COOL

    def open_walks(self, firsts: list[_Pending]) -> list[list | None]:
        """Each run's states, one per model, at its first position (None: a request path,
        no states): the last run's opened on its prompt, the others forked from it (longest
        first), so each model feeds the text's prefix once, not once per run."""
        if self.req.model not in LOOP_IDS or self.sel is None:
            return [None] * len(firsts)
        order = sorted(range(len(firsts)), key=lambda r: firsts[r].j, reverse=True)

        def open_model(i: int) -> list:
            w, states = self.workers[i], [None] * len(firsts)
            try:
                base = states[order[0]] = w.open(firsts[order[0]].prompts[i], Sampling())
                for r in order[1:]:
                    if self.cancel is not None and self.cancel.is_set():
                        raise Cancelled("generation cancelled")
                    states[r] = w.fork(base, firsts[r].prompts[i], firsts[r].greedy[i])
            except BaseException:
                for st in states:
                    if st is not None:
                        w.close(st)
                raise
            return states

        def guarded(i: int):  # every model's states are opened (or closed) before any error is raised
            try:
                return open_model(i)
            except BaseException as err:
                return err

        per_model, failed = [], None
        for i, got in enumerate(self.engine.each_worker(guarded, range(len(self.workers)))):
            if isinstance(got, BaseException):
                failed = failed or got
            else:
                per_model.append((i, got))
        if failed is not None:
            for i, states in per_model:
                for st in states:
                    self.workers[i].close(st)
            raise failed
        return [[states[r] for _, states in per_model] for r in range(len(firsts))]

    def requested(self, prefix: list[int]) -> Alt | None:
        return self.kept.get(self.engine, self.req.model, tuple(prefix), self.cancel, self.req.selection)

    def known(self, ids: list[int], j: int, forwards: dict[str, Forward]) -> Alt | _Pending:
        """The alternative at j when the full forwards show it (whichever proposal is
        selected, its first token is the text's), else what a step or request needs."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("generation cancelled")
        checked = self.engine.check(definition(self.req.model, ids[:j], self.req.selection))
        sub = checked.request
        prompts = [checked.prompt_ids[w.name] for w in self.workers]
        if self.req.model not in LOOP_IDS or self.sel is None:
            return _Pending(j, sub, prompts, [[] for _ in self.workers])
        texts, greedy = self._known(prompts, forwards)
        if texts is not None:
            firsts = [self.first_token(sub, loop.RawStep(t, self.ref.name, False, ())) for t in texts]
            if all(a is not None and a[0][0] == ids[j] for a in firsts):
                return (*firsts[0][0], None)
        return _Pending(j, sub, prompts, greedy)

    # ---- the known path ---------------------------------------------------------------------

    def _known(self, prompts: list[list[int]], forwards: dict[str, Forward]) -> tuple[list[str] | None, list]:
        """Every model's proposal after its prompt when the full forwards show them all (else
        None), and per model the greedy tokens they show (a fused step starts from those)."""
        texts, greedy = [], []
        for w, p in zip(self.workers, prompts):
            f = forwards.get(w.name)
            text, tokens = (None, []) if f is None else self._known_proposal(w, p, f)
            texts.append(text)
            greedy.append(tokens)
        return (None if None in texts else texts), greedy

    def _known_proposal(self, w: Worker, prompt: list[int], f: Forward) -> tuple[str | None, list]:
        """Model w's greedy proposal after `prompt` if the rows show it (else None), and the
        greedy (token, log p) they show from there."""
        m = len(prompt)
        if m == 0 or f.ids[:m] != prompt:
            return None, []  # its state after this prefix is not a prefix of the whole text's tokens
        splitters = (tuple(w.options.all_words) or (w.text.words,)) if self.align else (w.text.words,)
        greedy: list[tuple[int, float]] = []
        ends: list[int | None] = []
        for k in range(m, len(f.ids)):
            _, top = f.rows[k - 1]  # the distribution after ids[:k]
            (best, lp1), (_, lp2) = top[0], top[1]
            if lp1 - lp2 < MARGIN or best in w.text.end_ids:
                return None, greedy
            greedy.append((best, lp1))
            toks = [t for t, _ in greedy]
            ends.append(w.text.decoded_end(toks))
            found = w.text.first_cut(toks, ends, splitters)
            if found is not None:
                return found[0], greedy
            if len(toks) >= self.engine.fusion.max_segment_tokens or best != f.ids[k]:
                return None, greedy  # capped (left to the real step), or off the text: no row for what follows
        return None, greedy  # the text ended before the cut

    def first_token(self, sub: GenerationRequest, raw: loop.RawStep) -> tuple[tuple[int, str], str] | None:
        """((id, text) of the first reference token the sub-request reports, its text G) after
        the segment `raw`, cut as `output.finish` cuts it at max_tokens 1; None when that is
        not one whole token (left to the request)."""
        first = next(output.finish([raw], sub, self.ref.text, 0, None))
        g = first.text
        if not g:
            if not first.eos:
                return None
            end = self.ref.text.primary_end  # an ending with no text: the end token comes first
            return (end, self.ref.text.token_text(end)), ""
        toks, _, ends = self.ref.text.encode_with_ends(g)
        if len(toks) != 1 or ends[0] != len(g):
            return None
        return (toks[0], self.ref.text.token_text(toks[0])), g


class _Walk:
    """One run of positions walked in order by one state per model (`states`, at its first
    position; None when its positions are requests), each position's proposals' tokens
    dropped at the next."""

    def __init__(self, request: _Request, states: list | None):
        self.request = request
        self.run = None if states is None else request.engine.run_over(
            request.workers, states, request.cancel, Stats(), request.sel, align=request.align)

    def close(self) -> None:
        if self.run is not None:
            self.run.close()

    def alternative(self, ids: list[int], pos: _Pending) -> tuple[str, Alt | None]:
        r = self.request
        if r.cancel is not None and r.cancel.is_set():
            raise Cancelled("generation cancelled")
        if r.req.model not in LOOP_IDS or r.sel is None:
            return "request", r.requested(ids[:pos.j])
        raw = self._step(pos.prompts, pos.greedy)
        alt = r.first_token(pos.sub, raw)
        if alt is None:
            return "request", r.requested(ids[:pos.j])
        (tid, text), g = alt
        if tid == ids[pos.j]:
            return "step", (tid, text, None)
        value = self._value(g, raw)
        return ("step", (tid, text, value)) if value is not None else ("request", r.requested(ids[:pos.j]))

    # ---- the step path ----------------------------------------------------------------------

    def _step(self, prompts: list[list[int]], greedy: list) -> loop.RawStep:
        """One fused step after the prompts, from the walking states; each model's decoding
        starts from the greedy tokens the full forward showed (`greedy`, as lookahead)."""
        r = self.request
        for w, st, p, g in zip(r.workers, self.run.states, prompts, greedy):
            w.rewind(st, p, g)
        return loop.step(self.run)

    def _value(self, g: str, raw: loop.RawStep) -> float | None:
        """The fused value of the alternative G (of the end token when G is empty: an ending):
        the mean over models of log P_v(T_v(G) | P_v), from the step's own scores when G is
        the whole winner and every model scored it, else scored from the walking states."""
        workers = self.request.workers
        won = next((c for c in raw.candidates if g and (c.text, c.eos) == (g, False) and c.ppl
                    and len(c.ppl) == len(workers)), None)
        if won is not None:
            mean_nll = self.request.engine.fusion.score == "mean_nll"  # PPL = exp(mean NLL), else exp(sum)
            nlls = [math.log(won.ppl[w.name]) * (len(w.text.encode(g)) if mean_nll else 1) for w in workers]
        else:
            def nll(w: Worker, st) -> float:
                cand = (g, False) if g else ("", True)
                return math.log(w.score(st, [cand], end_id=w.text.primary_end, mode="nll_sum")[0])

            nlls = self.run.each(nll)
        if not all(math.isfinite(x) and x < 700.0 for x in nlls):  # nll_sum's exp is capped at 700
            return None
        return sum(-x for x in nlls) / len(nlls)


def _fixed_selection(engine, req: GenerationRequest) -> selection.Selection | None:
    """The request's selection rule when it does not depend on the prompt; None for `auto`
    weights (computed from each prefix, so every position is a request of its own)."""
    r, f = req.selection, engine.fusion
    weights = r.weights if r.weights is not None else f.weights
    if (r.select or f.select) == "weighted" and weights == selection.AUTO:
        return None
    return engine.selection_for(Checked(req))
