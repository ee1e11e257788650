"""The runner seam: what a worker asks of the model runtime, and which runner it gets.

A runner owns one model and the KV storage of every request it serves, and runs every
forward a worker needs (docs/architecture.md). Two implement `Runner`:
`coolfusion.runtime.model_runner.ModelRunner` (a transformers cache per request, one forward at
a time) and `coolfusion.runtime.batched_runner.BatchedRunner` (preallocated KV slots, the
forwards of every running request batched into one). `coolfusion.workers.local.LocalWorker`
takes either. A request's storage (`cache`) is opaque to the worker: a cache object or a
slot number.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from coolfusion.runtime import logprobs


@runtime_checkable
class Runner(Protocol):
    model: Any  # the transformers model
    device: torch.device
    max_positions: int | None  # the longest sequence a request may hold (model or KV slot)
    forward_tokens: int  # tokens fed through the model so far (benchmark probe)

    @property
    def generation_config(self) -> Any: ...  # the model's, for its end tokens

    def open_cache(self) -> Any: ...  # KV storage for one new request (Overloaded when full)

    def close_cache(self, cache: Any) -> None: ...  # the request is done

    def crop(self, cache: Any, n: int) -> None: ...  # keep the first n cached tokens

    def move(self, cache: Any, src: int, dst: int, n: int) -> None: ...  # cached [src, src+n) to [dst, ...)

    def copy(self, src: Any, dst: Any, n: int) -> None: ...  # cache dst := the first n cached tokens of cache src

    # logits (T, V) of `tokens` fed after the cache, or (1, V) with last_only; `blocks`:
    # candidate blocks side by side, (first position, length) each, seeing the prefix before it;
    # `lead`: with blocks, the first `lead` tokens continue the sequence (fed before the blocks,
    # seen by them as cached; the logits are the blocks' rows only)
    def forward(self, cache: Any, tokens: list[int], *, blocks: list[tuple[int, int]] | None = None,
                last_only: bool = False, lead: int = 0) -> torch.Tensor: ...

    def fresh_logits(self, ids: list[int]) -> torch.Tensor: ...  # (V,) after ids, full forward, no cache

    def sequence_logprobs(self, ids: list[int], top: int = 0) -> list[logprobs.Row]: ...  # full forward

    def kv_report(self) -> dict[str, int]: ...  # slots, in use, tokens per slot, bytes; {} without slots

    def stats(self) -> dict: ...  # batch counters: forwards, items, busy_s, batch_sizes, kv; {} without batching

    def shutdown(self) -> None: ...  # stop the runner's thread, if any


def make_runner(model, device: torch.device, fusion=None, name: str = "model") -> Runner:
    """The runner `fusion` (a FusionConfig) asks for: batched over KV slots, or one forward at a time."""
    if fusion is not None and fusion.batching:
        from coolfusion.runtime.batched_runner import BatchedRunner

        return BatchedRunner(model, device, slots=fusion.kv_slots, max_len=fusion.kv_max_tokens,
                             headroom=16 * fusion.max_segment_tokens, max_batch_tokens=fusion.max_batch_tokens,
                             name=name)
    from coolfusion.runtime.model_runner import ModelRunner

    return ModelRunner(model, device)
