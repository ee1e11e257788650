"""A per-model scheduler thread: the forwards of every request thread, batched (the batched runner's engine room).

    scheduler = BatchScheduler(model, SlotStorage.for_model(model, slots=8, max_len=4096))
    slot = scheduler.open()                          # any thread; KVRoomError when full
    logits = scheduler.forward(Item(slot, [tok]))    # blocks until the batch it joined has run
    scheduler.crop(slot, n); scheduler.move(slot, src, dst, n)   # the owner, between its forwards
    scheduler.close(slot)

Request threads stay plain sequential programs (propose, score, select, commit). Each
`forward` call queues one item and waits on a future; the scheduler thread takes everything
queued when the model is free (in arrival order, up to `max_batch_tokens` new tokens, at
least one item; a second item for a slot already in the batch waits for the next forward)
and runs it as ONE `batched_forward.forward`. Before taking, it waits for every request of
the last batch that is still open to have queued its next item, at most `gather` x the
recent forward time: those requests resubmit a moment apart (each does some tokenizer work
between its forwards), and without the wait the first one back would run alone, splitting
the batch. A request that sat out the last forward (busy on another model, scoring,
committing) is not waited for, and a request alone never waits. A request joins at the
next forward after it submits and leaves when it stops submitting.

`pad_decode_to=N` trades speed for load-invariant logits: decode forwards always have N rows
(padded), prefills and scoring blocks run alone; a request then gets bitwise the logits it
gets solo through the same scheduler, at any concurrency (see `batched_forward.forward`).

If a batched forward raises, its items are rerun one by one so that only the item at fault
gets the exception. Lengths change only inside forwards (scheduler thread); crop and move touch
only the caller's own row and are safe while no forward of that slot is pending.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future

import torch

from coolfusion.runtime import batched_forward
from coolfusion.runtime.core_share import PROCESS, CoreShare
from coolfusion.runtime.batched_forward import Item
from coolfusion.runtime.slots import SlotStorage


class BatchScheduler:
    """Owns one model and its SlotStorage; runs queued items in batched forwards."""

    def __init__(self, model, storage: SlotStorage, *, max_batch_tokens: int = 2048, name: str = "scheduler",
                 layout: str = "views", gqa: str = "enable", start: bool = True, gather: float = 0.25,
                 pad_decode_to: int = 0, cores: CoreShare | None = PROCESS):
        self.model, self.storage = model, storage
        # CPU forwards share the process's cores with the other models' (runtime/core_share.py)
        self.cores = cores if storage.device.type == "cpu" else None
        self.pad_decode_to = pad_decode_to
        self.max_batch_tokens = max_batch_tokens
        self.gather = gather
        self._forward_s = 0.0  # moving average of a forward's wall time
        self._last: set[int] = set()  # slots of the last batch
        self.layout, self.gqa = layout, gqa
        self._queue: deque[tuple[Item, Future]] = deque()
        self._cv = threading.Condition()
        self._slot_lock = threading.Lock()  # alloc/free from any thread
        self.model_lock = threading.Lock()  # held by every forward of this thread; others take it to call the model
        self._stop = False
        self.forwards = 0  # batched forwards run (for tests and metrics)
        self.items = 0  # items run in them
        self.busy_s = 0.0  # wall time spent in forwards
        self.batch_sizes: list[int] = []  # items per forward, most recent last (bounded)
        batched_forward.install(model)
        if self.cores is not None:
            self.cores.join()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start the scheduler thread (for one made with start=False: items queue up first)."""
        self._thread.start()

    # ---- request side ----------------------------------------------------------------

    def open(self) -> int:
        with self._slot_lock:
            return self.storage.alloc()

    def close(self, slot: int) -> None:
        """Free the slot; an item of it still queued fails with CancelledError-like RuntimeError."""
        with self._cv:
            kept = deque()
            for it, fut in self._queue:
                if it.slot == slot:
                    fut.set_exception(RuntimeError(f"slot {slot} closed"))
                else:
                    kept.append((it, fut))
            self._queue = kept
        with self._slot_lock:
            self.storage.free(slot)

    def submit(self, item: Item) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._stop:
                raise RuntimeError("scheduler stopped")
            self._queue.append((item, fut))
            self._cv.notify()
        return fut

    def forward(self, item: Item) -> torch.Tensor:
        """Queue `item`, wait for its batch, return its logits ((1, V) or (T, V))."""
        return self.submit(item).result()

    def crop(self, slot: int, n: int) -> None:
        self.storage.crop(slot, n)

    def move(self, slot: int, src: int, dst: int, n: int) -> None:
        self.storage.move(slot, src, dst, n)

    def length(self, slot: int) -> int:
        return self.storage.length(slot)

    def stop(self) -> None:
        with self._cv:
            if self._stop:
                return
            self._stop = True
            self._cv.notify()
        self._thread.join()
        if self.cores is not None:
            self.cores.leave()

    def _cores(self, items: int):
        """Around a forward of `items` items: its share of the CPU's intra-op threads (nothing
        to do on CUDA)."""
        return self.cores.forward(items) if self.cores is not None else contextlib.nullcontext()

    # ---- scheduler side -----------------------------------------------------------------

    def _take(self) -> list[tuple[Item, Future]]:
        """Everything queued that fits one forward (caller holds the condition)."""
        if self.pad_decode_to:
            return self._take_invariant()
        batch, seen, tokens, rest = [], set(), 0, deque()
        while self._queue:
            it, fut = self._queue.popleft()
            if it.slot in seen or (batch and tokens + len(it.tokens) > self.max_batch_tokens):
                rest.append((it, fut))
                continue
            batch.append((it, fut))
            seen.add(it.slot)
            tokens += len(it.tokens)
        self._queue = rest
        return batch

    def _take_invariant(self) -> list[tuple[Item, Future]]:
        """Load-invariant batching (`pad_decode_to`): a multi-token item runs alone, as it would
        solo; single-token items run together, at most `pad_decode_to`, padded to that many
        rows, so each row's logits are the same bits at any load."""
        if len(self._queue[0][0].tokens) > 1:
            return [self._queue.popleft()]
        batch, seen, rest = [], set(), deque()
        while self._queue:
            it, fut = self._queue.popleft()
            if len(it.tokens) > 1 or it.slot in seen or len(batch) >= self.pad_decode_to:
                rest.append((it, fut))
                continue
            batch.append((it, fut))
            seen.add(it.slot)
        self._queue = rest
        return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queue:
                    return
                deadline = time.monotonic() + self.gather * self._forward_s
                expected = self._last & self.storage.used_slots
                while not expected <= {it.slot for it, _ in self._queue} and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = self._take()
                self._last = {it.slot for it, _ in batch}
            batch = [(it, fut) for it, fut in batch if fut.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)

    def _run(self, batch) -> None:
        self.forwards += 1
        self.items += len(batch)
        t0 = time.perf_counter()
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
        try:
            single = all(len(it.tokens) == 1 for it, _ in batch)
            with self.model_lock, self._cores(len(batch)):
                outs = batched_forward.forward(self.model, self.storage, [it for it, _ in batch], layout=self.layout,
                                               gqa=self.gqa, pad_to=self.pad_decode_to if single else 0)
        except BaseException as err:  # noqa: BLE001 - isolate the item at fault
            if len(batch) == 1:
                batch[0][1].set_exception(err)
                return
            for one in batch:
                self._run([one])
            return
        spent = time.perf_counter() - t0
        self.busy_s += spent
        self._forward_s = 0.8 * self._forward_s + 0.2 * spent
        for (_, fut), out in zip(batch, outs):
            fut.set_result(out)
