"""Where the time of concurrent fused requests goes, per model: a timeline of the batched
runners' forwards (docs/batching.md, "Profile").

    PYTHONPATH=. python scripts/profile_batching.py --clients 8 --max-tokens 32

Runs the same greedy fused requests alone, then 1 and N clients at once through the engine
of the config (batching as configured), recording every batched forward (model, start,
end, items, tokens). Prints per model: forwards, items, busy share of the wall time, the
median wall time of decode-only forwards by batch size; the share of the wall time both
models were in a forward at once (they compete for the cores) and neither was (Python work,
waiting); the N-client aggregate chars/s over the 1-client one; and whether every output
equals its solo run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from coolfusion.bench import concurrency  # noqa: E402
from coolfusion.config import load_config  # noqa: E402
from coolfusion.core.types import COOL  # noqa: E402
from coolfusion.engine.engine import Engine  # noqa: E402
from coolfusion.runtime import batch_scheduler  # noqa: E402

TIMELINE: list[tuple[str, float, float, int, int]] = []  # (runner, start, end, items, tokens)


def _record_forwards() -> None:
    run = batch_scheduler.BatchScheduler._run

    def timed(self, batch):
        t0 = time.perf_counter()
        run(self, batch)
        TIMELINE.append((self._thread.name, t0, time.perf_counter(), len(batch),
                         sum(len(it.tokens) for it, _ in batch)))

    batch_scheduler.BatchScheduler._run = timed


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in a for b0, b1 in b)


def window(engine, solo, clients: int, max_tokens: int) -> float:
    """`clients` requests at once (`concurrency.level`); print the forward timeline's figures;
    return the aggregate chars/s."""
    TIMELINE.clear()
    row = concurrency.level(engine, COOL, clients, max_tokens, solo)
    wall = row["seconds"]
    print(f"== {clients} client(s): wall {wall:.2f} s, {row['chars_per_s']:.1f} chars/s, "
          f"identical to solo: {row['identical']}")
    spans = {}
    for name in sorted({x[0] for x in TIMELINE}):
        rows = [x for x in TIMELINE if x[0] == name]
        spans[name] = [(x[1], x[2]) for x in rows]
        by_batch: dict[int, list[float]] = {}
        for x in rows:
            if x[4] == x[3]:  # decode only: one token per item
                by_batch.setdefault(x[3], []).append(1000 * (x[2] - x[1]))
        print(f"  {name}: forwards {len(rows)}, items {sum(x[3] for x in rows)}, "
              f"busy {sum(x[2] - x[1] for x in rows) / wall:.0%}; decode-only ms by batch: "
              + " ".join(f"{b}:{statistics.median(v):.0f}(n={len(v)})" for b, v in sorted(by_batch.items())))
    if len(spans) == 2:
        a, b = spans.values()
        both = _overlap(a, b)
        either = sum(e - s for s, e in a) + sum(e - s for s, e in b) - both
        print(f"  both models in a forward: {both / wall:.0%} of the wall time; neither: {1 - either / wall:.0%}")
    return row["chars_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    _record_forwards()
    engine = Engine.from_config(load_config(args.config))
    solo = concurrency.solo_texts(engine, COOL, args.max_tokens, args.clients)
    print(os.popen("uptime").read().strip())
    one = window(engine, solo, 1, args.max_tokens)
    many = window(engine, solo, args.clients, args.max_tokens)
    print(f"{args.clients} clients / 1: {many / one:.2f}x")


if __name__ == "__main__":
    main()
