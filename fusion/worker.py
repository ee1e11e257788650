"""A source-model worker: one model, its KV caches, and the paper's Table 1 interface.

    open(prompt_ids) -> state       propose(state, ...) -> Proposal
    score(state, candidates) -> NLLs    commit(state, text)    close(state)

Only text and numbers cross this boundary, so the fusion loop can drive local workers or
remote ones alike. Per request, a `State` holds the model's token sequence
`ids = prompt + T(G) + lookahead` and a KV cache holding the first `kv_len` of them.
The cache is never rebuilt from scratch after `open`:

- propose decodes from the committed state; tokens decoded past the cut are *lookahead*,
  kept in `ids` and reused next step if this proposal wins (paper 2.4);
- score appends every candidate, as one block each, to the cache in ONE forward pass, with a
  block attention mask and per-block position ids (paper 2.4), so no cache is copied;
- commit keeps what it can: the lookahead (own proposal won), else the winner's scored block
  moved into place, else the longest common prefix (the rest is fed lazily, once);
- T(G) is kept incrementally: only the tail is re-tokenized (`retokenize_tail`).
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from . import kvcache
from .words import REPLACEMENT, WordStarts, first_boundary


@dataclass
class Proposal:
    text: str  # the candidate segment s_u
    eos: bool  # the model ended its turn right after `text`
    n_tokens: int | None  # proposal tokens that decode to `text` (None: no token boundary there)
    logprobs: list[float]  # log p of those tokens under the model (temperature 1)
    capped: bool = False  # ended by max_segment_tokens, not at a boundary
    starts: list[int] = field(default_factory=list)  # char offset in `text` where each token starts


@dataclass
class _Block:
    """One candidate scored in the cache: its tokens sit at cache slots [slot, slot+len)."""

    slot: int
    tokens: list[int]  # anchor token (position start-1) followed by the candidate's new tokens
    start: int  # sequence position of tokens[1]
    last_logits: torch.Tensor  # (V,) next-token logits after the block


@dataclass
class State:
    """One request's view of one model."""

    prompt_ids: list[int]
    cache: object  # kvcache.new_cache(): a DynamicCache growing in place
    generator: torch.Generator | None
    temperature: float = 0.0
    top_p: float = 1.0
    g_text: str = ""  # G, the shared generated text
    g_ids: list[int] = field(default_factory=list)  # T(G)
    g_starts: list[int] = field(default_factory=list)  # char offset in G where each g token starts
    ids: list[int] = field(default_factory=list)  # prompt + g_ids + lookahead
    la_logprobs: list[float] = field(default_factory=list)  # log p of the lookahead tokens
    kv_len: int = 0  # leading tokens of `ids` held in `cache`
    logits: torch.Tensor | None = None  # (V,) next-token logits after ids[:kv_len]
    proposal: Proposal | None = None
    blocks: dict = field(default_factory=dict)  # (text, eos) -> _Block, between score and commit
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


class ModelWorker:
    """Owns one loaded model and tokenizer; every method takes the request's `State`."""

    def __init__(self, name, model, tokenizer, *, end_ids, chat_end_ids=(), context_limit, device):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.words = WordStarts(tokenizer)
        self.all_words: list[WordStarts] = [self.words]  # every source model's; set by the engine
        self.device = device
        self.end_ids = frozenset(end_ids)  # tokens that end a proposal (EOS, end of turn)
        self.primary_end = list(end_ids)[0]
        self.chat_end = list(chat_end_ids)[0] if chat_end_ids else self.primary_end
        self.context_limit = context_limit
        self.lock = threading.RLock()  # one forward at a time on this model
        self._backend = tokenizer.backend_tokenizer
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self._layer_types = tuple(getattr(cfg, "layer_types", None) or ())
        self._sliding = getattr(cfg, "sliding_window", None)
        # transformers 5.2x renamed the forward's `past_key_values` to `cache`
        params = inspect.signature(getattr(model, "forward", model)).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.forward_tokens = 0  # tokens fed through the model (for the benchmark)
        self.tok_seconds = 0.0  # time spent in tokenizer work: encode, decode, word starts
        self.fast = True  # False: no lookahead, no KV reuse, full re-tokenization (reference)

    # ---- tokenizer helpers -------------------------------------------------------------

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        t = time.perf_counter()
        ids = self._backend.encode(text, add_special_tokens=special).ids
        self.tok_seconds += time.perf_counter() - t
        return ids

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        t = time.perf_counter()
        enc = self._backend.encode(text, add_special_tokens=False)
        self.tok_seconds += time.perf_counter() - t
        return enc.ids, [s for s, _ in enc.offsets]

    def decode(self, ids: list[int]) -> str:
        t = time.perf_counter()
        text = self._backend.decode(ids, skip_special_tokens=False)
        self.tok_seconds += time.perf_counter() - t
        return text

    def retokenize_tail(self, st: State, text: str) -> tuple[int, list[int], list[int]]:
        """T(G + text) as (keep, tail_ids, tail_starts): g_ids[:keep] + tail_ids.

        Re-tokenizes only from a restart token a few tokens back. The restart is accepted
        when re-tokenizing from it reproduces the token that was there (a stable boundary);
        otherwise it moves further back. Returned starts are offsets in the new G."""
        new_g = st.g_text + text
        back = 8 if self.fast else len(st.g_ids) + 1
        while True:
            r = max(0, len(st.g_ids) - back)
            while 0 < r < len(st.g_ids) and st.g_starts[r] == st.g_starts[r - 1]:
                r -= 1  # never restart inside a character split over byte tokens
            c0 = st.g_starts[r] if r < len(st.g_ids) else len(st.g_text)
            ids, starts = self.encode_with_starts(new_g[c0:])
            if r == 0 or (ids and r < len(st.g_ids) and ids[0] == st.g_ids[r]):
                return r, ids, [c0 + s for s in starts]
            back *= 2

    # ---- KV cache primitives -------------------------------------------------------------

    def _forward(self, st: State, tokens: list[int], positions=None, mask=None, last_only=False) -> torch.Tensor:
        """Feed `tokens` after the cache's current contents; returns logits (T, V), or (1, V)
        for the last token only (`last_only`: a prefill skips the LM head on the others)."""
        past = st.cache.get_seq_length()
        inp = torch.tensor([tokens], device=self.device)  # (1, T)
        kwargs = {}
        if positions is not None:
            kwargs["position_ids"] = torch.tensor([positions], device=self.device)
        else:
            kwargs["position_ids"] = torch.arange(past, past + len(tokens), device=self.device)[None]
        kwargs["cache_position"] = torch.arange(past, past + len(tokens), device=self.device)
        if mask is not None:
            kwargs["attention_mask"] = mask
        if last_only:
            kwargs["logits_to_keep"] = 1
        kwargs[self._cache_kw] = st.cache
        with torch.inference_mode():
            out = self.model(input_ids=inp, use_cache=True, **kwargs)
        self.forward_tokens += len(tokens)
        return out.logits[0].float()  # (T, V)

    def _sync(self, st: State, upto: int | None = None) -> None:
        """Make the cache hold `ids[:upto]` (default: all of `ids`, with `logits` the
        next-token distribution after them)."""
        upto = len(st.ids) if upto is None else upto
        if st.kv_len >= upto and (upto < len(st.ids) or st.logits is not None):
            return
        if st.kv_len >= upto:  # logits unknown: re-feed the last token
            st.kv_len = upto - 1
        kvcache.crop(st.cache, st.kv_len)
        logits = self._forward(st, st.ids[st.kv_len : upto], last_only=True)
        st.kv_len = upto
        st.logits = logits[-1] if upto == len(st.ids) else None

    # ---- Table 1 -------------------------------------------------------------------------

    def open(self, prompt_ids: list[int], *, temperature=0.0, top_p=1.0, seed=None) -> State:
        gen = None
        if temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed if seed is not None else torch.seed())
        return State(
            prompt_ids=list(prompt_ids), cache=kvcache.new_cache(), generator=gen,
            temperature=temperature, top_p=top_p, ids=list(prompt_ids),
        )

    def close(self, st: State) -> None:
        st.closed = True
        st.cache = None
        st.logits = None
        st.blocks.clear()

    def _sample(self, st: State, logits: torch.Tensor) -> tuple[int, float]:
        logp = torch.log_softmax(logits, -1)  # (V,)
        if st.temperature <= 0:
            tok = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / st.temperature, -1)
            if st.top_p < 1.0:
                sp, si = torch.sort(probs, descending=True)
                keep = torch.cumsum(sp, -1) - sp < st.top_p
                probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
            tok = int(torch.multinomial(probs.cpu(), 1, generator=st.generator))
        return tok, float(logp[tok])

    def propose(self, st: State, align: bool, max_tokens: int) -> Proposal:
        """Decode from the committed state until the text has a word boundary common to every
        source model's tokenizer (`align`; else this model's own: the Cool-align ablation),
        the model ends its turn, or `max_tokens` tokens were decoded."""
        splitters = self.all_words if align else [self.words]
        with self.lock:
            base = st.committed_len
            if not self.fast:  # no lookahead: decode again from the committed state
                del st.ids[base:]
                st.la_logprobs = []
                st.kv_len = min(st.kv_len, base)
                st.logits = None
            toks = st.ids[base:]  # lookahead from the last step
            logps = list(st.la_logprobs)
            ends: list[int | None] = []  # char length of decode(toks[:i+1]) when complete
            for i in range(len(toks)):
                t = self.decode(toks[: i + 1])
                ends.append(None if t.endswith(REPLACEMENT) else len(t))
            prop = self._cut(toks, logps, ends, splitters)
            while prop is None:
                self._sync(st)
                tok, lp = self._sample(st, st.logits)
                if tok in self.end_ids:
                    text = self.decode(toks)
                    whole = not text.endswith(REPLACEMENT)
                    prop = Proposal(_complete(text), True, len(toks) if whole else None, logps)
                    break
                toks.append(tok)
                logps.append(lp)
                st.ids.append(tok)
                t = self.decode(toks)
                ends.append(None if t.endswith(REPLACEMENT) else len(t))
                prop = self._cut(toks, logps, ends, splitters)
                if prop is None and len(toks) >= max_tokens:
                    n = max((i + 1 for i, e in enumerate(ends) if e is not None), default=0)
                    if n:  # never an empty candidate: go on until a character is complete
                        prop = Proposal(self.decode(toks[:n]), False, n, logps[:n], True, _starts(ends[:n]))
                    elif len(toks) >= max_tokens + 3:  # a character has at most 4 bytes: these never
                        # complete one (not UTF-8), so cut anyway; decode() made them U+FFFD
                        prop = Proposal(self.decode(toks), False, len(toks), logps, True, _starts(ends))
            st.la_logprobs = logps
            st.proposal = prop
            return prop

    def _cut(self, toks, logps, ends, splitters) -> Proposal | None:
        if not toks or ends[-1] is None:
            return None
        text = self.decode(toks)
        t = time.perf_counter()
        p = first_boundary(text, splitters, allowed={e for e in ends if e is not None})
        self.tok_seconds += time.perf_counter() - t
        if p is None:
            return None
        n = next(i + 1 for i, e in enumerate(ends) if e == p)
        return Proposal(text[:p], False, n, logps[:n], False, _starts(ends[:n]))

    def _candidate_ids(self, st: State, text: str, eos: bool, end_id: int) -> tuple[list[int], int]:
        """The model's full token sequence after committing `text` (plus its end token when
        `eos`), and p: how many leading tokens it shares with the committed sequence."""
        keep, tail, _ = self.retokenize_tail(st, text)
        target = st.prompt_ids + st.g_ids[:keep] + tail + ([end_id] if eos else [])
        p = len(st.prompt_ids) + keep + common_prefix(st.g_ids[keep:], tail)
        return target, p

    def score(self, st: State, candidates: list[tuple[str, bool]], *, end_id: int | None = None,
              mode: str = "mean_nll") -> list[float]:
        """PPL of each candidate in context: exp(mean NLL) of the candidate's new tokens
        (`nll_sum`: exp of the sum). One forward pass for all candidates that need one."""
        end_id = self.primary_end if end_id is None else end_id
        with self.lock:
            base = st.committed_len
            # blocks attend to the committed prefix only: an unfed lookahead token can wait
            self._sync(st, upto=base)
            nlls: list[list[float] | None] = []
            todo = []  # (index, target, p)
            for i, (text, eos) in enumerate(candidates):
                target, p = self._candidate_ids(st, text, eos, end_id)
                own = st.proposal
                if (self.fast and own is not None and own.text == text and own.eos == eos and own.n_tokens is not None
                        and p == base and target[base:] == st.ids[base : base + own.n_tokens]):
                    if not eos:  # an end token's log-prob needs the state after the text: a block
                        nlls.append([-x for x in own.logprobs])
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

    def _score_blocks(self, st: State, todo, nlls, candidates) -> None:
        kv = st.kv_len
        blocks, positions = [], []
        for i, target, p in todo:
            blk = target[p - 1 :]  # anchor token at position p-1, then the new tokens
            blocks.append((i, blk, p))
            positions.extend(range(p - 1, p - 1 + len(blk)))
        T = len(positions)
        mask = self._block_mask(kv, blocks, T)
        tokens = [t for _, blk, _ in blocks for t in blk]
        logits = self._forward(st, tokens, positions=positions, mask=mask)  # (T, V)
        off = 0
        for i, blk, p in blocks:
            L = len(blk)
            rows = torch.log_softmax(logits[off : off + L - 1], -1)  # (L-1, V)
            tgt = torch.tensor(blk[1:], device=rows.device)
            nlls[i] = (-rows.gather(1, tgt[:, None])[:, 0]).tolist()
            text, eos = candidates[i]
            st.blocks[(text, eos)] = _Block(kv + off, blk, p, logits[off + L - 1].clone())
            off += L

    def _block_mask(self, kv: int, blocks, T: int):
        """(1, 1, T, kv+T) additive mask: block tokens see the committed prefix before their
        anchor and their own block causally (and, on sliding layers, only the window)."""
        dev = self.device
        lens = torch.tensor([len(blk) for _, blk, _ in blocks], device=dev)  # (B,)
        firsts = torch.tensor([p - 1 for _, _, p in blocks], device=dev)  # (B,) anchor positions
        block_of = torch.repeat_interleave(torch.arange(len(blocks), device=dev), lens)  # (T,)
        offset = torch.arange(T, device=dev) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        q_pos = firsts[block_of] + offset  # (T,) sequence positions of the block tokens
        k_cached = torch.arange(kv, device=dev)  # (kv,) cache slot == position for the prefix
        sees_prefix = k_cached[None, :] < firsts[block_of][:, None]  # (T, kv)
        sees_block = (block_of[:, None] == block_of[None, :]) & (offset[None, :] <= offset[:, None])  # (T, T)
        allow = torch.cat([sees_prefix, sees_block], 1)  # (T, kv+T)
        k_pos = torch.cat([k_cached, q_pos])  # (kv+T,)
        neg = torch.finfo(self.model.dtype).min

        def to_mask(a):
            return torch.zeros(a.shape, dtype=self.model.dtype, device=dev).masked_fill_(~a, neg)[None, None]

        full = to_mask(allow)
        if self._sliding and "sliding_attention" in self._layer_types:
            win = allow & (q_pos[:, None] - k_pos[None, :] < self._sliding)
            return {"full_attention": full, "sliding_attention": to_mask(win)}
        return full

    def commit(self, st: State, text: str, eos: bool = False) -> None:
        """Append the selected `text` to G, reusing every KV entry already computed."""
        with self.lock:
            own = st.proposal
            if own is not None and own.text == text and not own.eos and not eos and own.n_tokens:
                # own proposal won: keep the tokens it generated (so a model fused with itself
                # decodes exactly as alone) and the lookahead beyond them
                base, n = st.committed_len, own.n_tokens
                kvcache.crop(st.cache, st.kv_len)
                st.la_logprobs = st.la_logprobs[n:]
                st.g_starts = st.g_starts + [len(st.g_text) + s for s in own.starts]
                st.g_ids = st.g_ids + st.ids[base : base + n]
                st.g_text += text
                st.proposal = None
                st.blocks.clear()
                if not self.fast:
                    kvcache.crop(st.cache, 0)
                    st.kv_len, st.logits = 0, None
                return
            keep, tail, tail_starts = self.retokenize_tail(st, text)
            new_g = st.g_ids[:keep] + tail
            target = st.prompt_ids + new_g
            block = None if eos else st.blocks.get((text, eos))
            if st.ids[: len(target)] == target:  # the lookahead already holds these tokens
                kvcache.crop(st.cache, st.kv_len)
                st.la_logprobs = st.la_logprobs[len(target) - st.committed_len :]
            elif block is not None:  # move the winner's scored block into place
                n = len(block.tokens) - 1
                kvcache.move(st.cache, block.slot + 1, block.start, n)
                kvcache.crop(st.cache, block.start + n)
                st.ids, st.kv_len, st.logits, st.la_logprobs = list(target), len(target), block.last_logits, []
            else:  # keep the common prefix; the rest is fed lazily by the next propose/score
                common = common_prefix(st.ids[: st.kv_len], target)
                kvcache.crop(st.cache, common)
                st.ids, st.kv_len, st.logits, st.la_logprobs = list(target), common, None, []
            st.g_text += text
            st.g_starts = st.g_starts[:keep] + tail_starts
            st.g_ids = new_g
            st.proposal = None
            st.blocks.clear()
            if not self.fast:  # no KV reuse: the next call re-prefills everything
                kvcache.crop(st.cache, 0)
                st.kv_len, st.logits = 0, None

    def fresh_logits(self, st: State) -> torch.Tensor:
        """Next-token logits from a fresh prefill of `ids` without any cache (for tests)."""
        with self.lock, torch.inference_mode():
            out = self.model(input_ids=torch.tensor([st.ids], device=self.device))
        return out.logits[0, -1].float()

    def cached_logits(self, st: State) -> torch.Tensor:
        with self.lock:
            self._sync(st)
            return st.logits


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
