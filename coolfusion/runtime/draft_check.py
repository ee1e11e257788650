"""Speculative proposals, one model's side: check another model's draft in ONE forward
(docs/speculative.md).

For a greedy request, the loop lets one model draft (propose as usual, lookahead included)
and hands the draft's text to every other model. That model feeds its own tokens of the draft
after its sequence, and reads its argmax at every position: while the argmax equals the token
fed next, the fed token is exactly what its own greedy decoding would write there; at the
first disagreement its argmax is its own next token. `check` runs that forward and returns the
`DraftCheck` tokens, which the worker's proposal loop then consumes one by one, as if it had
decoded them (coolfusion.workers.local), so its proposal is the one it makes without a draft.

Float rounding: a row of a many-token forward and the row of a one-token decode differ in
the last bits, so an argmax is trusted only where its lead over the runner-up logit is at
least `MARGIN`; at the first row under it, acceptance stops and the model decodes from there.
The KV storage keeps the accepted tokens and drops the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Top-1 minus top-2 logit under which a checked argmax is not trusted. Measured on the embedded
# pair (float32, CPU): a row of a 14-token forward differs from the one-token decode of the
# same position by at most 1.2e-4 in any logit (tests/test_speculative.py prints it); an argmax
# can flip only if the lead is under twice that. 0.01 is 40x that bound and costs almost nothing:
# ties that close are rare in greedy text.
MARGIN = 0.01
# Half-precision models (bf16/fp16, GPUs) round hidden states to 8-11 mantissa bits, so rows of
# forwards of different shapes differ far more; unmeasured yet (scripts/device_check.sh runs the
# speculative bench there): a conservative guess, a tenth of a logit's ulp at ~30 in bf16 is 0.0125,
# and differences of a few ulps are common.
MARGIN_HALF = 0.5


def margin_for(dtype) -> float:
    """The trusted lead of a model computing in `dtype`."""
    return MARGIN if dtype in (torch.float32, torch.float64) else MARGIN_HALF


def accept(rows: torch.Tensor, fed: list[int], margin: float = MARGIN) -> tuple[int, bool]:
    """How many of `fed` a model's greedy decoding reproduces, from its logits rows (R, V):
    rows[i] predicts fed[i] (len(rows) == len(fed) + 1: the last row follows all of them).
    Returns (n accepted, whether rows[n]'s argmax, the model's next token, can be trusted)."""
    top2 = rows.topk(2, dim=-1)  # values, indices: (R, 2)
    lead = (top2.values[:, 0] - top2.values[:, 1]).tolist()
    best = top2.indices[:, 0].tolist()
    for i, row_lead in enumerate(lead):
        if row_lead < margin:
            return i, False
        if i == len(fed) or best[i] != fed[i]:
            return i, True
    return len(fed), False  # unreachable: rows has one more row than fed


@dataclass
class DraftCheck:
    """The result of one check forward, for the proposal loop to consume in order.

    The model's KV storage holds its sequence up to the check (`base_len` tokens) followed
    by `tokens` (accepted); `rows[i]` is the next-token logits after `tokens[:i]` (None where
    not trusted)."""

    base_len: int
    tokens: list[int]
    logprobs: list[float]
    rows: list[torch.Tensor | None]
    fed: int  # draft tokens fed (the `checked` count)
    used: int = 0  # tokens consumed so far
    draft_ids: list[int] = field(default_factory=list)  # the model's tokens of the whole draft
    draft_logprobs: list[float] = field(default_factory=list)  # and their log-probs (scoring reuse)

    def __bool__(self) -> bool:
        return self.used < len(self.tokens)

    def take(self, st) -> tuple[int, float]:
        """The next accepted token and its log-prob; `st` (the worker's State) then has its
        cache length and next-token logits as if that token had just been decoded. The caller
        appends the token to `st.ids` (as after a decode)."""
        tok, lp = self.tokens[self.used], self.logprobs[self.used]
        self.used += 1
        st.kv_len = self.base_len + self.used
        st.logits = self.rows[self.used]
        return tok, lp


def check(worker, st, draft_ids: list[int], known: list[int], known_logprobs: list[float],
          max_tokens: int, end_ids=frozenset()) -> DraftCheck | None:
    """Feed `draft_ids` (the model's tokens of the draft text, after its committed tokens)
    past the `known` tokens it already holds beyond them (its lookahead), in one forward.
    None when the lookahead already disagrees with the draft or nothing is left to check.
    Accepted tokens stop before an end token (`end_ids`), which the loop decodes itself."""
    if draft_ids[: len(known)] != known:
        return None
    fed = draft_ids[len(known) : max(len(known), max_tokens + 3)]
    if not fed:
        return None
    pending = st.ids[st.kv_len :]  # tokens of the sequence not yet in the cache
    if not pending and st.logits is None:  # the next-token logits are unknown: feed the last token again
        st.kv_len -= 1
        pending = st.ids[st.kv_len :]
    worker.runner.crop(st.cache, st.kv_len)
    logits = worker.runner.forward(st.cache, pending + fed)  # (len(pending) + len(fed), V)
    rows = logits[len(pending) - 1 :] if pending else torch.cat([st.logits[None], logits])  # (len(fed)+1, V)
    margin = margin_for(getattr(worker.runner.model, "dtype", torch.float32))
    n, trusted = accept(rows, fed, margin)
    if not pending:  # rows[0] is the logits the model holds already, not the check's: always trusted
        n, trusted = _with_held_first_row(rows, fed, n, trusted, margin)
    ends = [i for i, t in enumerate(fed[:n]) if t in end_ids]
    if ends:  # an end token (the draft's text spelt one): the proposal loop decodes it and ends
        n, trusted = ends[0], True
    logp = torch.log_softmax(rows[:-1], -1).gather(1, torch.tensor(fed, device=rows.device)[:, None])[:, 0]  # (len(fed),)
    logp = logp.tolist()
    base = len(st.ids)
    st.kv_len = base + n
    worker.runner.crop(st.cache, st.kv_len)  # keep the accepted tokens, drop the rest
    kept = [rows[i] for i in range(n)] + [rows[n] if trusted else None]
    st.logits = kept[0]
    return DraftCheck(base, fed[:n], logp[:n], kept, len(fed), draft_ids=list(known) + fed,
                   draft_logprobs=list(known_logprobs) + logp)


def _with_held_first_row(rows: torch.Tensor, fed: list[int], n: int, trusted: bool,
                         margin: float) -> tuple[int, bool]:
    """`accept` when rows[0] is the held logits a plain decode would use: never distrusted."""
    if n > 0 or trusted:
        return n, trusted
    if int(rows[0].argmax()) != fed[0]:
        return 0, True
    n, trusted = accept(rows[1:], fed[1:], margin)
    return n + 1, trusted
