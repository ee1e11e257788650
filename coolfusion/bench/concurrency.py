"""`coolfusion bench --concurrency 1,2,4,8`: throughput under load, in one run.

Every level runs the same N greedy requests (N = the highest level; request i over prompt
i of a fixed set), for `cool-fusion` and for each source model alone: at level c, c client
threads run at once through the engine (no HTTP: what is measured is the engine's use of
the models), each taking the next request not yet taken until all N are done. So level 1
is the N requests one after another, and every level serves the same work. Printed per
(model id, c): aggregate characters/s, the median and worst per-request latency, and the
aggregate's ratio to c = 1 (`speedup`). Every output is compared with the same request run
alone first: greedy outputs must not depend on load (`identical`).
"""

from __future__ import annotations

import statistics
import threading
import time

from coolfusion.core.types import COOL, GenerationRequest

PROMPTS = [
    "The history of the city of Paris begins",
    "Here is a short Python function that reverses a list:\n",
    "Q: Tom has 3 apples and buys 5 more. How many apples does he have?\nA:",
    "Write a short story about a robot who learns to paint.\n",
    "The three primary colours are",
    "A good breakfast should include",
    "The main causes of the French Revolution were",
    "def is_prime(n):",
]


def _request(i: int, model: str, max_tokens: int, prompts=PROMPTS) -> GenerationRequest:
    return GenerationRequest(prompt=prompts[i % len(prompts)], model=model, max_tokens=max_tokens)


def _text(engine, req: GenerationRequest) -> str:
    return "".join(s.text for s in engine.generate(req))


def solo_texts(engine, model: str, max_tokens: int, clients: int, prompts=PROMPTS) -> dict[int, str]:
    """Client i's output run alone, for i < clients: what `level` compares outputs under load with."""
    return {i: _text(engine, _request(i, model, max_tokens, prompts)) for i in range(clients)}


def level(engine, model: str, clients: int, max_tokens: int, solo: dict[int, str], prompts=PROMPTS,
          requests: int | None = None) -> dict:
    """`clients` threads at once serving requests 0 .. `requests`-1 (default: one each), each
    thread taking the next one not yet taken; figures of that level."""
    todo = iter(range(requests or clients))
    take = threading.Lock()
    barrier = threading.Barrier(clients)
    out: dict[int, tuple[str, float]] = {}
    errors: list[BaseException] = []

    def client() -> None:
        barrier.wait()
        while not errors:
            with take:
                i = next(todo, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                out[i] = (_text(engine, _request(i, model, max_tokens, prompts)), time.perf_counter() - t0)
            except BaseException as err:  # noqa: BLE001 (reported below)
                errors.append(err)

    before = _runner_stats(engine)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    after = _runner_stats(engine)
    latencies = [lat for _, lat in out.values()]
    chars = sum(len(text) for text, _ in out.values())
    forwards = sum(a["forwards"] - b["forwards"] for a, b in zip(after, before))
    items = sum(a["items"] - b["items"] for a, b in zip(after, before))
    return {"clients": clients, "requests": len(out), "seconds": wall, "chars": chars, "chars_per_s": chars / wall,
            "mean_batch": items / forwards if forwards else None,
            "model_busy": [(a["busy_s"] - b["busy_s"]) / wall for a, b in zip(after, before)],  # per model, 0-1
            "latency_median_s": statistics.median(latencies), "latency_max_s": max(latencies),
            "identical": all(out[i][0] == solo[i] for i in out)}


def _runner_stats(engine) -> list[dict]:
    """Per worker whose runner batches (local or in a Ray actor): its counters now."""
    return [s for s in (getattr(w, "runner_stats", dict)() for w in engine.workers) if s]


def measure(engine, levels: list[int], max_tokens: int, models: list[str] | None = None, prompts=PROMPTS,
            reference: dict | None = None) -> dict:
    """Every level for every model id. Each output is compared with the same request run
    alone on this engine (`identical`), or with `reference[model][i]` when given (another
    engine's solo outputs: the local backend's for `backend: ray`); `res["solo"]` keeps them."""
    models = models or [COOL, *engine.source_names]
    _text(engine, _request(0, COOL, 8, prompts))  # warm-up
    res: dict = {"max_tokens": max_tokens, "levels": levels, "models": {}, "solo": {}}
    for model in models:
        solo = solo_texts(engine, model, max_tokens, max(levels), prompts)
        res["solo"][model] = solo
        if reference is not None:
            res.setdefault("solo_equals_reference", {})[model] = solo == reference[model]
            solo = reference[model]
        rows = [level(engine, model, c, max_tokens, solo, prompts, requests=max(levels)) for c in levels]
        base = rows[0]["chars_per_s"] if rows[0]["clients"] == 1 else None
        for r in rows:
            r["speedup"] = r["chars_per_s"] / base if base else None
        res["models"][model] = rows
    return res


def with_runner(engine, *, batching: bool):
    """An engine over the same loaded models with `fusion.batching` set (no second load)."""
    return engine.with_fusion(engine.fusion.model_copy(update={"batching": batching}))


def print_table(res: dict) -> None:
    print(f"concurrency benchmark: the same {max(res['levels'])} greedy requests at every level, "
          f"max_tokens {res['max_tokens']}")
    for model, same in res.get("solo_equals_reference", {}).items():
        print(f"{model}: solo outputs equal the local backend's: {same}")
    print(f"{'model id':22} {'clients':>7} {'chars/s':>8} {'speedup':>8} {'latency p50 s':>13} "
          f"{'max s':>7} {'identical':>9} {'batch':>6} {'busy':>9}")
    for model, rows in res["models"].items():
        for r in rows:
            speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
            print(f"{model:22} {r['clients']:7d} {r['chars_per_s']:8.1f} {speed:>8} {r['latency_median_s']:13.1f} "
                  f"{r['latency_max_s']:7.1f} {str(r['identical']):>9} "
                  f"{(format(r['mean_batch'], '6.2f') if r['mean_batch'] else '     -')} "
                  f"{'/'.join(f'{b:.0%}' for b in r['model_busy']) or '-':>9}")


def one_client_on_off(on, off, models: list[str], max_tokens: int, requests: int, solo: dict,
                      repeat: int = 2, prompts=PROMPTS) -> dict:
    """One client, batching on (engine `on`) against off (`off`), the N requests of every
    level each time, alternating off, on, off, on, ... so that the machine's drift touches
    both alike: per model id, each mode's chars/s per run and the ratio of their totals."""
    out = {}
    for model in models:
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(repeat):
            for mode, eng in (("off", off), ("on", on)):
                runs[mode].append(level(eng, model, 1, max_tokens, solo[model], prompts, requests=requests))
        rate = {m: sum(r["chars"] for r in rs) / sum(r["seconds"] for r in rs) for m, rs in runs.items()}
        out[model] = {"on_chars_per_s": [r["chars_per_s"] for r in runs["on"]],
                      "off_chars_per_s": [r["chars_per_s"] for r in runs["off"]],
                      "ratio": rate["on"] / rate["off"],
                      "identical": all(r["identical"] for rs in runs.values() for r in rs)}
    return out


def print_on_against_off(res: dict) -> None:
    """With both modes measured: per model id, one client with batching on against off,
    interleaved (batching must not slow a lone client down)."""
    for model, r in res.get("one_client_on_off", {}).items():
        print(f"{model}, 1 client, batching off and on alternating: on "
              f"{', '.join(f'{x:.1f}' for x in r['on_chars_per_s'])} chars/s, off "
              f"{', '.join(f'{x:.1f}' for x in r['off_chars_per_s'])} (on/off {r['ratio']:.2f}x, "
              f"identical {r['identical']})")
