"""The per-request KV cache: transformers' DynamicCache over storage that grows in place.

transformers' `DynamicLayer` appends with `torch.cat`, which copies the whole cache at every
decoded token: at a 2,000-token context that is ~90 MB per token for SmolLM2-135M, about as
much memory traffic as the attention itself. `GrowingLayer` keeps each layer's keys and
values in a buffer with spare room (grown geometrically, so an append copies nothing
amortised) and exposes `keys`/`values` as views of its first `length` slots, which is all the
attention code reads. Cropping moves the end; moving a scored block into place copies only
that block. The model sees an ordinary `DynamicCache`. Uses only what transformers 4.56 to
5.x share (`Cache.layer_class_to_replicate`, `DynamicLayer.keys/values`); run on 5.24.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 256  # slots allocated at least, per layer


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose appends write into preallocated storage."""

    _k: torch.Tensor | None = None  # (B, H, capacity, D) storage; keys/values view its head
    _v: torch.Tensor | None = None

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> None:
        cap = max(MIN_CAPACITY, need + need // 2)  # geometric growth: amortised O(1) per token
        k = key_states.new_empty(key_states.shape[:-2] + (cap, key_states.shape[-1]))  # (B, H, cap, D)
        v = value_states.new_empty(value_states.shape[:-2] + (cap, value_states.shape[-1]))
        n = self.get_seq_length()
        if n:
            k[..., :n, :] = self.keys
            v[..., :n, :] = self.values
        self._k, self._v = k, v
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = self.get_seq_length()
        need = n + key_states.shape[-2]
        if self._k is None or need > self._k.shape[-2]:
            self._reserve(key_states, value_states, need)
        self._k[..., n:need, :] = key_states
        self._v[..., n:need, :] = value_states
        self.keys, self.values = self._k[..., :need, :], self._v[..., :need, :]  # views, no copy
        return self.keys, self.values

    def get_seq_length(self, *args) -> int:
        return 0 if self._k is None else self.keys.shape[-2]

    def truncate(self, n: int) -> None:
        if self._k is not None and n < self.keys.shape[-2]:
            self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy slots [src, src+n) to [dst, dst+n) (the ranges may overlap)."""
        if self._k is not None:
            self._k[..., dst : dst + n, :] = self._k[..., src : src + n, :].clone()
            self._v[..., dst : dst + n, :] = self._v[..., src : src + n, :].clone()


def new_cache() -> DynamicCache:
    """An empty cache whose layers (created on first use, all full attention: sliding-window
    layers get their window from the attention mask) are `GrowingLayer`s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def crop(cache: DynamicCache, n: int) -> None:
    """Keep the first `n` slots of every layer."""
    for layer in cache.layers:
        layer.truncate(n)


def move(cache: DynamicCache, src: int, dst: int, n: int) -> None:
    """Copy slots [src, src+n) to [dst, dst+n) in every layer."""
    if src == dst or n <= 0:
        return
    with torch.inference_mode():
        for layer in cache.layers:
            layer.move(src, dst, n)


def copy(src: DynamicCache, dst: DynamicCache, n: int) -> None:
    """Make `dst` hold the first `n` slots of `src` in every layer (copied: the two caches
    share no storage afterwards)."""
    layers = []
    with torch.inference_mode():
        for layer in src.layers:
            new = GrowingLayer()
            if n > 0 and layer.get_seq_length() >= n:
                new.update(layer.keys[..., :n, :], layer.values[..., :n, :])
            elif n > 0:
                raise ValueError(f"copy {n} slots of a cache layer that holds {layer.get_seq_length()}")
            layers.append(new)
    dst.layers[:] = layers
