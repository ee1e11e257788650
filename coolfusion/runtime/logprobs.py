"""The arithmetic of log-likelihoods, in one place: per-token log-probs from logits, and the
fused per-token value over models with different tokenizers.

    rows = of_sequence(model, device, ids, top)  # a full forward, no cache: [(log p(ids[i]), top), ...]
    rows = of_rows(logits, targets, top)       # [(log p(target), ((id, log p), ...top)), ...]
    per_ref = assign(ref_ends, model_ends, model_values)   # one model's values on reference tokens
    fused = mean(per_model)                     # the fused value of each reference token

A token's *end* is the character offset in the scored text where it ends. `assign` gives a
model token's log-prob to the first reference token that ends at or after it (the reference
token in which it ends), so the sum over any run of reference tokens is that model's
log-likelihood of exactly its tokens that end inside the run: log P_v(span | before) whenever
both edges of the span are token boundaries of model v too (docs/architecture.md,
"Log-likelihoods"). The runners call `of_sequence` (under their model's lock); nothing here
knows about workers, requests or HTTP.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from coolfusion.runtime.hf_compat import text_config

Row = tuple[float, tuple[tuple[int, float], ...]]  # log p of the target, and the top (id, log p)
MAX_LOGIT_ELEMENTS = 1 << 26  # (T, V) logits of one forward, at most (256 MiB in float32); beyond: row chunks


def of_rows(logits: torch.Tensor, targets: Sequence[int], top: int = 0) -> list[Row]:
    """Row r of `logits` (R, V) is the next-token distribution where `targets[r]` came next:
    its log-prob there and the `top` most likely tokens (id, log-prob), most likely first."""
    logp = torch.log_softmax(logits.float(), -1)  # (R, V)
    tgt = torch.tensor(list(targets), device=logp.device)  # (R,)
    lp = logp.gather(1, tgt[:, None])[:, 0].tolist()  # (R,)
    if top <= 0:
        return [(v, ()) for v in lp]
    vals, idx = logp.topk(top, -1)  # (R, top)
    return [(v, tuple(zip(i, t))) for v, i, t in zip(lp, idx.tolist(), vals.tolist())]


def assign(ref_ends: Sequence[int], ends: Sequence[int], values: Sequence[float | None]) -> list[float]:
    """One model's token log-probs summed per reference token: the token ending at char `e`
    goes to the first reference token whose end is >= e. Tokens ending at 0 (a BOS) or with
    no value (the first token) add nothing; a token ending after the last reference token
    (it cannot, when both cover the same text) is dropped."""
    out = [0.0] * len(ref_ends)
    for e, v in zip(ends, values):
        if v is None or e <= 0:
            continue
        j = bisect.bisect_left(ref_ends, e)
        if j < len(out):
            out[j] += v
    return out


def mean(per_model: Sequence[Sequence[float]]) -> list[float]:
    """The fused value of each reference token: the mean over models of their assigned sums."""
    k = len(per_model)
    return [sum(col) / k for col in zip(*per_model)]


def of_sequence(model, device: torch.device, ids: list[int], top: int = 0) -> list[Row]:
    """Per position i >= 1 of `ids`: log p(ids[i] | ids[:i]) and the `top` most likely tokens
    there, from a full forward of the whole sequence without any cache. Long sequences of a
    large vocabulary get their logits in chunks of rows (`logits_to_keep`), one forward each,
    so that (T, V) logits never exceed MAX_LOGIT_ELEMENTS."""
    if len(ids) < 2:
        return []
    cfg = text_config(model.config)
    vocab = getattr(cfg, "vocab_size", None) or 1
    inp = torch.tensor([ids], device=device)  # (1, T)
    whole = len(ids) * vocab <= MAX_LOGIT_ELEMENTS  # one forward, every row's logits
    step = len(ids) - 1 if whole else max(1, MAX_LOGIT_ELEMENTS // vocab)
    rows: list[Row] = []
    with torch.inference_mode():
        for a in range(0, len(ids) - 1, step):
            b = min(a + step, len(ids) - 1)  # rows a..b-1 predict ids[a+1..b]
            keep = {} if whole else {"logits_to_keep": torch.arange(a, b, device=device)}
            logits = model(input_ids=inp, use_cache=False, **keep).logits[0]  # (T, V), or (b-a, V)
            rows += of_rows(logits[:-1] if whole else logits, ids[a + 1 : b + 1], top)
    return rows
