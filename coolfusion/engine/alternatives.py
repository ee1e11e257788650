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
  the rerank ids, `weights: auto` (its weights depend on the prompt), a known segment whose first token is not the text's, and an odd cut (a
  segment of no text that does not end the turn, a first token that is not the whole cut).

A walk is one per Step: its states are closed before the Step is returned (or cancelled:
`cancel` is checked before each fused step, so the request timeout and a disconnect stop
it). `paths` counts how many positions each path answered (the benchmark prints the shares).
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

from coolfusion.core import loop, output, selection
from coolfusion.core.errors import Cancelled
from coolfusion.core.selection import SelectionRequest
from coolfusion.core.types import COOL, COOL_NOALIGN, GenerationRequest, Stats
from coolfusion.engine.client import Checked
from coolfusion.workers.protocol import Sampling, Worker

MARGIN = 0.05  # nats between the top two log-probs below which a full forward's argmax is not trusted
LOOP_IDS = (COOL, COOL_NOALIGN)  # the fused ids whose answer is the fusion loop's first segment

Alt = tuple[int, str, float | None]  # token id, its text, its value (None: not computed yet)


@dataclass
class Forward:
    """One model's tokens of the whole scored text and its full forward's rows over them
    (`sequence_logprobs(ids, 2)`: row i is log p(ids[i+1]) and the top two after ids[:i+1])."""

    ids: list[int]
    rows: list


class Alternatives:
    """The fused alternatives, kept by (model id, selection settings, prefix ids): greedy
    decoding gives the same token for the same prefix. Bounded (LRU)."""

    def __init__(self, size: int = 4096):
        self._size = size
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple, Alt | None] = OrderedDict()
        self.paths: Counter = Counter()  # positions answered per path: cached, known, step, request

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

    def get(self, engine, model: str, prefix: tuple[int, ...], cancel,
            selection: SelectionRequest = SelectionRequest()) -> Alt | None:
        """The alternative after `prefix` from a `max_tokens: 1` generation (the definition)."""
        key = self._key(model, selection, prefix)
        found, alt = self._lookup(key)
        if found and (alt is None or alt[2] is not None):
            return alt
        sub = GenerationRequest(prompt_ids=tuple(prefix), model=model, max_tokens=1, temperature=0.0, logprobs=0,
                                selection=selection)  # the request's own rule chooses, as it would
        first = next((e for step in engine.generate(sub, cancel) for e in step.logprobs), None)
        alt = None if first is None else (first.token_id, first.token, first.logprob)
        self._keep(key, alt)
        return alt

    def at(self, engine, req: GenerationRequest, ids: list[int], positions: list[int],
           forwards: dict[str, Forward], cancel) -> dict[int, Alt | None]:
        """The alternative at each of `positions` (>= 1) of the reference tokens `ids`;
        `forwards`: each model's full forward over the whole text (for the known path)."""
        out: dict[int, Alt | None] = {}
        todo = []
        for j in positions:
            found, alt = self._lookup(self._key(req.model, req.selection, ids[:j]))
            if found and (alt is None or alt[0] == ids[j] or alt[2] is not None):
                out[j] = alt
                self.paths["cached"] += 1
            else:
                todo.append(j)
        if not todo:
            return out
        walk = _Walk(self, engine, req, cancel)
        try:
            for j in todo:
                path, alt = walk.alternative(ids, j, forwards)
                self.paths[path] += 1
                out[j] = alt
                if path != "request":  # `get` keeps its own
                    self._keep(self._key(req.model, req.selection, ids[:j]), alt)
        finally:
            walk.close()
        return out


class _Walk:
    """One request's walk along its positions: the requests it would make, the known path's
    check, and (opened at the first fused step) one state per model."""

    def __init__(self, kept: Alternatives, engine, req: GenerationRequest, cancel):
        self.kept, self.engine, self.req, self.cancel = kept, engine, req, cancel
        self.sel = _fixed_selection(engine, req)
        self.workers: list[Worker] = engine.participants(req.model)
        self.ref = self.workers[0]
        self.align = req.model == COOL
        self.run: loop.Run | None = None

    def close(self) -> None:
        if self.run is not None:
            self.run.close()

    def sub_request(self, prefix: list[int]) -> GenerationRequest:
        """The `max_tokens: 1` generation that defines the alternative after `prefix`."""
        return GenerationRequest(prompt_ids=tuple(prefix), model=self.req.model, max_tokens=1, temperature=0.0,
                                 logprobs=0, selection=self.req.selection)

    def alternative(self, ids: list[int], j: int, forwards: dict[str, Forward]) -> tuple[str, Alt | None]:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("generation cancelled")
        if self.req.model not in LOOP_IDS or self.sel is None:
            return "request", self._requested(ids[:j])
        checked = self.engine.check(self.sub_request(ids[:j]))
        sub = checked.request
        prompts = [checked.prompt_ids[w.name] for w in self.workers]
        known, greedy = self._known(prompts, forwards)
        if known is not None:  # whichever proposal is selected, its first token is the text's
            firsts = [self._first_token(sub, loop.RawStep(t, self.workers[0].name, False, ())) for t in known]
            if all(a is not None and a[0][0] == ids[j] for a in firsts):
                return "known", (*firsts[0][0], None)
        raw = self._step(prompts, greedy)
        alt = self._first_token(sub, raw)
        if alt is None:
            return "request", self._requested(ids[:j])
        (tid, text), g = alt
        if tid == ids[j]:
            return "step", (tid, text, None)
        value = self._value(g, raw)
        return ("step", (tid, text, value)) if value is not None else ("request", self._requested(ids[:j]))

    def _requested(self, prefix: list[int]) -> Alt | None:
        return self.kept.get(self.engine, self.req.model, tuple(prefix), self.cancel, self.req.selection)

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

    # ---- the step path ----------------------------------------------------------------------

    def _step(self, prompts: list[list[int]], greedy: list) -> loop.RawStep:
        """One fused step after the prompts, from the walking states; each model's decoding
        starts from the greedy tokens the full forward showed (`greedy`, as lookahead)."""
        if self.run is None:
            self.run = self.engine.run_over(self.workers, [w.open(p, Sampling()) for w, p in zip(self.workers, prompts)],
                                            self.cancel, Stats(), self.sel, align=self.align)
        for w, st, p, g in zip(self.workers, self.run.states, prompts, greedy):
            w.rewind(st, p, g)
        return loop.step(self.run)

    def _first_token(self, sub: GenerationRequest, raw: loop.RawStep) -> tuple[tuple[int, str], str] | None:
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

    def _value(self, g: str, raw: loop.RawStep) -> float | None:
        """The fused value of the alternative G (of the end token when G is empty: an ending):
        the mean over models of log P_v(T_v(G) | P_v), from the step's own scores when G is
        the whole winner and every model scored it, else scored from the walking states."""
        won = next((c for c in raw.candidates if g and (c.text, c.eos) == (g, False) and c.ppl
                    and len(c.ppl) == len(self.workers)), None)
        if won is not None:
            mean_nll = self.engine.fusion.score == "mean_nll"  # PPL = exp(mean NLL), else exp(sum)
            nlls = [math.log(won.ppl[w.name]) * (len(w.text.encode(g)) if mean_nll else 1) for w in self.workers]
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
