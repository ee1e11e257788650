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
  holds exactly when the fused id, one token at a time, reproduces the text. The positions of
  a Step are answered together by `coolfusion.engine.alternatives` (kept by prefix; known
  from the full forwards below where every model's greedy proposal follows the text; else
  one fused step from states that walk the sequence, several runs of positions at once), so
  their cost is linear in the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coolfusion.engine.alternatives import Alt, Forward
from coolfusion.runtime import logprobs
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
    forwards: dict[str, Forward] = field(default_factory=dict)  # fused, logprobs >= 1: each model's rows


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
        alts = {}
        if self.fused and self.req.logprobs:  # every position of this Step at once
            alts = self.engine.alternatives.at(self.engine, self.req, tok.ids,
                                               [j for j in picked if sc.values[j] is not None], sc.forwards,
                                               self.cancel)
        out = []
        for j in picked:
            text = self.ref.text.token_text(tok.ids[j])
            out.append(TokenLogprob(text, sc.values[j], tok.starts[j] - base, self._top(sc, j, alts), tok.ids[j]))
        return tuple(out)

    def _top(self, sc: _Scored, j: int, alts: dict[int, Alt | None]) -> tuple[tuple[str, float], ...] | None:
        if sc.values[j] is None:
            return None  # the first token: no distribution to rank
        if not self.req.logprobs:
            return ()
        if not self.fused:
            return tuple((self.ref.text.token_text(t), v) for t, v in sc.tops[j])
        alt = alts[j]
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
        top = 2 if self.req.logprobs else 0  # the top two: each model's argmax and its margin (alternatives)
        per = self.engine.each_worker(
            lambda w: self._model_values(w, g, self._end_token(w) if eos else None, ref_ends, top), self.workers)
        values: list[float | None] = logprobs.mean([v for v, _ in per])
        values[0] = None  # the text's first token has no context (OpenAI's null)
        forwards = {w.name: f for w, (_, f) in zip(self.workers, per)} if top else {}
        return _Scored(ref_tok, values, [()] * len(values), len(self._prompts[self.ref.name].ids), eos, forwards)

    def _model_values(self, w: Worker, g: str, end: int | None, ref_ends: list[int],
                      top: int = 0) -> tuple[list[float], Forward]:
        """Model w's log-probs of its tokens, summed per reference token (`ref_ends`: where each
        of prompt + G ends; the end token's to the reference's end token), and its forward."""
        tok = self._tokens(w, g, end)
        rows = w.sequence_logprobs(tok.ids, top)
        vals = [None] + [r[0] for r in rows]
        n = len(tok.ids) - (end is not None)
        out = logprobs.assign(ref_ends, tok.ends[:n], vals[:n])
        return out + ([vals[-1]] if end is not None else []), Forward(tok.ids, rows)

