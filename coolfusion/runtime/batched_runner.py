"""The batched runner: the Runner protocol (`coolfusion.runtime.runner`) over preallocated slots,
with the forwards of every request of a model batched into one (config `fusion.batching`).

A request's KV storage is a slot of a `SlotStorage` (coolfusion/runtime/slots.py: [slots, kv heads,
max len, head dim] per layer, sized at start-up from `fusion.kv_slots` x `fusion.kv_max_tokens`);
its forwards go to the model's scheduler thread (coolfusion/runtime/batch_scheduler.py), which runs whatever every
request has queued as ONE forward (coolfusion/runtime/batched_forward.py: the linear layers batched,
attention per request on its own slot). The worker and the fusion loop do not change: a
request thread calls `forward` and blocks until the batch it joined has run.

A long prefill is fed in chunks of `PREFILL_CHUNK` tokens, one forward each, so it holds
the other requests' decode steps back by one chunk's time at most, not by the whole prompt.

KV room: `open_cache` waits up to `wait_s` for a free slot, then raises `Overloaded` (429);
`close_cache` frees the slot at once. A request longer than a slot never starts: `max_len`
caps the worker's context limit, so `engine.check` refuses it with a 400. A slot holds
`headroom` tokens more than that, for the candidate blocks scored after the committed text
(every model's candidates, in this model's tokens); should they still not fit, the request
ends with `ContextLengthExceeded`, never a crash.
"""

from __future__ import annotations

import threading
import time

import torch

from coolfusion.runtime import batched_forward
from coolfusion.runtime import logprobs
from coolfusion.runtime.batched_forward import Item
from coolfusion.core.errors import ContextLengthExceeded, Overloaded
from coolfusion.runtime.batch_scheduler import BatchScheduler
from coolfusion.runtime.slots import KVRoomError, SlotStorage
from coolfusion.runtime.hf_compat import text_config


PREFILL_CHUNK = 256  # tokens of a prefill per forward


class BatchedRunner:
    def __init__(self, model, device: torch.device, *, slots: int, max_len: int, headroom: int = 256,
                 max_batch_tokens: int = 2048, wait_s: float = 30.0, name: str = "model"):
        self.model = model
        self.device = device
        cfg = text_config(model.config)
        own = getattr(cfg, "max_position_embeddings", None)
        self.max_positions = min(own, max_len) if own else max_len  # a request must fit its slot
        self.storage = SlotStorage.for_model(model, slots=slots, max_len=max_len + headroom, device=device)
        self._scheduler = BatchScheduler(model, self.storage, max_batch_tokens=max_batch_tokens, name=f"cf-batch-{name}")
        self._free = threading.Condition()
        self.wait_s = wait_s
        self.forward_tokens = 0

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)

    @property
    def forwards(self) -> int:
        """Batched forwards run so far."""
        return self._scheduler.forwards

    @property
    def busy_s(self) -> float:
        """Wall seconds this model has spent in forwards."""
        return self._scheduler.busy_s

    @property
    def items(self) -> int:
        """Requests' forwards run in them (items / forwards = the mean batch)."""
        return self._scheduler.items

    @property
    def batch_sizes(self) -> list[int]:
        """Requests per forward, most recent last (the last 1,000)."""
        return list(self._scheduler.batch_sizes)

    def stats(self) -> dict:
        """Its counters: forwards, items run in them, busy seconds, recent batch sizes, KV slots."""
        return {"forwards": self.forwards, "items": self.items, "busy_s": self.busy_s,
                "batch_sizes": self.batch_sizes, "kv": self.kv_report()}

    def kv_report(self) -> dict[str, int]:
        """Slots in use / in all, and the bytes preallocated for them (start-up log, /metrics)."""
        return {"slots": self.storage.slots, "slots_in_use": self.storage.slots - self.storage.free_slots,
                "max_tokens_per_slot": self.max_positions, "bytes": self.storage.nbytes}

    # ---- per-request KV storage ----------------------------------------------------------

    def open_cache(self) -> int:
        deadline = time.monotonic() + self.wait_s
        with self._free:
            while True:
                try:
                    return self._scheduler.open()
                except KVRoomError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Overloaded(f"no KV room: all {self.storage.slots} slots of this model are in use "
                                         f"(fusion.kv_slots); retry later") from None
                    self._free.wait(left)

    def close_cache(self, cache: int) -> None:  # `cache`: the request's slot number
        self._scheduler.close(cache)
        with self._free:
            self._free.notify()

    def crop(self, cache: int, n: int) -> None:
        self.storage.crop(cache, n)

    def move(self, cache: int, src: int, dst: int, n: int) -> None:
        self.storage.move(cache, src, dst, n)

    def copy(self, src: int, dst: int, n: int) -> None:
        self.storage.copy(src, dst, n)

    # ---- forwards --------------------------------------------------------------------------

    def forward(self, cache: int, tokens: list[int], *, blocks=None, last_only=False, lead: int = 0) -> torch.Tensor:
        """As `ModelRunner.forward`, run in the next batched forward of this model."""
        if blocks is None and last_only and len(tokens) > PREFILL_CHUNK:
            for i in range(0, len(tokens) - PREFILL_CHUNK, PREFILL_CHUNK):  # all but the last chunk
                self.forward(cache, tokens[i : i + PREFILL_CHUNK], last_only=True)
            rest = len(tokens) - (len(tokens) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
            return self.forward(cache, tokens[-rest:], last_only=True)
        if blocks is None:
            item = Item(cache, list(tokens), rows="last" if last_only else "all")
        else:
            kv = self.storage.length(cache)
            positions = batched_forward.block_positions(kv, blocks, lead)
            sees = batched_forward.block_pattern(kv, blocks, device=self.device, lead=lead)
            rows = "last" if last_only else len(tokens) - lead if lead else "all"
            item = Item(cache, list(tokens), positions=positions, sees=sees, rows=rows)
        try:
            out = self._scheduler.forward(item)
        except KVRoomError as err:
            raise ContextLengthExceeded(f"the request outgrew its KV slot ({err}); shorten it or raise "
                                        "fusion.kv_max_tokens") from None
        self.forward_tokens += len(tokens)
        return out

    def fresh_logits(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits after `ids` from a full forward without any cache."""
        with self._scheduler.model_lock, torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device))
        return out.logits[0, -1].float()  # (V,)

    def sequence_logprobs(self, ids: list[int], top: int = 0) -> list[logprobs.Row]:
        """As `ModelRunner.sequence_logprobs`: a full forward without any cache, between the
        scheduler thread's batched forwards (it holds the scheduler's model lock)."""
        with self._scheduler.model_lock:
            return logprobs.of_sequence(self.model, self.device, ids, top)

    def shutdown(self) -> None:
        self._scheduler.stop()
