"""The in-process worker: one model's side of the fusion, per request (coolfusion.workers.protocol).

`LocalWorker` implements the Table 1 contract over a `ModelRunner` (the forwards) and a
`TokenizerSide` (the text). Per request, a `State` holds the model's token sequence
`ids = prompt + T(G) + lookahead` and a KV cache holding the first `kv_len` of them.
The cache is never rebuilt from scratch after `open`:

- propose decodes from the committed state; tokens decoded past the cut are *lookahead*,
  kept in `ids` and reused next step if this proposal wins (paper 2.4);
- score appends every candidate, as one block each, to the cache in ONE forward pass, with a
  block attention mask and per-block position ids (paper 2.4), so no cache is copied;
- commit keeps what it can: the lookahead (own proposal won), else the winner's scored block
  moved into place, else the longest common prefix (the rest is fed lazily, once);
- T(G) is kept incrementally: only the tail is re-tokenized (`TokenizerSide.retokenize_tail`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


from typing import Any, Sequence

from coolfusion.runtime.loading import LoadedModel
from coolfusion.runtime import sampling as sampling_ops
from coolfusion.runtime.runner import Runner, make_runner
from coolfusion.runtime import draft_check
from coolfusion.workers.tokenizer_side import TokenizerSide, end_tokens
from coolfusion.core.words import REPLACEMENT
from coolfusion.workers.protocol import Proposal, Sampling, WorkerOptions


@dataclass
class _Block:
    """One candidate scored in the cache: its tokens sit at cache slots [slot, slot+len)."""

    slot: int
    tokens: list[int]  # anchor token (position start-1) followed by the candidate's new tokens
    start: int  # sequence position of tokens[1]
    last_logits: Any  # (V,) tensor: next-token logits after the block


@dataclass
class State:
    """One request's view of one model."""

    prompt_ids: list[int]
    cache: object  # the runner's KV storage of this request (`runner.open_cache()`)
    generator: Any  # the request's random stream (runtime.sampling), None when greedy
    temperature: float = 0.0
    top_p: float = 1.0
    g_text: str = ""  # G, the shared generated text
    g_ids: list[int] = field(default_factory=list)  # T(G)
    g_starts: list[int] = field(default_factory=list)  # char offset in G where each g token starts
    ids: list[int] = field(default_factory=list)  # prompt + g_ids + lookahead
    la_logprobs: list[float] = field(default_factory=list)  # log p of the lookahead tokens
    kv_len: int = 0  # leading tokens of `ids` held in `cache`
    logits: Any = None  # (V,) tensor: next-token logits after ids[:kv_len]
    proposal: Proposal | None = None
    blocks: dict = field(default_factory=dict)  # (text, eos) -> _Block, between score and commit
    checked: object = None  # the last propose's check of a draft (coolfusion.runtime.draft_check.DraftCheck)
    closed: bool = False

    @property
    def committed_len(self) -> int:
        return len(self.prompt_ids) + len(self.g_ids)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LocalWorker:
    """One loaded model serving many requests; every method takes the request's `State`."""

    def __init__(self, name: str, runner: Runner, text: TokenizerSide, options: WorkerOptions, *,
                 context_limit: int | None = None, loaded: LoadedModel | None = None):
        self.name = name
        self.loaded = loaded  # what it was built from, if a loaded model (Engine.with_fusion builds again from it)
        self.runner = runner
        self.text = text
        self.options = options
        limits = [x for x in (context_limit, runner.max_positions) if x]
        self.context_limit = min(limits) if limits else None  # the runner may hold fewer (a KV slot)
        self.device = runner.device
        self._splitters = tuple(options.all_words) or (text.words,)  # every model's word rule

    @classmethod
    def from_loaded(cls, m: LoadedModel, options: WorkerOptions, fusion=None) -> "LocalWorker":
        """A worker over a loaded model, with its end tokens: the EOS ids of the tokenizer
        and generation config, plus configured `stop_tokens` (e.g. Gemma's <end_of_turn>).
        `fusion` (a FusionConfig) chooses the runner (`fusion.batching`)."""
        runner = make_runner(m.model, m.device, fusion, m.name)
        ends, chat_ends = end_tokens(m.name, m.tokenizer, runner.generation_config, m.stop_tokens)
        return cls(m.name, runner, TokenizerSide(m.name, m.tokenizer, ends, chat_ends), options,
                   context_limit=m.context_limit, loaded=m)

    def __repr__(self) -> str:
        return f"LocalWorker({self.name})"

    @property
    def fast(self) -> bool:
        return self.options.fast

    @property
    def unavailable(self) -> str | None:
        return None  # the model lives in this process

    @property
    def forward_tokens(self) -> int:
        return self.runner.forward_tokens

    @property
    def tok_seconds(self) -> float:
        return self.text.tok_seconds

    def kv_report(self) -> dict[str, int]:
        return self.runner.kv_report()

    def runner_stats(self) -> dict:
        return self.runner.stats()

    def shutdown(self) -> None:
        """Stop the runner's thread, if it has one (the model lives as long as this process)."""
        self.runner.shutdown()

    def seq_len(self, st: State) -> int:
        return len(st.ids)

    # ---- KV cache primitives -------------------------------------------------------------

    def _sync(self, st: State, upto: int | None = None) -> None:
        """Make the cache hold `ids[:upto]` (default: all of `ids`, with `logits` the
        next-token distribution after them)."""
        upto = len(st.ids) if upto is None else upto
        if st.kv_len >= upto and (upto < len(st.ids) or st.logits is not None):
            return
        if st.kv_len >= upto:  # logits unknown: re-feed the last token
            st.kv_len = upto - 1
        self.runner.crop(st.cache, st.kv_len)
        logits = self.runner.forward(st.cache, st.ids[st.kv_len : upto], last_only=True)
        st.kv_len = upto
        st.logits = logits[-1] if upto == len(st.ids) else None

    # ---- Table 1 -------------------------------------------------------------------------

    def open(self, prompt_ids: list[int], sampling: Sampling = Sampling()) -> State:
        gen = sampling_ops.generator(sampling.temperature, sampling.seed)
        return State(
            prompt_ids=list(prompt_ids), cache=self.runner.open_cache(), generator=gen,
            temperature=sampling.temperature, top_p=sampling.top_p, ids=list(prompt_ids),
        )

    def close(self, st: State) -> None:
        st.closed = True
        if st.cache is not None:
            self.runner.close_cache(st.cache)
        st.cache = None
        st.logits = None
        st.blocks.clear()

    def _sample(self, st: State, logits) -> tuple[int, float]:
        return sampling_ops.next_token(logits, st.temperature, st.top_p, st.generator)

    def propose(self, st: State, align: bool, max_tokens: int) -> Proposal:
        """Decode from the committed state until the text has a word boundary common to every
        source model's tokenizer (`align`; else this model's own: the Cool-align ablation),
        the model ends its turn, or `max_tokens` tokens were decoded."""
        return self._propose(st, align, max_tokens)

    def check_draft(self, st: State, draft: str, align: bool, max_tokens: int) -> Proposal:
        """The proposal `propose` gives, found by first checking another model's `draft`
        (its proposal and lookahead text) in one forward (coolfusion.runtime.draft_check);
        a sampled request (or the slow reference) just proposes."""
        if st.temperature > 0 or not self.fast or not draft:
            return self._propose(st, align, max_tokens)
        return self._propose(st, align, max_tokens, draft)

    def _draft_ids(self, st: State, draft: str) -> list[int]:
        """This model's tokens of `draft` after its committed tokens: those of T(G + draft) when
        they extend T(G), else the draft's own tokens (any tokens make a valid check)."""
        target, p = self._candidate_ids(st, draft, False, self.text.primary_end)
        return target[st.committed_len :] if p == st.committed_len else self.text.encode(draft)

    def _propose(self, st: State, align: bool, max_tokens: int, draft: str | None = None) -> Proposal:
        """The proposal loop: the model's greedy (or sampled) tokens after its committed ones,
        one at a time, in order, until the boundary rule cuts a candidate, an end token, or the
        cap. They come from its lookahead first, then (with a `draft`) from the check forward,
        then from decoding; the loop treats them all alike, so where a token came from never
        changes the proposal."""
        splitters = self._splitters if align else (self.text.words,)
        base = st.committed_len
        st.checked = None
        if not self.fast:  # no lookahead: decode again from the committed state
            del st.ids[base:]
            st.la_logprobs = []
            st.kv_len = min(st.kv_len, base)
            st.logits = None
        held = len(st.ids) - base  # lookahead from the last step
        toks: list[int] = []
        logps: list[float] = []
        ends: list[int | None] = []  # char length of decode(toks[:i+1]) when complete
        checked = None
        prop = None
        while prop is None:
            if len(toks) < held:  # its own lookahead (never an end token)
                tok, lp = st.ids[base + len(toks)], st.la_logprobs[len(toks)]
            else:
                if draft is not None:  # the lookahead had no cut: check the draft past it
                    checked = draft_check.check(self, st, self._draft_ids(st, draft), list(toks), list(logps),
                                                max_tokens, self.text.end_ids)
                    st.checked, draft = checked, None
                if checked:  # the model's own greedy token, known from the check forward
                    tok, lp = checked.take(st)
                else:
                    self._sync(st)
                    tok, lp = self._sample(st, st.logits)
                if tok in self.text.end_ids:
                    text = self.text.decode(toks)
                    whole = not text.endswith(REPLACEMENT)
                    prop = Proposal(_complete(text), True, len(toks) if whole else None, logps, end_id=tok)
                    break
                st.ids.append(tok)
            toks.append(tok)
            logps.append(lp)
            ends.append(self.text.decoded_end(toks))
            prop = self._cut(toks, logps, ends, splitters)
            if prop is None and len(toks) >= max_tokens:
                n = max((i + 1 for i, e in enumerate(ends) if e is not None), default=0)
                if n:  # never an empty candidate: go on until a character is complete
                    prop = Proposal(self.text.decode(toks[:n]), False, n, logps[:n], True, _starts(ends[:n]))
                elif len(toks) >= max_tokens + 3:  # a character has at most 4 bytes: these never
                    # complete one (not UTF-8), so cut anyway; decode() made them U+FFFD
                    prop = Proposal(self.text.decode(toks), False, len(toks), logps, True, _starts(ends))
        st.la_logprobs = logps + st.la_logprobs[len(toks):held]  # the lookahead past the cut stays
        if not prop.eos:  # the whole decoded text is what a draft offers the other models
            full = _complete(self.text.decode(st.ids[base:]))
            prop = replace(prop, lookahead=full[len(prop.text):] if full.startswith(prop.text) else "")
        if checked is not None:
            prop = self._after_check(st, prop, checked)
        st.proposal = prop
        return prop

    def _after_check(self, st: State, prop: Proposal, checked: draft_check.DraftCheck) -> Proposal:
        """Drop the checked tokens the proposal did not reach (the cache holds `ids` and no
        more) and report what the check accepted."""
        self.runner.crop(st.cache, st.kv_len)
        if st.logits is not None:
            st.logits = st.logits.clone()  # not a view of the check's (T, V) logits
        return replace(prop, checked=checked.fed, accepted=len(checked.tokens))

    def _cut(self, toks, logps, ends, splitters) -> Proposal | None:
        found = self.text.first_cut(toks, ends, splitters)
        if found is None:
            return None
        text, n = found
        return Proposal(text, False, n, logps[:n], False, _starts(ends[:n]))

    def _candidate_ids(self, st: State, text: str, eos: bool, end_id: int) -> tuple[list[int], int]:
        """The model's full token sequence after committing `text` (plus its end token when
        `eos`), and p: how many leading tokens it shares with the committed sequence."""
        keep, tail, _ = self._retokenize(st, text)
        target = st.prompt_ids + st.g_ids[:keep] + tail + ([end_id] if eos else [])
        p = len(st.prompt_ids) + keep + common_prefix(st.g_ids[keep:], tail)
        return target, p

    def score(self, st: State, candidates: list[tuple[str, bool]], *, end_id: int | None = None,
              mode: str = "mean_nll") -> list[float]:
        """PPL of each candidate in context: exp(mean NLL) of the candidate's new tokens
        (`nll_sum`: exp of the sum). One forward pass for all candidates that need one."""
        end_id = self.text.primary_end if end_id is None else end_id
        base = st.committed_len
        # blocks attend to the committed prefix only: an unfed lookahead token can wait, and
        # committed tokens not cached yet are fed in the blocks' forward (`_score_blocks`)
        if not self.fast:
            self._sync(st, upto=base)
        nlls: list[list[float] | None] = []
        todo = []  # (index, target, p)
        decoded = st.ids[base:] if len(st.la_logprobs) == len(st.ids) - base else []  # with their log-probs
        for i, (text, eos) in enumerate(candidates):
            target, p = self._candidate_ids(st, text, eos, end_id)
            new = target[base:]
            if self.fast and not eos and p == base and new and decoded[: len(new)] == new:
                # tokens it decoded (its proposal, lookahead, or greedy tokens known at a rewind)
                # carry their log-probs already (an end token's needs a block)
                nlls.append([-x for x in st.la_logprobs[: len(new)]])
                continue
            drafted = self._drafted_logprobs(st, target, p, eos)
            if drafted is not None:  # the check forward of a draft already scored these tokens
                nlls.append([-x for x in drafted])
                continue
            nlls.append(None)
            todo.append((i, target, p))
        if todo:
            self._score_blocks(st, todo, nlls, candidates)
        out = []
        for v in nlls:
            if not v:  # nothing new to score (an empty candidate): never preferred
                out.append(float("inf"))
                continue
            s = sum(v)
            out.append(math.exp(s / len(v)) if mode == "mean_nll" else math.exp(min(s, 700.0)))
        return out

    def _drafted_logprobs(self, st: State, target: list[int], p: int, eos: bool) -> list[float] | None:
        """The log-probs of a candidate's new tokens from this step's check of a draft, when
        they are a prefix of the model's tokens of the draft (else None: score it)."""
        checked, base = st.checked, st.committed_len
        new = target[base:]
        if not self.fast or eos or checked is None or p != base or not new:
            return None
        if len(new) > len(checked.draft_logprobs) or checked.draft_ids[: len(new)] != new:
            return None
        return checked.draft_logprobs[: len(new)]

    def _score_blocks(self, st: State, todo, nlls, candidates) -> None:
        """Score the candidates `todo` as blocks side by side after the cache, in one forward
        that first feeds the committed tokens not cached yet (its `lead`)."""
        lead = st.ids[st.kv_len : st.committed_len]  # empty when the cache holds them (and maybe lookahead)
        self.runner.crop(st.cache, st.kv_len)
        blocks = []
        for i, target, p in todo:
            blk = target[p - 1 :]  # anchor token at position p-1, then the new tokens
            blocks.append((i, blk, p))
        tokens = lead + [t for _, blk, _ in blocks for t in blk]
        logits = self.runner.forward(st.cache, tokens, blocks=[(p - 1, len(blk)) for _, blk, p in blocks],
                                     lead=len(lead))  # (T, V): the blocks' rows
        if lead:
            st.kv_len, st.logits = st.committed_len, None
        kv = st.kv_len
        off = 0
        for i, blk, p in blocks:
            L = len(blk)
            nlls[i] = sampling_ops.token_nlls(logits[off : off + L - 1], blk[1:])  # rows before each new token
            text, eos = candidates[i]
            st.blocks[(text, eos)] = _Block(kv + off, blk, p, logits[off + L - 1].clone())
            off += L

    def commit(self, st: State, text: str, eos: bool = False) -> None:
        """Append the selected `text` to G, reusing every KV entry already computed."""
        own = st.proposal
        if own is not None and own.text == text and not own.eos and not eos and own.n_tokens:
            # own proposal won: keep the tokens it generated (so a model fused with itself
            # decodes exactly as alone) and the lookahead beyond them
            base, n = st.committed_len, own.n_tokens
            self.runner.crop(st.cache, st.kv_len)
            st.la_logprobs = st.la_logprobs[n:]
            st.g_starts = st.g_starts + [len(st.g_text) + s for s in own.starts]
            st.g_ids = st.g_ids + st.ids[base : base + n]
            st.g_text += text
            st.proposal = None
            st.checked = None
            st.blocks.clear()
            if not self.fast:
                self.runner.crop(st.cache, 0)
                st.kv_len, st.logits = 0, None
            return
        keep, tail, tail_starts = self._retokenize(st, text)
        new_g = st.g_ids[:keep] + tail
        target = st.prompt_ids + new_g
        block = None if eos else st.blocks.get((text, eos))
        if st.ids[: len(target)] == target:  # the lookahead already holds these tokens
            self.runner.crop(st.cache, st.kv_len)
            st.la_logprobs = st.la_logprobs[len(target) - st.committed_len :]
        elif block is not None:  # move the winner's scored block into place
            n = len(block.tokens) - 1
            self.runner.move(st.cache, block.slot + 1, block.start, n)
            self.runner.crop(st.cache, block.start + n)
            st.ids, st.kv_len, st.logits, st.la_logprobs = list(target), len(target), block.last_logits, []
        else:  # keep the common prefix; the rest is fed lazily by the next propose/score
            common = common_prefix(st.ids[: st.kv_len], target)
            self.runner.crop(st.cache, common)
            st.ids, st.kv_len, st.logits, st.la_logprobs = list(target), common, None, []
        st.g_text += text
        st.g_starts = st.g_starts[:keep] + tail_starts
        st.g_ids = new_g
        st.proposal = None
        st.checked = None
        st.blocks.clear()
        if not self.fast:  # no KV reuse: the next call re-prefills everything
            self.runner.crop(st.cache, 0)
            st.kv_len, st.logits = 0, None

    def rewind(self, st: State, prompt_ids: list[int], greedy: Sequence[tuple[int, float]] = ()) -> None:
        """Make `st` what `open(prompt_ids)` would give, keeping the KV entries of the longest
        common prefix of what it holds (the rest is fed lazily, once), and as lookahead the
        tokens greedy decoding would give first: those it decoded after its last prompt when
        they go on from the new one, else `greedy` ((token, log p) known by the caller). The
        fused alternatives walk one state per model along a sequence this way
        (coolfusion.engine.alternatives)."""
        prompt_ids = list(prompt_ids)
        n, old, held = len(prompt_ids), st.committed_len, st.ids[: st.kv_len]
        kept = len(st.ids) - n if not st.g_ids and old <= n <= len(st.ids) and st.ids[:n] == prompt_ids else 0
        if st.temperature <= 0 and kept >= len(greedy) and kept > 0:
            st.la_logprobs = st.la_logprobs[n - old:]  # its own lookahead beyond the new prompt
        else:
            st.ids = prompt_ids + [t for t, _ in greedy]
            st.la_logprobs = [lp for _, lp in greedy]
        keep = common_prefix(held, st.ids)
        self.runner.crop(st.cache, keep)
        if keep < len(held):
            st.logits = None  # they were the logits after all that was held
        st.prompt_ids, st.kv_len = prompt_ids, keep
        st.g_text, st.g_ids, st.g_starts = "", [], []
        st.proposal, st.checked = None, None
        st.blocks.clear()

    def fork(self, st: State, prompt_ids: list[int], greedy: Sequence[tuple[int, float]] = ()) -> State:
        """A new greedy state, what `open(prompt_ids)` and `rewind(..., greedy)` give, whose KV
        entries of the longest common prefix of `st`'s tokens and `prompt_ids` are copied from
        `st`'s (fed into `st` first where it does not hold them yet): the fused alternatives'
        walks along one text start from a single prefill this way. `st` keeps its own state;
        the caller does not use it in another thread meanwhile."""
        new = self.open(prompt_ids)
        try:
            n = common_prefix(st.ids, list(prompt_ids))
            if n:
                self._sync(st, upto=n)
                self.runner.copy(st.cache, new.cache, n)
                new.kv_len = n
            self.rewind(new, prompt_ids, greedy)
        except BaseException:
            self.close(new)
            raise
        return new

    def fresh_logits(self, st: State):
        """Next-token logits from a fresh prefill of `ids` without any cache (for tests)."""
        return self.runner.fresh_logits(st.ids)

    def sequence_logprobs(self, ids: list[int], top: int = 0) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
        """Exact log-probs of `ids` (and the `top` alternatives) from a full forward, no cache."""
        return self.runner.sequence_logprobs(list(ids), top)

    def _retokenize(self, st: State, text: str) -> tuple[int, list[int], list[int]]:
        return self.text.retokenize_tail(st.g_text, st.g_ids, st.g_starts, text, fast=self.fast)

    def cached_logits(self, st: State):
        self._sync(st)
        return st.logits


def local_workers(models: Sequence[LoadedModel], fusion=None) -> list[LocalWorker]:
    """One worker per loaded model, each knowing every model's word rule (paper Table 1);
    `fusion` (a FusionConfig, default the config's defaults) sets the fast paths and runner."""
    fast = True if fusion is None else fusion.fast_paths
    options = WorkerOptions.for_tokenizers([m.tokenizer for m in models], fast)
    return [LocalWorker.from_loaded(m, options, fusion) for m in models]


def _starts(ends: list[int | None]) -> list[int]:
    """Char offset where each token starts, from the decoded length after each token."""
    out, last = [], 0
    for e in ends:
        out.append(last)
        if e is not None:
            last = e
    return out


def _complete(text: str) -> str:
    """Drop a trailing incomplete UTF-8 sequence."""
    return text.rstrip(REPLACEMENT)
