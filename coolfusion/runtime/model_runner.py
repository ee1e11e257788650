"""The forward passes of one loaded model over per-request KV caches.

A runner owns one model and the KV storage of the requests it serves, and runs every
forward a worker needs: feed tokens after a request's cache (decode, prefill, or candidate
blocks side by side, each at its own positions and seeing only the committed prefix and
itself), and a full forward without cache (the tests' reference, and `sequence_logprobs`:
the exact log-probs that `logprobs`/`echo` report). It is the one place that
knows how to call a transformers model and how to lay out its attention mask; the worker
(`coolfusion.workers.local`) decides what to feed, in terms of tokens, positions and blocks only,
and edits a request's cache only through `crop` and `move`.

It implements `coolfusion.runtime.runner.Runner`, as `coolfusion.runtime.batched_runner.BatchedRunner`
(preallocated slots, the forwards of all requests batched into one) does.
"""

from __future__ import annotations

import threading
import time

import torch

from coolfusion.runtime import batched_forward, kvcache
from coolfusion.runtime import logprobs
from coolfusion.runtime.hf_compat import cache_keyword, text_config


class ModelRunner:
    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.lock = threading.Lock()  # one forward at a time on this model
        cfg = text_config(model.config)
        self.max_positions: int | None = getattr(cfg, "max_position_embeddings", None)
        self._layer_types = tuple(getattr(cfg, "layer_types", None) or ())
        self._sliding = getattr(cfg, "sliding_window", None)
        self.cache_kw = cache_keyword(model)
        self.forward_tokens = 0  # tokens fed through the model (for the benchmark)
        self.forwards = 0  # forwards run through `forward` (for the benchmark)
        self.busy_s = 0.0  # wall seconds spent in them

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)

    # ---- per-request KV storage ----------------------------------------------------------

    def open_cache(self):
        """KV storage for one new request."""
        return kvcache.new_cache()

    def close_cache(self, cache) -> None:
        """The request is done; its storage is garbage once the caller drops it."""

    def crop(self, cache, n: int) -> None:
        """Keep the first `n` cached tokens."""
        kvcache.crop(cache, n)

    def move(self, cache, src: int, dst: int, n: int) -> None:
        """Copy cached tokens [src, src+n) to [dst, dst+n) (a scored block moved into place)."""
        kvcache.move(cache, src, dst, n)

    def copy(self, src, dst, n: int) -> None:
        """Make cache `dst` hold the first `n` cached tokens of cache `src` (a forked state)."""
        kvcache.copy(src, dst, n)

    # ---- forwards --------------------------------------------------------------------------

    def forward(self, cache, tokens: list[int], *, blocks=None, last_only=False, lead: int = 0) -> torch.Tensor:
        """Feed `tokens` after the cache's current contents; returns logits (T, V), or (1, V)
        for the last token only (`last_only`: a prefill skips the LM head on the others).

        `blocks`: the tokens are candidate blocks, given as (first position, length) each in
        order; a block's tokens sit at those sequence positions and attend to the cached
        prefix before their first position and causally to their own block only. `lead`:
        the tokens start with that many tokens of the sequence itself, fed after the cache
        before the blocks (a sync folded into the scoring forward; the blocks see them as
        cached); the logits are then the blocks' rows only (T - lead, V)."""
        past = cache.get_seq_length()
        inp = torch.tensor([tokens], device=self.device)  # (1, T)
        kwargs = {}
        if blocks is not None:
            kwargs["position_ids"] = torch.tensor([batched_forward.block_positions(past, blocks, lead)], device=self.device)
            kwargs["attention_mask"] = self.block_mask(past, blocks, lead)
        else:
            kwargs["position_ids"] = torch.arange(past, past + len(tokens), device=self.device)[None]
        kwargs["cache_position"] = torch.arange(past, past + len(tokens), device=self.device)
        if last_only or lead:
            kwargs["logits_to_keep"] = 1 if last_only else len(tokens) - lead
        kwargs[self.cache_kw] = cache
        with self.lock, torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=inp, use_cache=True, **kwargs)
            self.busy_s += time.perf_counter() - t0
            self.forwards += 1
            self.forward_tokens += len(tokens)
        return out.logits[0].float()  # (T, V)

    def stats(self) -> dict:
        """{}: the batch counters are the batched runner's (this one runs one forward at a time)."""
        return {}

    def kv_report(self) -> dict[str, int]:
        """{}: no preallocated KV slots (each request's cache grows as it needs)."""
        return {}

    def shutdown(self) -> None:
        """Nothing to stop: forwards run on the caller's thread."""

    def fresh_logits(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits after `ids` from a full forward without any cache."""
        with self.lock, torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device))
        return out.logits[0, -1].float()  # (V,)

    def sequence_logprobs(self, ids: list[int], top: int = 0) -> list[logprobs.Row]:
        """log p(ids[i] | ids[:i]) for i >= 1, with the `top` alternatives at each position."""
        with self.lock:
            return logprobs.of_sequence(self.model, self.device, ids, top)

    def block_mask(self, kv: int, blocks, lead: int = 0):
        """(1, 1, T, kv+T) additive mask for candidate blocks fed after `kv` cached tokens
        (who sees what: `batched_forward.block_pattern`, `lead` tokens of the sequence first),
        and on sliding layers only the window. `blocks`: (first position, length) each."""
        dev = self.device
        allow = batched_forward.block_pattern(kv, blocks, device=dev, lead=lead)  # (T, kv+T)
        q_pos = torch.tensor(batched_forward.block_positions(kv, blocks, lead), device=dev)  # (T,)
        k_pos = torch.cat([torch.arange(kv, device=dev), q_pos])  # (kv+T,) cache slot == position for the prefix
        neg = torch.finfo(self.model.dtype).min

        def to_mask(a):
            return torch.zeros(a.shape, dtype=self.model.dtype, device=dev).masked_fill_(~a, neg)[None, None]

        full = to_mask(allow)
        if self._sliding and "sliding_attention" in self._layer_types:
            win = allow & (q_pos[:, None] - k_pos[None, :] < self._sliding)
            return {"full_attention": full, "sliding_attention": to_mask(win)}
        return full
