"""The worker contract: the paper's Table 1, as the fusion loop and the engine use it.

A worker serves one source model to many requests. Per request it holds an opaque state
(`open` returns it) and offers:

    open(prompt_ids, sampling) -> state      propose(state, align, max_tokens) -> Proposal
    score(state, candidates) -> PPLs        commit(state, text, eos)        close(state)
    check_draft(state, draft, align, max_tokens) -> Proposal   (speculative proposals, greedy)
    rewind(state, prompt_ids, greedy) -> None    (greedy: the state `open(prompt_ids)` gives)
    fork(state, prompt_ids, greedy) -> state     (greedy: a new one, its KV copied from state's)

plus what the loop and the engine read: `seq_len(state)` (tokens the model holds for the
request, lookahead included: the context check), `unavailable` (why it cannot serve now, or None), and `shutdown()`; and, outside any
request state, `sequence_logprobs(ids, top)`: the exact per-token log-probs of a token
sequence from a full forward without cache (`logprobs` / `echo`), and `kv_report()` (its KV
slots, for /metrics). The benchmark's and tests' probes are a protocol of their own
(`WorkerProbes`). Only text and
numbers cross it, so the same loop drives in-process workers (`coolfusion.workers.local`) and Ray
actors (`coolfusion.workers.ray_proxy`). Options are fixed when a worker is built (`WorkerOptions`),
never set afterwards. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from coolfusion.workers.tokenizer_side import TokenizerSide
from coolfusion.core.words import WordStarts


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker runs, fixed at construction.

    `all_words`: every source model's word rule, in config order (a proposal ends at a word
    boundary common to all of them). `fast`: lookahead and KV reuse, skipped re-scoring,
    tail-only re-tokenization; False is the slow reference that must give the same text."""

    all_words: tuple[WordStarts, ...]
    fast: bool = True

    @classmethod
    def for_tokenizers(cls, tokenizers: Sequence[Any], fast: bool = True) -> "WorkerOptions":
        """The options of every worker of one engine: each source model's tokenizer, in order."""
        return cls(tuple(WordStarts(t) for t in tokenizers), fast)


@dataclass(frozen=True)
class Sampling:
    """How one request samples its proposals (greedy when temperature is 0)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Proposal:
    text: str  # the candidate segment s_u
    eos: bool  # the model ended its turn right after `text`
    n_tokens: int | None  # proposal tokens that decode to `text` (None: no token boundary there)
    logprobs: list[float]  # log p of those tokens under the model (temperature 1)
    capped: bool = False  # ended by max_segment_tokens, not at a boundary
    starts: list[int] = field(default_factory=list)  # char offset in `text` where each token starts
    end_id: int | None = None  # with eos: the end token the model decoded
    lookahead: str = ""  # text decoded past `text` (complete characters): with `text`, a draft
    checked: int = 0  # with `check_draft`: tokens of the draft this model fed in its check forward
    accepted: int = 0  # ... of which its own greedy decoding agrees with, before the first disagreement


@runtime_checkable
class Worker(Protocol):
    name: str
    text: TokenizerSide  # encode / decode / word rules / end tokens of this model
    options: WorkerOptions
    context_limit: int | None

    @property
    def unavailable(self) -> str | None: ...  # why the model cannot serve now (a Ray actor restarting); None: it can

    def open(self, prompt_ids: list[int], sampling: Sampling = Sampling()) -> Any: ...

    def propose(self, state: Any, align: bool, max_tokens: int) -> Proposal: ...

    # greedy only: the proposal `propose` would give, found by checking `draft` (another model's
    # proposal text + lookahead) in one forward first (coolfusion.runtime.draft_check)
    def check_draft(self, state: Any, draft: str, align: bool, max_tokens: int) -> Proposal: ...

    def score(self, state: Any, candidates: Sequence[tuple[str, bool]], *, end_id: int | None = None,
              mode: str = "mean_nll") -> list[float]: ...

    def commit(self, state: Any, text: str, eos: bool = False) -> None: ...

    # greedy only: make the state what open(prompt_ids) gives, keeping the KV entries it shares
    # with it, with `greedy` ((token, log p) its decoding gives first, known to the caller) as
    # lookahead; the fused alternatives walk one state per model along a text this way
    def rewind(self, state: Any, prompt_ids: list[int], greedy: Sequence[tuple[int, float]] = ()) -> None: ...

    # greedy only: a new state, as open(prompt_ids) then rewind(greedy) give, whose KV entries of
    # the longest common prefix with `state`'s tokens are copied from `state` (fed there first
    # if it does not hold them yet); the fused alternatives' walks start from one prefill this way
    def fork(self, state: Any, prompt_ids: list[int], greedy: Sequence[tuple[int, float]] = ()) -> Any: ...

    def close(self, state: Any) -> None: ...  # frees the request's KV storage; never raises

    def seq_len(self, state: Any) -> int: ...

    # log p(ids[i] | ids[:i]) for i >= 1 and the `top` most likely (id, log p) there; full forward, no cache
    def sequence_logprobs(self, ids: list[int], top: int = 0) -> list[tuple[float, tuple[tuple[int, float], ...]]]: ...

    def kv_report(self) -> dict[str, int]: ...  # its KV slots (slots, in use, bytes); {} without slots

    def shutdown(self) -> None: ...  # the engine is closing: release the model's resources


@runtime_checkable
class WorkerProbes(Protocol):
    """What the benchmark and the tests read of a worker besides the contract (both workers
    offer it; the fusion loop and the engine never use it)."""

    @property
    def forward_tokens(self) -> int: ...  # tokens fed through the model so far (benchmark)

    @property
    def tok_seconds(self) -> float: ...  # seconds of tokenizer work so far (benchmark)

    def cached_logits(self, state: Any): ...  # next-token logits from the KV cache (tests)

    def fresh_logits(self, state: Any): ...  # the same from a full forward without cache (tests)

    def runner_stats(self) -> dict: ...  # its runner's counters: forwards, busy seconds, batch sizes ({}: none)
