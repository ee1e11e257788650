"""KV storage for many requests of one model: preallocated slots, llama.cpp style.

Per layer, keys and values live in one tensor each of shape (slots, kv_heads, max_len,
head_dim), allocated once. A request owns one slot (one row) while it is open; its cached
tokens are the first `length(slot)` entries of that row. Nothing is allocated per token and
no operation touches another request's row. The tensors are allocated uninitialised
(`torch.empty`; on a Linux CPU an anonymous mapping that is not counted as committed memory,
`reserved`): on the CPU the operating system then commits a page only when a forward first
writes it, so start-up costs no time and resident memory follows the longest contexts served
(up to `nbytes`); on CUDA the memory is taken at once. Nothing reads an entry past a
slot's length, so their contents never matter.

    alloc() -> slot          free(slot)           length(slot)
    crop(slot, n)            move(slot, src, dst, n)    (copies only that block)
    copy(src, dst, n)        (dst holds src's first n entries)
    write(layer, slots, at, keys, values)   (one indexed write per layer, used by the forward)

Keys are stored after RoPE, i.e. for the positions they were computed at, and every cached
token's position is kept beside it (`positions[slot, i]`): sliding-window layers mask by
position, and a block scored at its final positions keeps them when it is moved into place.
Lengths are plain Python ints, changed only by the owner of the storage (the runner thread):
`batched_forward.forward` writes the new tokens and then advances the lengths.
"""

from __future__ import annotations

import math
import mmap
import sys

import torch
from coolfusion.runtime.hf_compat import text_config


MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python's mmap does not export it


def reserved(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.empty(shape)`, except on a Linux CPU: there an anonymous private mapping with
    MAP_NORESERVE. Its pages are committed as they are first written, as with torch.empty, but
    the mapping is not counted as committed memory: a process whose preallocated slots exceed
    the machine's RAM (32 slots of 4,352 tokens are 10.8 GiB for the embedded pair) can still
    fork() a subprocess (measured here: with 30 GiB of torch.empty a fork fails with ENOMEM on
    a 24 GiB machine; with the same in such mappings it succeeds). The mapping is unmapped
    when the tensor is freed."""
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    area = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    return torch.frombuffer(area, dtype=dtype).view(shape)  # the tensor keeps `area` alive


class KVRoomError(RuntimeError):
    """No free slot, or a request's sequence would outgrow its slot (max_len)."""


class SlotStorage:
    """Keys and values of up to `slots` requests, each up to `max_len` tokens, for every layer."""

    def __init__(self, *, num_layers: int, kv_heads: int, head_dim: int, slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.slots, self.max_len = slots, max_len
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [reserved(shape, dtype, device) for _ in range(num_layers)]  # (S, H, L, D) each
        self.v = [reserved(shape, dtype, device) for _ in range(num_layers)]  # (S, H, L, D) each
        self.positions = torch.empty((slots, max_len), dtype=torch.long, device=device)  # (S, L) RoPE position of each entry
        self._len = [0] * slots
        self._free = list(range(slots - 1, -1, -1))  # a stack: the lowest free slot is taken first
        self._used: set[int] = set()

    @classmethod
    def for_model(cls, model, *, slots: int, max_len: int, dtype: torch.dtype | None = None,
                  device=None) -> "SlotStorage":
        """Storage shaped from the model's config (layers, KV heads, head dim)."""
        cfg = text_config(model.config)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        p = next(model.parameters())
        return cls(num_layers=cfg.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim, slots=slots,
                   max_len=max_len, dtype=dtype or p.dtype, device=device or p.device)

    # ---- bookkeeping -----------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held by keys, values and positions (all preallocated)."""
        kv = sum(t.numel() * t.element_size() for t in self.k + self.v)
        return kv + self.positions.numel() * self.positions.element_size()

    @staticmethod
    def bytes_needed(*, num_layers, kv_heads, head_dim, slots, max_len, dtype=torch.float32) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * slots * kv_heads * max_len * head_dim * elem + slots * max_len * 8

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> frozenset[int]:
        return frozenset(self._used)

    def alloc(self) -> int:
        """A free slot, empty; raises KVRoomError when every slot is taken."""
        if not self._free:
            raise KVRoomError(f"all {self.slots} KV slots are in use")
        s = self._free.pop()
        self._used.add(s)
        self._len[s] = 0
        return s

    def free(self, slot: int) -> None:
        """Return `slot` to the pool (its contents are left as garbage, never read)."""
        self._check(slot)
        self._used.discard(slot)
        self._len[slot] = 0
        self._free.append(slot)
        self._free.sort(reverse=True)  # keep handing out the lowest slots: rows stay packed

    def _check(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")

    def length(self, slot: int) -> int:
        self._check(slot)
        return self._len[slot]

    def room(self, slot: int) -> int:
        return self.max_len - self.length(slot)

    # ---- per-request edits -------------------------------------------------------------

    def crop(self, slot: int, n: int) -> None:
        """Keep the first `n` cached tokens of `slot` (n larger than the length is a no-op)."""
        self._check(slot)
        if n < 0:
            raise ValueError("crop to a negative length")
        self._len[slot] = min(self._len[slot], n)

    def move(self, slot: int, src: int, dst: int, n: int) -> None:
        """Copy entries [src, src+n) of `slot` to [dst, dst+n) (ranges may overlap), keys,
        values and positions alike; the length is not changed (crop after, as today)."""
        self._check(slot)
        if n <= 0 or src == dst:
            return
        if max(src, dst) + n > self._len[slot]:
            raise ValueError(f"move [{src},{src + n}) -> {dst} beyond length {self._len[slot]}")
        with torch.inference_mode():
            for t in self.k + self.v:
                t[slot, :, dst : dst + n] = t[slot, :, src : src + n].clone()
            self.positions[slot, dst : dst + n] = self.positions[slot, src : src + n].clone()

    def copy(self, src: int, dst: int, n: int) -> None:
        """Make `dst` hold the first `n` entries of `src` (keys, values, positions): a state
        forked from another's prefix. Only those rows are written; `src` is left as it is."""
        self._check(src)
        self._check(dst)
        if n > self._len[src]:
            raise ValueError(f"copy {n} entries of slot {src}, which holds {self._len[src]}")
        if src != dst and n > 0:
            with torch.inference_mode():
                for t in self.k + self.v:
                    t[dst, :, :n] = t[src, :, :n]
                self.positions[dst, :n] = self.positions[src, :n]
        self._len[dst] = n

    # ---- what the forward uses ---------------------------------------------------------

    def reserve(self, slot: int, n_new: int) -> int:
        """Check that `n_new` tokens fit after the slot's contents; returns the current length."""
        n = self.length(slot)
        if n + n_new > self.max_len:
            raise KVRoomError(f"slot {slot}: {n} + {n_new} tokens exceed max_len {self.max_len}")
        return n

    def write(self, layer: int, slot_idx: torch.Tensor, at: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store token t's key/value at [slot_idx[t], :, at[t]] of `layer`: one indexed write
        for the new tokens of every request. keys/values: (T, kv_heads, head_dim)."""
        self.k[layer][slot_idx, :, at] = keys
        self.v[layer][slot_idx, :, at] = values

    def advance(self, slot: int, n_new: int) -> None:
        """The forward wrote `n_new` tokens after the slot's contents: count them."""
        self._len[slot] += n_new

    def keys(self, layer: int, slot: int, n: int | None = None) -> torch.Tensor:
        """View (1, kv_heads, n, head_dim) of the slot's first n keys (default: its length)."""
        n = self._len[slot] if n is None else n
        return self.k[layer][slot : slot + 1, :, :n]

    def values(self, layer: int, slot: int, n: int | None = None) -> torch.Tensor:
        n = self._len[slot] if n is None else n
        return self.v[layer][slot : slot + 1, :, :n]
