"""How the CPU's cores are shared by the models' forwards in one process.

Each model's batched runner has its own scheduler thread, and the models' forwards run at
once (a fused step asks every model). Each forward's matrix products run on a team of
intra-op threads (OpenMP), and the team's size is set per calling thread: if every
runner took all of the process's threads (2 on a 2-core machine), two forwards at once run
4 threads on 2 cores, which was measured to cost more than it gives once requests batch
(docs/batching.md, "Cores"). If every runner took its share (1 each), a forward that runs
alone (one request, while the other model waits for it) would leave a core idle.

So a forward takes every thread when no other forward of the process is running as it
starts, or when it carries a single item (one request's only work in it: a lone client's
forwards then run as they do without batching), else its share: the process's threads over
the runners that share them. A forward that starts with every thread keeps its team to its
end.
The team's size changes which cores compute a product, not its value (the batching tests
compare concurrent outputs with solo ones byte for byte).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch


class CoreShare:
    """The intra-op threads of the CPU forwards of the runners that `join` it."""

    def __init__(self, threads: int | None = None):
        self._threads = threads  # None: torch.get_num_threads() when the first runner joins
        self._lock = threading.Lock()
        self.members = 0  # runners sharing the threads
        self.running = 0  # forwards running now

    @property
    def threads(self) -> int:
        return self._threads or 1

    def join(self) -> None:
        with self._lock:
            if self._threads is None:
                self._threads = torch.get_num_threads()
            self.members += 1

    def leave(self) -> None:
        with self._lock:
            self.members = max(0, self.members - 1)

    @contextmanager
    def forward(self, items: int = 1) -> Iterator[int]:
        """Around one forward of a joined runner's thread, carrying `items` items (one per KV
        slot): sets that thread's team size and yields it."""
        with self._lock:
            self.running += 1
            whole = self.running == 1 or items == 1
            n = self.threads if whole else max(1, self.threads // max(1, self.members))
        torch.set_num_threads(n)
        try:
            yield n
        finally:
            with self._lock:
                self.running -= 1


PROCESS = CoreShare()  # the CPU runners of this process (each Ray actor is a process of its own)
