"""Choosing a proposal's next token from a model's logits: greedy (temperature 0) or
sampled with temperature and top-p from the request's own seeded generator. The local worker
decides when to decode; this module holds the tensor arithmetic, so the worker stays free of
torch."""

from __future__ import annotations

import torch


def generator(temperature: float, seed: int | None) -> torch.Generator | None:
    """The request's random stream: None for greedy; seeded from `seed`, else from torch."""
    if temperature <= 0:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else torch.seed())
    return gen


def next_token(logits: torch.Tensor, temperature: float, top_p: float,
               gen: torch.Generator | None) -> tuple[int, float]:
    """(token, its log-prob at temperature 1) after `logits` (V,)."""
    logp = torch.log_softmax(logits, -1)  # (V,)
    if temperature <= 0:
        tok = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits / temperature, -1)  # (V,)
        if top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, -1) - sp < top_p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        tok = int(torch.multinomial(probs.cpu(), 1, generator=gen))
    return tok, float(logp[tok])


def token_nlls(logits: torch.Tensor, targets: list[int]) -> list[float]:
    """-log p(targets[i]) under the i-th row of `logits` (len(targets), V)."""
    rows = torch.log_softmax(logits, -1)  # (L, V)
    tgt = torch.tensor(targets, device=rows.device)  # (L,)
    return (-rows.gather(1, tgt[:, None])[:, 0]).tolist()
