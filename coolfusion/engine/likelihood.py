"""Log-likelihoods for `logprobs` and `echo`: the tokens each Step of such a request reports.

The engine makes one `Likelihood` per request that asks for log-probs, and asks it, for every
Step it yields, for the tokens of that Step's text (`step`); with `echo`, the first Step also
gets the prompt's tokens. Tokens are those of the request's *reference* tokenizer (the model's
own for a source-model id, the first configured model's for the fused ids): the prompt's
tokens (the ids the client sent, or the tokenizer's tokens of the prompt text) followed by
the tokens of the generated text G tokenized alone (as `max_tokens` counts them: these are
the tokens a source model generated unless re-tokenizing its text differs), and, when the
output ended its turn, the end token. Every value is computed again, when its Step is sent,
from a full forward without cache of the whole sequence so far (one per participating model
per Step); a Step's last token waits for the next Step, since the text after it may still
change its tokenization (`step`).

- **Source-model id**: log p(token | every token before it) under that model, exactly, and
  the `top` most likely tokens from the same row; the prompt's first token has none (null).
- **Fused ids**: for each model v, its own tokens of the same text as the engine feeds it
  (T_v(prompt), or the client's ids for the reference model, then T_v(G), then v's end
  token), and their exact log-probs; each v-token's log-prob goes to the reference token in
  which it ends (`coolfusion.runtime.logprobs.assign`); a reference token's value is the mean over models.
  Over a span whose two edges are token boundaries of every model, the sum is the mean over
  models of log P_v(span | text before it).
- **The fused alternative** (`logprobs: 1`): at position i, the token that the same fused
  id, with the request's selection settings (`fusion.select`, ...), generates after
  tokens[:i] (as a token-id prompt) greedily with max_tokens 1, with the
  value such a request reports for its generated token; if it is the token at position i,
  that token's own value there. So lm-eval's greedy check (token value == best alternative's)
  holds exactly when the fused id, one token at a time, reproduces the text. It costs one
  fused generation per reported position; results are kept by prefix (`Alternatives`), so the
  choices of one multiple-choice question share their context's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from coolfusion.runtime import logprobs
from coolfusion.core.selection import SelectionRequest
from coolfusion.core.types import VARIANTS, GenerationRequest, TokenLogprob
from coolfusion.workers.protocol import Worker


@dataclass
class _Tokens:
    """One model's tokens of the scored text: ids, and the char offsets where each starts and
    ends in it (the prompt's text, then G; a chat prompt's tokens end at 0: not part of it)."""

    ids: list[int]
    starts: list[int]
    ends: list[int]


@dataclass
class _Scored:
    """The reference tokens of prompt + G (+ end) and the value and top alternatives of each."""

    tokens: _Tokens
    values: list[float | None]
    tops: list[tuple[tuple[int, float], ...]]  # source-model ids: from the same forward
    n_prompt: int  # leading tokens that are the prompt's (0 for chat: not reported)
    eos: bool  # the last token is the end token


class Alternatives:
    """The fused alternative after a prefix, kept by (model id, selection settings, prefix
    ids): greedy decoding gives the same token for the same prefix, so it is computed once.
    Bounded (LRU)."""

    def __init__(self, size: int = 4096):
        self._size = size
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple, tuple[int, str, float] | None] = OrderedDict()

    def get(self, engine, model: str, prefix: tuple[int, ...], cancel,
            selection: SelectionRequest = SelectionRequest()) -> tuple[int, str, float] | None:
        key = (model, repr(selection), prefix)
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        sub = GenerationRequest(prompt_ids=prefix, model=model, max_tokens=1, temperature=0.0, logprobs=0,
                                selection=selection)  # the request's own rule chooses, as it would
        first = next((e for step in engine.generate(sub, cancel) for e in step.logprobs), None)
        alt = None if first is None else (first.token_id, first.token, first.logprob)
        with self._lock:
            self._kept[key] = alt
            while len(self._kept) > self._size:
                self._kept.popitem(last=False)
        return alt


class Likelihood:
    """The log-probs one request reports, Step by Step (see the module docstring)."""

    def __init__(self, engine, req: GenerationRequest, cancel=None):
        self.engine, self.req, self.cancel = engine, req, cancel
        self.workers = engine.participants(req.model)
        self.ref = engine.reference(req.model)
        self.fused = req.model in VARIANTS
        self.chat = req.messages is not None
        self.x = "" if self.chat else req.prompt  # the scored text: the prompt's, then G
        self._prompts = {w.name: self._prompt_tokens(w) for w in self.workers}
        self._sent = 0  # chars of G whose tokens were reported
        self._first = True

    def _prompt_tokens(self, w: Worker) -> _Tokens:
        ids = self.engine.prompt_ids(w, self.req)
        if self.chat:
            return _Tokens(ids, [0] * len(ids), [0] * len(ids))
        if self.req.prompt_ids is not None and w is self.ref:
            _, ends = w.text.text_of(ids)
            return _Tokens(ids, [0] + ends[:-1], ends)
        enc, starts, ends = w.text.encode_with_ends(self.req.prompt, special=True)
        assert enc == ids, "prompt_ids and encode_with_ends disagree"
        return _Tokens(ids, starts, ends)

    # ---- per Step -----------------------------------------------------------------------------

    def step(self, g: str, eos: bool = False, end_id: int | None = None,
             final: bool = True) -> tuple[TokenLogprob, ...]:
        """The tokens to report with the Step after which the output is `g`: the prompt's
        (first Step, with echo), the generated ones not reported yet, and the end token when
        the output ended its turn (`eos`; `end_id`: a source model's own). Until the `final`
        Step the last token of T(G) waits: text that follows may still change how it is
        tokenized ("\n" then "\n" is one token "\n\n"), so it comes with a later Step."""
        sc = self._score(g, eos, end_id)
        tok = sc.tokens
        n = len(tok.ids) - sc.eos
        x = len(self.x)
        base = 0 if self.req.echo else x  # offsets are in the choice's text
        picked = list(range(sc.n_prompt)) if self._first and self.req.echo else []
        last = n if final else n - 1  # generated tokens sc.n_prompt..last-1 are reported now
        picked += [j for j in range(sc.n_prompt, last) if tok.ends[j] - x > self._sent]
        picked += [n] if sc.eos else []
        self._first = False
        if last > sc.n_prompt:
            self._sent = max(self._sent, tok.ends[last - 1] - x)
        out = []
        for j in picked:
            text = self.ref.text.token_text(tok.ids[j])
            out.append(TokenLogprob(text, sc.values[j], tok.starts[j] - base, self._top(sc, j), tok.ids[j]))
        return tuple(out)

    def _top(self, sc: _Scored, j: int) -> tuple[tuple[str, float], ...] | None:
        if sc.values[j] is None:
            return None  # the first token: no distribution to rank
        if not self.req.logprobs:
            return ()
        if not self.fused:
            return tuple((self.ref.text.token_text(t), v) for t, v in sc.tops[j])
        alt = self.engine.alternatives.get(self.engine, self.req.model, tuple(sc.tokens.ids[:j]), self.cancel,
                                           self.req.selection)
        if alt is None:
            return ()
        tid, text, value = alt
        return ((text, sc.values[j]),) if tid == sc.tokens.ids[j] else ((text, value),)

    # ---- scoring ------------------------------------------------------------------------------

    def _tokens(self, w: Worker, g: str, end: int | None) -> _Tokens:
        """Model w's tokens of prompt + G (+ its end token `end`), as the engine feeds them."""
        p = self._prompts[w.name]
        ids, starts, ends = w.text.encode_with_ends(g)
        x = len(self.x)
        tok = _Tokens(p.ids + ids, p.starts + [x + s for s in starts], p.ends + [x + e for e in ends])
        if end is not None:
            tok.ids.append(end)
            tok.starts.append(x + len(g))
            tok.ends.append(x + len(g))
        return tok

    def _end_token(self, w: Worker) -> int:
        return w.text.chat_end if self.chat else w.text.primary_end

    def _score(self, g: str, eos: bool, end_id: int | None) -> _Scored:
        top = self.req.logprobs if not self.fused else 0
        if not self.fused:
            end = (end_id if end_id is not None else self._end_token(self.ref)) if eos else None
            tok = self._tokens(self.ref, g, end)
            rows = self.ref.sequence_logprobs(tok.ids, top)
            return _Scored(tok, [None] + [r[0] for r in rows], [()] + [r[1] for r in rows],
                           len(self._prompts[self.ref.name].ids), eos)
        ref_tok = self._tokens(self.ref, g, self._end_token(self.ref) if eos else None)
        ref_ends = ref_tok.ends[: len(ref_tok.ends) - eos]  # the end token's value is assigned apart
        per = self.engine.each_worker(
            lambda w: self._model_values(w, g, self._end_token(w) if eos else None, ref_ends), self.workers)
        values: list[float | None] = logprobs.mean(per)
        values[0] = None  # the text's first token has no context (OpenAI's null)
        return _Scored(ref_tok, values, [()] * len(values), len(self._prompts[self.ref.name].ids), eos)

    def _model_values(self, w: Worker, g: str, end: int | None, ref_ends: list[int]) -> list[float]:
        """Model w's log-probs of its tokens, summed per reference token (`ref_ends`: where each
        of prompt + G ends; the end token's to the reference's end token)."""
        tok = self._tokens(w, g, end)
        vals = [None] + [r[0] for r in w.sequence_logprobs(tok.ids, 0)]
        n = len(tok.ids) - (end is not None)
        out = logprobs.assign(ref_ends, tok.ends[:n], vals[:n])
        return out + ([vals[-1]] if end is not None else [])

